"""Structural (Minitron-style) pruning: rank heads, MLP channels, embedding channels and whole
layers by activation-based importance on calibration data, then cut them out to get a smaller
*dense* Llama (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation", arXiv:2407.14679).

Importance (Section 2.2 of the paper), from one forward pass over calibration windows, each
aggregated per window with an L2 norm over the sequence and then averaged over windows (the
paper's best (batch, sequence) aggregation, "(mean, L2)"):

* **attention head** i of layer l: ``||attn_head_i(X)||`` — the head's output before ``o_proj``;
* **MLP channel** j: the gated activation ``silu(x W_gate) * (x W_up)`` feeding ``down_proj``;
* **embedding channel** c: the RMSNorm outputs (``attn_in``/``mlp_in``) of every layer;
* **layer** l (depth): the Block Importance ``1 - cos(h_in, h_out)`` averaged over tokens (Men et
  al. 2024, "ShortGPT"); the layers that change the residual stream least go first.

Grouped-query attention is respected: key/value heads are ranked by the summed importance of
the query heads they serve, the top ``n_kv_heads`` groups are kept, and within each kept group
the top ``n_heads / n_kv_heads`` query heads (so every group keeps the same size).

:func:`prune_structure` returns a normal :class:`~shrinkjax.models.llama.Llama` built by
``models.params.model_from_params`` from the sliced weights under ``cfg.replace(...)`` (with
``head_dim`` pinned), ready to be healed by distillation as a student.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shrinkjax.models.llama import Llama, LlamaConfig
from shrinkjax.models.params import flat_params, model_from_params

__all__ = ["Importance", "Plan", "importance", "plan", "prune_structure", "target_config"]


@dataclasses.dataclass
class Importance:
    """Per-unit importance scores (numpy, f32), larger = more important."""

    heads: np.ndarray  # [layers, n_heads]
    mlp: np.ndarray  # [layers, hidden_dim]
    embed: np.ndarray  # [dim]
    layers: np.ndarray  # [layers]  block importance 1 - cos(h_in, h_out)
    windows: int


@dataclasses.dataclass
class Plan:
    """What survives: indices into the original model, every list sorted ascending."""

    layers: list[int]
    embed: np.ndarray  # [dim'] kept embedding channels
    q_heads: dict[int, np.ndarray]  # layer -> kept query heads, grouped by kept kv head
    kv_heads: dict[int, np.ndarray]  # layer -> kept kv heads
    mlp: dict[int, np.ndarray]  # layer -> kept MLP channels
    config: LlamaConfig


@nnx.jit
def _block_importance(block, h_BxLxD, mask, rope):
    taps: dict = {}
    out, _ = block(h_BxLxD, rope, mask, taps=taps)
    cfg = block.attn.cfg
    b, seqlen, _ = h_BxLxD.shape

    def seq_l2_sum(x_BxLxC):  # L2 over the sequence, summed over windows (mean taken later)
        return jnp.sum(jnp.sqrt(jnp.sum(jnp.square(x_BxLxC.astype(jnp.float32)), axis=1)), axis=0)

    o = taps["o_in"].astype(jnp.float32).reshape(b, seqlen, cfg.n_heads, cfg.head_width)
    heads = seq_l2_sum(jnp.sqrt(jnp.sum(o * o, axis=-1)))  # ||head output|| per token
    mlp = seq_l2_sum(taps["down_in"])
    emb = seq_l2_sum(taps["attn_in"]) + seq_l2_sum(taps["mlp_in"])
    hi, ho = h_BxLxD.astype(jnp.float32), out.astype(jnp.float32)
    norms = jnp.linalg.norm(hi, axis=-1) * jnp.linalg.norm(ho, axis=-1)
    cos = jnp.sum(hi * ho, -1) / (norms + 1e-6)
    return out, heads, mlp, emb, jnp.sum(1.0 - cos)


def importance(model: Llama, tokens_NxL, batch_size: int = 8, progress: bool = True) -> Importance:
    """Activation-based importance of every prunable unit over the calibration windows
    (one batch of activations held at a time)."""
    from tqdm.auto import tqdm

    tokens = np.asarray(tokens_NxL)
    n, seqlen = tokens.shape
    cfg = model.cfg
    heads = np.zeros((cfg.n_layers, cfg.n_heads), np.float64)
    mlp = np.zeros((cfg.n_layers, cfg.hidden_dim), np.float64)
    emb = np.zeros((cfg.dim,), np.float64)
    bi = np.zeros((cfg.n_layers,), np.float64)
    embed = nnx.jit(lambda m, t: m.embed_tokens(t))
    for s in tqdm(range(0, n, batch_size), desc="importance", unit="batch", disable=not progress):
        t = jnp.asarray(tokens[s : s + batch_size])
        mask, rope = model.masks_and_rope(len(t), seqlen)
        h = embed(model, t)
        for i, blk in enumerate(model.layers):
            h, a, b_, c, d = _block_importance(blk, h, mask, rope)
            heads[i] += np.asarray(a)
            mlp[i] += np.asarray(b_)
            emb += np.asarray(c)
            bi[i] += float(d)
    return Importance(
        heads=(heads / n).astype(np.float32),
        mlp=(mlp / n).astype(np.float32),
        embed=(emb / n).astype(np.float32),
        layers=(bi / (n * seqlen)).astype(np.float32),
        windows=n,
    )


def _top(scores, k: int) -> np.ndarray:
    """Indices of the k largest scores, ascending (ties: lower index first)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]
    return np.sort(order)


