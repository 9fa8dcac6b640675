"""Llama-family causal decoder in Flax NNX (Llama 2/3, Mistral, Qwen2, SmolLM).

Shapes are in names: B batch, L query length, S key length (cache slots), D model width,
N query heads, K key/value heads (GQA: N = K * G), H head width, F MLP width, V vocab.

Parameter paths (what quantization/pruning rules match against), with kernels stored
``[in, out]``::

    embed.embedding                                  [V, D]
    layers.{i}.attn_norm.scale / mlp_norm.scale      [D]
    layers.{i}.attn.{q,k,v}_proj.kernel              [D, N*H] / [D, K*H]
    layers.{i}.attn.o_proj.kernel                    [N*H, D]
    layers.{i}.mlp.{gate,up}_proj.kernel             [D, F]
    layers.{i}.mlp.down_proj.kernel                  [F, D]
    norm.scale                                       [D]
    lm_head.kernel                                   [D, V]   (absent when embeddings are tied)

With ``fused_projections`` (inference, ``shrinkjax.models.fuse``) q/k/v are one
``attn.qkv_proj.kernel [D, (N+2K)*H]`` and gate/up one ``mlp.gate_up_proj.kernel [D, 2F]``.

A linear kernel may be a dense array or any compressed weight type known to
``shrinkjax.kernels.dispatch``: the model never knows how its weights are stored.
RoPE uses the Hugging Face "rotate half" layout (GGUF's interleaved q/k rows are permuted
back on import).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from shrinkjax.kernels import dispatch
from shrinkjax.models.kv_cache import KVCache, cache_read, cache_write

ATTENTION_IMPLS = ("einsum", "cudnn", "pallas_decode", "pallas_decode_fused")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen dict items (HF rope_scaling)
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    # einsum (exact, any mask) | cudnn (flash, no cache, bf16) | pallas_decode (one-token decode
    # steps with a bf16 cache through shrinkjax.kernels.decode_attention on a GPU; else einsum)
    # | pallas_decode_fused (the same with RoPE and the cache write inside the kernel:
    # decode_attention_update)
    attention_impl: str = "einsum"
    # q/k/v as one qkv_proj [D, (N+2K)H], gate/up as one gate_up_proj [D, 2F] (inference;
    # shrinkjax.models.fuse.fuse_projections builds it from an unfused model)
    fused_projections: bool = False
    # Inference: each RMSNorm's 1/rms factor applied to the next linears' outputs instead of
    # their input (FlashNorm; RMSNorm.deferred), so the matmuls need not wait on the reduction
    deferred_norm: bool = False

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )

    @property
    def head_width(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LlamaConfig keys: {sorted(unknown)}")
        if d.get("rope_scaling"):
            d["rope_scaling"] = tuple(sorted(d["rope_scaling"].items()))
        return cls(**d)

    def replace(self, **kw) -> LlamaConfig:
        return dataclasses.replace(self, **kw)

    def param_count(self) -> int:
        """Parameters implied by the config (what a structurally pruned model must match)."""
        h, d = self.head_width, self.dim
        attn = d * self.n_heads * h * 2 + d * self.n_kv_heads * h * 2
        if self.attention_bias:
            attn += self.n_heads * h + 2 * self.n_kv_heads * h
        block = attn + 3 * d * self.hidden_dim + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.n_layers * block + d + head


def _init(rngs: nnx.Rngs, shape, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); the kernel may be dense or compressed."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = False):
        self.kernel = nnx.Param(_init(rngs, (d_in, d_out)))
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if use_bias else None

    def __call__(self, x, row_scale=None):
        """``row_scale`` [..., 1] f32 (a deferred norm's 1/rms, :meth:`RMSNorm.deferred`)
        multiplies the product before the bias is added."""
        y = dispatch.linear(x, self.kernel.value)
        if row_scale is not None:
            y = (y.astype(jnp.float32) * row_scale).astype(y.dtype)
        if self.bias is not None:
            y = y + self.bias.value.astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale.value).astype(x.dtype)

    def deferred(self, x):
        """``(x * scale, 1/rms(x))``: the norm with its per-row factor left for the caller.

        FlashNorm (Graef et al. 2024, arXiv:2407.09577): ``1/rms(x)`` is one number per row, so
        it commutes with a following linear, ``(x r γ) W = r ((x γ) W)``. The caller scales the
        linears' outputs by ``r`` [..., 1] (f32), which XLA fuses into their consumers, so the
        matmul's input no longer waits for the reduction. ``x γ`` is rounded to x's dtype as
        the plain norm's output is; the products then round once more (bf16: a relative
        2^-9 per element, as the plain path's own rounding of ``x r γ``).

        Measured (8B-shaped decode, H100, ``benchmarks/RESULTS.md``): XLA still runs the
        reduction as a kernel of its own, but one norm per layer goes from three kernels to
        two; int4 +0.7% tokens/s at batch 1 and +2.5% at batch 16, bf16 +1.5% at batch 1."""
        xf = x.astype(jnp.float32)
        r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale.value).astype(x.dtype), r


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
    """Inverse frequencies [H/2], with HF's 'linear' and 'llama3' scaling."""
    h = cfg.head_width
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    sc = dict(cfg.rope_scaling or ())
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return jnp.where(is_mid, mid, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def rope_tables(cfg: LlamaConfig, positions_BxL: jax.Array):
    ang = positions_BxL.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)  # [B, L, H/2]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x_BxLxNxH, cos_BxLxH2, sin_BxLxH2):
    xf = x_BxLxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    c, s = cos_BxLxH2[:, :, None, :], sin_BxLxH2[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x_BxLxNxH.dtype)


def attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxLxS, impl: str = "einsum"):
    """Grouped-query softmax attention in f32; mask True = may attend, None = plain causal
    (lets cuDNN's flash kernel skip the mask tensor)."""
    b, l, n, h = q_BxLxNxH.shape
    kh = k_BxSxKxH.shape[2]
    if impl.startswith("pallas_decode") and l == 1 and mask_BxLxS is not None:
        from shrinkjax.kernels import decode_attention as DA
        from shrinkjax.kernels import driver

        if driver.use_kernel_backend() and DA.supports(q_BxLxNxH, k_BxSxKxH):
            out = DA.decode_attention(q_BxLxNxH[:, 0], k_BxSxKxH, v_BxSxKxH, mask_BxLxS[:, 0])
            return out.reshape(b, l, n * h)
    if impl == "cudnn":
        mask = None if mask_BxLxS is None else mask_BxLxS[:, None]
        out = jax.nn.dot_product_attention(
            q_BxLxNxH,
            k_BxSxKxH,
            v_BxSxKxH,
            mask=mask,
            is_causal=mask is None,
            implementation="cudnn",
        )
        return out.reshape(b, l, n * h)
    if mask_BxLxS is None:
        s_len = k_BxSxKxH.shape[1]
        mask_BxLxS = (jnp.arange(s_len)[None, :] <= jnp.arange(l)[:, None])[None]
    q = q_BxLxNxH.reshape(b, l, kh, n // kh, h)
    s = jnp.einsum("blkgh,bskh->bkgls", q, k_BxSxKxH, preferred_element_type=jnp.float32)
    s = s / math.sqrt(h)
    s = jnp.where(mask_BxLxS[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v_BxSxKxH.dtype)
    out = jnp.einsum("bkgls,bskh->blkgh", p, v_BxSxKxH, preferred_element_type=jnp.float32)
    return out.reshape(b, l, n * h).astype(q_BxLxNxH.dtype)


def _fused_decode_attention(cfg, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, rope, mask_BxLxS, layer_cache):
    """``attention_impl="pallas_decode_fused"`` on one new token with a dense cache on a GPU:
    :func:`shrinkjax.kernels.decode_attention.decode_attention_update` (RoPE, the cache write
    and attention in one kernel) -> (out [B, 1, N*H], updated layer cache); else None."""
    if cfg.attention_impl != "pallas_decode_fused" or layer_cache is None or mask_BxLxS is None:
        return None
    b, l, n, h = q_BxLxNxH.shape
    k_all, v_all, index = layer_cache
    if l != 1 or not isinstance(v_all, jax.Array):
        return None
    from shrinkjax.kernels import decode_attention as DA
    from shrinkjax.kernels import driver

    if not (driver.use_kernel_backend() and DA.supports_update(q_BxLxNxH, k_all)):
        return None
    cos, sin = rope
    out, k_all, v_all = DA.decode_attention_update(
        q_BxLxNxH[:, 0], k_BxLxKxH[:, 0], v_BxLxKxH[:, 0], cos[:, 0], sin[:, 0], k_all, v_all,
        index, mask_BxLxS[:, 0],
    )  # fmt: skip
    return out.reshape(b, 1, n * h), (k_all, v_all, index)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        h = cfg.head_width
        self.cfg = cfg
        bias = cfg.attention_bias
        nq, nkv = cfg.n_heads * h, cfg.n_kv_heads * h
        if cfg.fused_projections:
            self.qkv_proj = Linear(cfg.dim, nq + 2 * nkv, rngs=rngs, use_bias=bias)
        else:
            self.q_proj = Linear(cfg.dim, nq, rngs=rngs, use_bias=bias)
            self.k_proj = Linear(cfg.dim, nkv, rngs=rngs, use_bias=bias)
            self.v_proj = Linear(cfg.dim, nkv, rngs=rngs, use_bias=bias)
        self.o_proj = Linear(nq, cfg.dim, rngs=rngs)

    def __call__(self, x_BxLxD, rope, mask_BxLxS, layer_cache=None, taps=None, row_scale=None):
        """``row_scale``: a deferred norm's 1/rms [B, L, 1] for the q/k/v products."""
        cfg, (b, l, _) = self.cfg, x_BxLxD.shape
        h = cfg.head_width
        r = row_scale
        if cfg.fused_projections:  # one matmul; its output columns are [q | k | v]
            nq, nkv = cfg.n_heads * h, cfg.n_kv_heads * h
            qkv = self.qkv_proj(x_BxLxD, r)
            q, k, v = qkv[..., :nq], qkv[..., nq : nq + nkv], qkv[..., nq + nkv :]
        else:
            q, k, v = self.q_proj(x_BxLxD, r), self.k_proj(x_BxLxD, r), self.v_proj(x_BxLxD, r)
        q = q.reshape(b, l, cfg.n_heads, h)
        k = k.reshape(b, l, cfg.n_kv_heads, h)
        v = v.reshape(b, l, cfg.n_kv_heads, h)
        fused = _fused_decode_attention(cfg, q, k, v, rope, mask_BxLxS, layer_cache)
        if fused is not None:  # RoPE, cache write and attention in one kernel
            o_in, layer_cache = fused
            if taps is not None:
                taps["o_in"] = o_in
            return self._o(o_in), layer_cache
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if layer_cache is not None:
            k_all, v_all, index = layer_cache
            k_all, v_all = cache_write(k_all, k, index), cache_write(v_all, v, index)
            layer_cache = (k_all, v_all, index)
            k, v = cache_read(k_all, q.dtype), cache_read(v_all, q.dtype)
        o_in = attention(q, k, v, mask_BxLxS, cfg.attention_impl)
        if taps is not None:
            taps["o_in"] = o_in
        return self._o(o_in), layer_cache

    def _o(self, o_in):
        """``o_proj`` of the attention output, which no XLA fusion produces (a dot or a Pallas
        kernel): its linear is told so (:func:`~shrinkjax.kernels.dispatch.opaque_input`)."""
        with dispatch.opaque_input():
            return self.o_proj(o_in)


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.fused = cfg.fused_projections
        if self.fused:
            self.gate_up_proj = Linear(cfg.dim, 2 * cfg.hidden_dim, rngs=rngs)
        else:
            self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, rngs=rngs)
            self.up_proj = Linear(cfg.dim, cfg.hidden_dim, rngs=rngs)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, rngs=rngs)

    def __call__(self, x_BxLxD, taps=None, row_scale=None):
        """``row_scale``: a deferred norm's 1/rms [B, L, 1] for the gate/up products."""
        r = row_scale
        if self.fused:  # one matmul; its output columns are [gate | up]
            gate, up = jnp.split(self.gate_up_proj(x_BxLxD, r), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x_BxLxD, r), self.up_proj(x_BxLxD, r)
        a_BxLxF = jax.nn.silu(gate) * up
        if taps is not None:
            taps["down_in"] = a_BxLxF
        return self.down_proj(a_BxLxF)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs=rngs)
        self.deferred_norm = cfg.deferred_norm

    def __call__(self, h_BxLxD, rope, mask_BxLxS, layer_cache=None, taps=None):
        """One decoder block. ``taps`` (a dict) receives each linear's input, for calibration:
        attn_in (q/k/v), o_in, mlp_in (gate/up), down_in (the plain norms' outputs: taps turn
        ``deferred_norm`` off)."""
        if self.deferred_norm and taps is None:
            x, r = self.attn_norm.deferred(h_BxLxD)
            a, layer_cache = self.attn(x, rope, mask_BxLxS, layer_cache, row_scale=r)
            h_BxLxD = h_BxLxD + a
            x, r = self.mlp_norm.deferred(h_BxLxD)
            return h_BxLxD + self.mlp(x, row_scale=r), layer_cache
        x = self.attn_norm(h_BxLxD)
        if taps is not None:
            taps["attn_in"] = x
        a, layer_cache = self.attn(x, rope, mask_BxLxS, layer_cache, taps)
        h_BxLxD = h_BxLxD + a
        x = self.mlp_norm(h_BxLxD)
        if taps is not None:
            taps["mlp_in"] = x
        return h_BxLxD + self.mlp(x, taps), layer_cache


