"""Sparsity patterns and exact mask selection from scores (True = keep).

Kernels are stored ``[K, N]`` = ``[in, out]``. Following Wanda and SparseGPT (which write the
Hugging Face weight ``[out, in]``):

* **per-output** unstructured masks rank the K weights feeding each output feature n, i.e. the
  column ``w[:, n]`` of our kernel, and prune exactly ``floor(s * K)`` of them per column;
* **per-layer** unstructured masks rank all ``K * N`` weights of the kernel together;
* **N:M** semi-structured masks keep the ``n`` highest-scoring weights in every group of ``m``
  consecutive *input* rows of each column (groups run along K, as the sparse tensor cores of
  NVIDIA Ampere+ expect for 2:4; Mishra et al. 2021).

All selection is by rank, never by threshold, so the counts are exact even with ties (ties go
to the lower index being pruned first, deterministically). Every function is jittable with a
static pattern; ``sparsity`` may be a traced scalar for per-layer / per-output masks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp

__all__ = [
    "Pattern",
    "global_masks",
    "is_nm",
    "mask_from_scores",
    "nm_mask",
    "parse_pattern",
    "prune_count",
    "rank_mask",
    "sparsity_of",
]


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: unstructured at ``sparsity`` (n = m = 0) or N:M (keep n of every m)."""

    sparsity: float = 0.0
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.m:
            if not 0 < self.n < self.m:
                raise ValueError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}")
            object.__setattr__(self, "sparsity", 1.0 - self.n / self.m)
        elif not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{round(self.sparsity * 100, 4):g}%"


def parse_pattern(p) -> Pattern:
    """``"50%"``, ``"0.5"``, ``0.5``, ``"2:4"``, ``"4:8"`` or a :class:`Pattern` → Pattern."""
    if isinstance(p, Pattern):
        return p
    if isinstance(p, int | float):
        return Pattern(sparsity=float(p))
    s = str(p).strip()
    if mt := re.fullmatch(r"(\d+)\s*:\s*(\d+)", s):
        return Pattern(n=int(mt[1]), m=int(mt[2]))
    if mt := re.fullmatch(r"(\d+(?:\.\d*)?)\s*%", s):
        return Pattern(sparsity=float(mt[1]) / 100)
    try:
        return Pattern(sparsity=float(s))
    except ValueError:
        raise ValueError(
            f"unknown sparsity pattern {p!r}; use e.g. '50%', '0.5', '2:4' or '4:8'"
        ) from None


def _ranks(score, axis: int):
    """Rank of every element along ``axis`` (0 = smallest; ties broken by position)."""
    order = jnp.argsort(score, axis=axis, stable=True)
    return jnp.argsort(order, axis=axis, stable=True).astype(jnp.int32)


def prune_count(sparsity, count: int):
    """``floor(sparsity * count)``: exact in Python for a float, f32 for a traced scalar."""
    if isinstance(sparsity, int | float):
        return int(math.floor(float(sparsity) * count + 1e-9))
    s = jnp.asarray(sparsity, jnp.float32)
    return jnp.floor(s * count + 1e-4).astype(jnp.int32)


def rank_mask(score, sparsity, axis: int | None = 0):
    """Keep-mask pruning exactly ``floor(sparsity * count)`` lowest scores, per column of
    ``score`` (``axis=0``: per output feature), per row (``axis=1``) or over all (``None``)."""
    score = jnp.asarray(score, jnp.float32)
    if axis is None:
        flat = score.reshape(1, -1)
        return rank_mask(flat, sparsity, axis=1).reshape(score.shape)
    k = prune_count(sparsity, score.shape[axis])
    return _rank_mask(score, jnp.asarray(k, jnp.int32), axis)


@functools.partial(jax.jit, static_argnums=2)
def _rank_mask(score, k, axis: int):
    count = score.shape[axis]
    order = jnp.argsort(score, axis=axis, stable=True)  # one sort, then scatter the ranks
    shape = [1, 1]
    shape[axis] = count
    keep = jnp.broadcast_to((jnp.arange(count) >= k).reshape(shape), score.shape)
    return jnp.put_along_axis(jnp.zeros(score.shape, bool), order, keep, axis=axis, inplace=False)


def nm_mask(score_KxN, n: int, m: int):
    """Keep the ``n`` highest scores in each group of ``m`` consecutive rows (along K) of every
    column; K must be a multiple of ``m``."""
    k, cols = score_KxN.shape
    if k % m:
        raise ValueError(f"N:M sparsity {n}:{m} needs the input dim K={k} to be a multiple of {m}")
    return _nm_mask(jnp.asarray(score_KxN, jnp.float32), n, m)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _nm_mask(score_KxN, n: int, m: int):
    k, cols = score_KxN.shape
    g = score_KxN.reshape(k // m, m, cols)
    if m > 16:
        return (_ranks(g, 1) >= m - n).reshape(k, cols)
    # small groups: ranks by pairwise comparison (no sort; fuses inside SparseGPT's loop), with
    # the stable sort's tie order: rank_j = #{i: s_i < s_j} + #{i < j: s_i == s_j}
    a, b = g[:, :, None, :], g[:, None, :, :]  # a = s_i, b = s_j
    before = jnp.arange(m)[:, None] < jnp.arange(m)[None, :]  # i < j
    lower = (a < b) | ((a == b) & before[None, :, :, None])
    ranks = jnp.sum(lower, axis=1)  # [K/m, m(j), N]
    return (ranks >= m - n).reshape(k, cols)


def mask_from_scores(score_KxN, pattern, per: str = "output"):
    """The keep-mask of ``pattern`` for one kernel: ``per`` is ``"output"`` (rank within each
    output column, Wanda) or ``"layer"`` (rank over the whole kernel); N:M ignores ``per``."""
    pat = parse_pattern(pattern)
    if pat.is_nm:
        return nm_mask(score_KxN, pat.n, pat.m)
    if per not in ("output", "layer"):
        raise ValueError(f"per must be 'output' or 'layer', got {per!r}")
    return rank_mask(score_KxN, pat.sparsity, axis=0 if per == "output" else None)


def global_masks(scores: dict, sparsity: float) -> dict:
    """Keep-masks pruning exactly ``floor(sparsity * total)`` lowest scores over all the given
    kernels together (global magnitude pruning); ``scores`` maps name → score array."""
    names = list(scores)
    sizes = [int(scores[k].size) for k in names]
    flat = jnp.concatenate([jnp.asarray(scores[k], jnp.float32).reshape(-1) for k in names])
    keep = rank_mask(flat[None, :], sparsity, axis=1)[0]
    out, off = {}, 0
    for k, sz in zip(names, sizes, strict=True):
        out[k] = keep[off : off + sz].reshape(scores[k].shape)
        off += sz
    return out


def sparsity_of(mask) -> float:
    """Fraction of pruned (False) entries."""
    mask = jnp.asarray(mask)
    return float(1.0 - jnp.mean(mask.astype(jnp.float32)))


def is_nm(mask_KxN, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive rows of every column keeps exactly ``n``."""
    k, cols = mask_KxN.shape
    if k % m:
        return False
    counts = jnp.sum(jnp.asarray(mask_KxN).reshape(k // m, m, cols), axis=1)
    return bool(jnp.all(counts == n))