def target_config(
    cfg: LlamaConfig,
    *,
    n_layers: int = 0,
    dim: int = 0,
    hidden_dim: int = 0,
    n_heads: int = 0,
    n_kv_heads: int = 0,
) -> LlamaConfig:
    """The pruned config (0 = keep that size); ``head_dim`` stays the original head width."""
    new = dict(
        n_layers=n_layers or cfg.n_layers,
        dim=dim or cfg.dim,
        hidden_dim=hidden_dim or cfg.hidden_dim,
        n_heads=n_heads or cfg.n_heads,
        n_kv_heads=n_kv_heads or (cfg.n_kv_heads if not n_heads else 0),
    )
    if not new["n_kv_heads"]:  # keep the GQA group size when only n_heads is given
        group = cfg.n_heads // cfg.n_kv_heads
        if new["n_heads"] % group:
            raise ValueError(
                f"n_heads={new['n_heads']} is not a multiple of the GQA group size {group}; "
                f"give n_kv_heads too"
            )
        new["n_kv_heads"] = new["n_heads"] // group
    for key in new:
        if new[key] > getattr(cfg, key):
            raise ValueError(f"pruning cannot grow {key}: {new[key]} > {getattr(cfg, key)}")
    if new["n_kv_heads"] > new["n_heads"] or new["n_heads"] % new["n_kv_heads"]:
        raise ValueError(
            f"n_heads={new['n_heads']} is not a multiple of n_kv_heads={new['n_kv_heads']}"
        )
    return cfg.replace(head_dim=cfg.head_width, **new)


def plan(cfg: LlamaConfig, imp: Importance, target: LlamaConfig) -> Plan:
    """Choose the surviving units of ``cfg`` for the sizes of ``target`` by importance."""
    layers = sorted(_top(imp.layers, target.n_layers).tolist())
    g_old = cfg.n_heads // cfg.n_kv_heads
    g_new = target.n_heads // target.n_kv_heads
    if g_new > g_old:
        raise ValueError(f"GQA: cannot keep {g_new} query heads per kv head, the model has {g_old}")
    q_heads, kv_heads, mlp = {}, {}, {}
    for i in layers:
        s = imp.heads[i].reshape(cfg.n_kv_heads, g_old)
        kv = _top(s.sum(1), target.n_kv_heads)
        q = [kv_i * g_old + _top(s[kv_i], g_new) for kv_i in kv]
        kv_heads[i] = kv
        q_heads[i] = np.concatenate(q)
        mlp[i] = _top(imp.mlp[i], target.hidden_dim)
    return Plan(layers, _top(imp.embed, target.dim), q_heads, kv_heads, mlp, target)


def _cols(heads: np.ndarray, width: int) -> np.ndarray:
    return (heads[:, None] * width + np.arange(width)[None, :]).reshape(-1)


def apply_plan(model: Llama, p: Plan) -> Llama:
    """The smaller dense model holding exactly the planned units' weights."""
    flat = flat_params(model)
    for k, v in flat.items():
        if not isinstance(v, jax.Array | np.ndarray):
            raise TypeError(f"structural pruning needs dense weights; {k} is {type(v).__name__}")
    hw = model.cfg.head_width
    e = jnp.asarray(p.embed)
    out: dict[str, jax.Array] = {
        "embed.embedding": flat["embed.embedding"][:, e],
        "norm.scale": flat["norm.scale"][e],
    }
    if "lm_head.kernel" in flat:
        out["lm_head.kernel"] = flat["lm_head.kernel"][e, :]
    for new_i, i in enumerate(p.layers):
        src, dst = f"layers.{i}.", f"layers.{new_i}."
        qc, kvc = jnp.asarray(_cols(p.q_heads[i], hw)), jnp.asarray(_cols(p.kv_heads[i], hw))
        f = jnp.asarray(p.mlp[i])
        take = {
            "attn_norm.scale": lambda w: w[e],
            "mlp_norm.scale": lambda w: w[e],
            "attn.q_proj.kernel": lambda w: w[e][:, qc],
            "attn.k_proj.kernel": lambda w: w[e][:, kvc],
            "attn.v_proj.kernel": lambda w: w[e][:, kvc],
            "attn.o_proj.kernel": lambda w: w[qc][:, e],
            "attn.q_proj.bias": lambda w: w[qc],
            "attn.k_proj.bias": lambda w: w[kvc],
            "attn.v_proj.bias": lambda w: w[kvc],
            "mlp.gate_proj.kernel": lambda w: w[e][:, f],
            "mlp.up_proj.kernel": lambda w: w[e][:, f],
            "mlp.down_proj.kernel": lambda w: w[f][:, e],
        }
        for name, fn in take.items():
            if src + name in flat:
                out[dst + name] = fn(flat[src + name])
    cfg = p.config.replace(dtype=model.cfg.dtype)
    return model_from_params(cfg, out, source="structural prune")


def prune_structure(
    model: Llama,
    tokens_NxL,
    *,
    n_layers: int = 0,
    dim: int = 0,
    hidden_dim: int = 0,
    n_heads: int = 0,
    n_kv_heads: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    imp: Importance | None = None,
) -> tuple[Llama, Plan, Importance]:
    """Rank, plan and cut: (smaller model, plan, importance). Sizes of 0 are kept."""
    target = target_config(
        model.cfg,
        n_layers=n_layers,
        dim=dim,
        hidden_dim=hidden_dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
    )
    if imp is None:
        imp = importance(model, tokens_NxL, batch_size=batch_size, progress=progress)
    p = plan(model.cfg, imp, target)
    return apply_plan(model, p), p, imp
