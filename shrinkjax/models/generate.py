"""Jitted sampling with the KV cache: greedy, temperature, top-k, top-p (nucleus).

Prompts are left-padded to one length P (``prompt_mask`` False on padding): one prefill call
writes slots 0..P-1, then a ``lax.scan`` decodes one token per step. The whole loop is one
compiled program per (batch, P, max_new_tokens, sampling settings).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shrinkjax.models.kv_cache import init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


def sample_logits(logits_BxV, rng, s: Sampling):
    """Next tokens [B] from f32 logits under the sampling settings."""
    if s.temperature <= 0.0:
        return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
    x = logits_BxV.astype(jnp.float32) / s.temperature
    if s.top_k > 0:
        kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, -1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_x, -1), -1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (cum - jax.nn.softmax(sorted_x, -1)) >= s.top_p
        drop = (
            jnp.zeros_like(drop_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(drop_sorted)
        )
        x = jnp.where(drop, -jnp.inf, x)
    return jax.random.categorical(rng, x, -1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "kv_dtype", "kv_format")
)
def _generate(
    graphdef, state, prompt_BxP, prompt_mask_BxP, rng, max_new_tokens, sampling, kv_dtype, kv_format
):
    model = nnx.merge(graphdef, state)
    b, p = prompt_BxP.shape
    fmt, group = kv_format or (None, 0)
    cache = init_cache(model.cfg, b, p + max_new_tokens, kv_dtype, kv_format=fmt, group=group)
    logits, cache = model(prompt_BxP, mask_BxL=prompt_mask_BxP, cache=cache)
    rng, sub = jax.random.split(rng)
    first = sample_logits(logits[:, -1], sub, sampling)

    def step(carry, _):
        tok, cache, rng = carry
        logits, cache = model(tok[:, None], cache=cache)
        rng, sub = jax.random.split(rng)
        nxt = sample_logits(logits[:, -1], sub, sampling)
        return (nxt, cache, rng), tok

    (last, _, _), toks = jax.lax.scan(step, (first, cache, rng), None, length=max_new_tokens - 1)
    return jnp.concatenate([toks.T, last[:, None]], axis=1)


def generate(
    model,
    prompt_BxP,
    max_new_tokens: int,
    *,
    prompt_mask_BxP=None,
    seed: int = 0,
    sampling: Sampling = Sampling(),
    kv_dtype=None,
    kv_format: str | None = None,
    kv_group: int = 0,
) -> np.ndarray:
    """New tokens [B, max_new_tokens] continuing each (left-padded) prompt.

    ``kv_format`` (int8 | fp8_e4m3 | int4, see ``kv_cache``) stores the cache quantized in groups
    of ``kv_group`` head channels (0 = one scale per head and token)."""
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    if prompt_mask_BxP is None:
        prompt_mask_BxP = jnp.ones(prompt_BxP.shape, bool)
    total = prompt_BxP.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_BxP.shape[1]}) + new tokens ({max_new_tokens}) = {total} exceeds "
            f"the model's context length {model.cfg.max_seq_len}"
        )
    graphdef, state = nnx.split(model)
    kv_dtype = jnp.dtype(kv_dtype or model.cfg.jnp_dtype)
    out = _generate(
        graphdef,
        state,
        prompt_BxP,
        jnp.asarray(prompt_mask_BxP, bool),
        jax.random.PRNGKey(seed),
        max_new_tokens,
        sampling,
        kv_dtype,
        (kv_format, kv_group) if kv_format else None,
    )
    return np.asarray(out)


def left_pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to one length: (tokens [B, P], mask [B, P])."""
    p = max(len(s) for s in seqs)
    toks = np.full((len(seqs), p), pad_id, np.int32)
    mask = np.zeros((len(seqs), p), bool)
    for i, s in enumerate(seqs):
        toks[i, p - len(s) :] = s
        mask[i, p - len(s) :] = True
    return toks, mask


def greedy_recompute(model, prompt_1xP, max_new_tokens: int) -> np.ndarray:
    """Reference greedy decoding without a cache: the full forward over the whole sequence every
    step (a fixed [B, P+T] buffer, so one compile; causality makes the unused tail irrelevant)."""
    fwd = nnx.jit(lambda m, t: m(t)[0])
    prompt = np.asarray(prompt_1xP, np.int32)
    b, p = prompt.shape
    buf = np.zeros((b, p + max_new_tokens), np.int32)
    buf[:, :p] = prompt
    for i in range(max_new_tokens):
        logits = fwd(model, jnp.asarray(buf))
        buf[:, p + i] = np.asarray(jnp.argmax(logits[:, p + i - 1], -1))
    return buf[:, p:]
