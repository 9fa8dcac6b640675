"""Magnitude pruning: drop the weights of smallest ``|w|`` (needs no data).

The classic baseline (Han et al. 2015, "Learning both Weights and Connections for Efficient
Neural Networks"; the criterion of Zhu & Gupta 2017's gradual pruning), here in the forms the
Wanda and SparseGPT papers compare against: per layer (rank within one kernel), per output
feature, N:M along the input dim, or global (one threshold over every pruned kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from shrinkjax.sparse.masks import global_masks, mask_from_scores, parse_pattern

__all__ = ["global_prune", "score", "prune"]


def score(w_KxN):
    """|w| in f32."""
    return jnp.abs(jnp.asarray(w_KxN, jnp.float32))


def prune(w_KxN, pattern, per: str = "layer"):
    """(pruned weight, keep-mask) of one kernel; ``per`` is ``"layer"`` or ``"output"``."""
    return _prune(jnp.asarray(w_KxN), parse_pattern(pattern), per)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _prune(w_KxN, pattern, per):
    mask = mask_from_scores(score(w_KxN), pattern, per=per)
    return jnp.where(mask, w_KxN, jnp.zeros((), w_KxN.dtype)), mask


def global_prune(weights: dict, pattern) -> tuple[dict, dict]:
    """Global magnitude pruning of several kernels at one unstructured sparsity.

    Returns ({name: pruned weight}, {name: keep-mask}); exactly ``floor(s * total)`` weights are
    pruned over all kernels together. N:M patterns are local by definition and are applied per
    kernel instead."""
    pat = parse_pattern(pattern)
    if pat.is_nm:
        out = {k: prune(w, pat) for k, w in weights.items()}
        return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}
    masks = global_masks({k: score(w) for k, w in weights.items()}, pat.sparsity)
    pruned = {k: jnp.where(masks[k], w, jnp.zeros((), w.dtype)) for k, w in weights.items()}
    return pruned, masks