# Which tap feeds which linear of a block (calibration uses this to collect layer inputs).
LINEAR_INPUTS = {
    "attn.q_proj": "attn_in",
    "attn.k_proj": "attn_in",
    "attn.v_proj": "attn_in",
    "attn.o_proj": "o_in",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "down_in",
}
# Linears that are calibrated together because they share one input (true-sequential order).
LINEAR_GROUPS = (
    ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    ("attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, rngs=rngs)

    # The three pieces below are what block-by-block calibration drives one at a time.
    def embed_tokens(self, tokens_BxL):
        return self.embed.embedding.value[tokens_BxL].astype(self.cfg.jnp_dtype)

    def masks_and_rope(self, b: int, l: int, mask_BxL=None, start=None, key_valid_BxS=None):
        """Causal mask [B, L, S] (None when plainly causal) and RoPE tables for L new tokens at
        slots start..start+L."""
        if key_valid_BxS is None:  # no cache: keys are the queries themselves
            if mask_BxL is None:  # plain causal: attention builds it (or cuDNN skips it)
                return None, rope_tables(self.cfg, jnp.broadcast_to(jnp.arange(l)[None], (b, l)))
            key_valid_BxS = mask_BxL.astype(bool)
            start = 0
        s = key_valid_BxS.shape[1]
        q_slot = start + jnp.arange(l)
        causal_LxS = jnp.arange(s)[None, :] <= q_slot[:, None]
        mask_BxLxS = causal_LxS[None] & key_valid_BxS[:, None, :]
        rope = rope_tables(self.cfg, jnp.broadcast_to(q_slot[None], (b, l)))
        return mask_BxLxS, rope

    def logits(self, h_BxLxD):
        if self.cfg.deferred_norm:
            x, r = self.norm.deferred(h_BxLxD)
        else:
            x, r = self.norm(h_BxLxD), None
        if self.lm_head is not None:
            return self.lm_head(x, r).astype(jnp.float32)
        emb = self.embed.embedding.value.astype(x.dtype)
        y = dispatch.dense_matmul(x, emb.T, jnp.float32)  # f32 logits
        return y if r is None else y * r

    def __call__(self, tokens_BxL, *, mask_BxL=None, cache: KVCache | None = None):
        """Logits [B, L, V] (f32) and the updated cache (None without one).

        ``mask_BxL`` marks real tokens (False for padding). With a cache, the L tokens are
        written at slots ``cache.index ..`` and attend to every valid earlier slot.
        """
        b, l = tokens_BxL.shape
        h = self.embed_tokens(tokens_BxL)
        if cache is None:
            mask, rope = self.masks_and_rope(b, l, mask_BxL)
            for blk in self.layers:
                h, _ = blk(h, rope, mask)
            return self.logits(h), None
        new_valid = jnp.ones((b, l), bool) if mask_BxL is None else mask_BxL.astype(bool)
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, new_valid, cache.index, 1)
        mask, rope = self.masks_and_rope(b, l, start=cache.index, key_valid_BxS=valid)
        ks, vs = [], []
        for i, blk in enumerate(self.layers):
            h, (k, v, _) = blk(h, rope, mask, (cache.k[i], cache.v[i], cache.index))
            ks.append(k)
            vs.append(v)
        cache = KVCache(k=tuple(ks), v=tuple(vs), valid=valid, index=cache.index + l)
        return self.logits(h), cache


def init_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    return Llama(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: LlamaConfig) -> Llama:
    """The model's structure without allocating weights (for loaders and restores)."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
