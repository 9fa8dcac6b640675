"""Wanda: prune by weight magnitude times input activation norm (Sun et al. 2023, "A Simple
and Effective Pruning Approach for Large Language Models", arXiv:2306.11695).

Score ``S[k, n] = |W[k, n]| * ||X[:, k]||_2`` where ``X`` ([T, K]) are the layer's calibration
inputs. Scores are compared *within each output feature* (the paper's "per output"
comparison group; a column of our ``[in, out]`` kernel); N:M groups run along the input dim.
No weight update. Only the per-feature sum of squares of the inputs is accumulated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from shrinkjax.sparse.masks import mask_from_scores, parse_pattern

__all__ = ["init_stats", "prune", "score", "update_stats"]


def init_stats(k: int) -> dict:
    """Running ``sum_t x[t, k]^2`` and the token count."""
    return {"sumsq": jnp.zeros((k,), jnp.float32), "count": jnp.zeros((), jnp.float32)}


def update_stats(stats: dict, x_TxK) -> dict:
    x = jnp.asarray(x_TxK, jnp.float32)
    return {"sumsq": stats["sumsq"] + jnp.sum(x * x, axis=0), "count": stats["count"] + x.shape[0]}


def score(w_KxN, sumsq_K):
    """|W| · ||X||_2 per input feature (the norm is over all calibration tokens)."""
    norm = jnp.sqrt(jnp.asarray(sumsq_K, jnp.float32))
    return jnp.abs(jnp.asarray(w_KxN, jnp.float32)) * norm[:, None]


def prune(w_KxN, sumsq_K, pattern, per: str = "output"):
    """(pruned weight, keep-mask); ``per="output"`` is the paper's comparison group."""
    return _prune(jnp.asarray(w_KxN), jnp.asarray(sumsq_K), parse_pattern(pattern), per)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _prune(w_KxN, sumsq_K, pattern, per):
    mask = mask_from_scores(score(w_KxN, sumsq_K), pattern, per=per)
    return jnp.where(mask, w_KxN, jnp.zeros((), w_KxN.dtype)), mask
