"""Tuned decode tile configurations for the fused Pallas kernels (measured, not guessed).

``TUNED[(kind, m_bucket)]`` holds :class:`~shrinkjax.kernels.layouts.TileConfig` fields
(``block_n``, ``block_k``, ``split_k``, ``num_warps``, ``num_stages``, optionally ``fma`` and
``late_scale``) measured at ``K = N = TUNED_SHAPE`` by ``benchmarks/kernels.py --sweep``, which
prints a replacement for the dict below. ``kind`` is :func:`~shrinkjax.kernels.layouts.kernel_kind`
(``int4_g128``, ``int8_g128``, ``mxfp4``, ``nvfp4``, ``2:4_bf16``, ``2:4_int4``; an ``int4_g*``
without an entry falls back to ``int4``); ``m_bucket`` is 1 (M = 1) or 16 (2 <= M <= 16).

``choose_config`` uses an entry for every field the caller did not set, rescales ``split_k`` to
keep about the same number of programs on other shapes, and falls back to its heuristics for
kinds/buckets without an entry and for M > 16.
"""

from __future__ import annotations

TUNED_SHAPE = (8192, 8192)  # (K, N) the entries were measured at

# Filled from a sweep on the target GPU (kinds/buckets without an entry: heuristics).
# 2026-11-27, NVIDIA H100 80GB HBM3 (K=N=8192), benchmarks/kernels.py --sweep --sweep-budget-s 170
TUNED: dict[tuple[str, int], dict] = {
    ("2:4_bf16", 1): {"block_n": 64, "block_k": 256, "split_k": 2, "num_warps": 4, "num_stages": 4},
    ("2:4_bf16", 16): {
        "block_n": 64,
        "block_k": 256,
        "split_k": 1,
        "num_warps": 4,
        "num_stages": 4,
    },
    ("int4_g128", 1): {
        "block_n": 64,
        "block_k": 256,
        "split_k": 1,
        "num_warps": 4,
        "num_stages": 3,
    },
    ("int4_g128", 16): {
        "block_n": 64,
        "block_k": 256,
        "split_k": 1,
        "num_warps": 4,
        "num_stages": 4,
    },
    ("mxfp4", 1): {"block_n": 64, "block_k": 64, "split_k": 8, "num_warps": 4, "num_stages": 4},
    ("mxfp4", 16): {"block_n": 64, "block_k": 64, "split_k": 4, "num_warps": 4, "num_stages": 4},
    ("nvfp4", 1): {"block_n": 64, "block_k": 128, "split_k": 8, "num_warps": 4, "num_stages": 4},
    ("nvfp4", 16): {"block_n": 64, "block_k": 128, "split_k": 4, "num_warps": 4, "num_stages": 4},
}

ENV_OVERRIDE = "SHRINKJAX_TUNED"  # path of a sweep's ``<out>.tuned.py``: its entries win


def read_snippet(path: str) -> dict:
    """The ``TUNED = {...}`` dict of a sweep's snippet file, read as a literal (never run)."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "TUNED" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise ValueError(f"{path}: no 'TUNED = {{...}}' assignment")


def _apply_override() -> None:
    import os

    path = os.environ.get(ENV_OVERRIDE, "")
    if path:
        TUNED.update(read_snippet(path))


_apply_override()


def m_bucket(m: int) -> int | None:
    """1 for M = 1, 16 for 2 <= M <= 16, None above (no tuned decode config)."""
    if m <= 1:
        return 1
    return 16 if m <= 16 else None


def lookup(kind: str | None, m: int) -> dict | None:
    """The tuned fields for ``kind`` at ``m`` rows, or None."""
    bucket = m_bucket(m)
    if kind is None or bucket is None:
        return None
    for k in (kind, kind.split("_g")[0]):
        hit = TUNED.get((k, bucket))
        if hit is not None:
            return dict(hit)
    return None
