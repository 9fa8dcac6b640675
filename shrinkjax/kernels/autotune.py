"""Budgeted search over decode tile configurations (pure Python; the caller measures).

``search`` explores the fused kernel's tile space for one (kernel, M) in rounds, most
promising axes first, and stops when the deadline passes:

0. seeds: the current default plus ``block_n`` x ``split_k`` (wider coalesced rows of the
   packed weight; fewer, longer programs vs more programs per SM) at 4 warps / 4 stages and a
   ``block_k`` of at most 256 rows / 8 unrolled tiles;
1. the best with ``late_scale`` and with 8 warps, and the two best x pipeline depth
   (``num_stages``) and ``block_k``;
2. the best x ``num_warps`` (and ``late_scale``), plus (M = 1) the CUDA-core ``fma`` variant;
3. coordinate descent: one step up/down every axis from the best, until nothing is new.

Candidates are dicts of explicit tile fields. ``normalize(cand)`` returns a hashable
canonical config (raising ``ValueError`` for invalid ones) so that duplicates are measured
once; ``evaluate(cands)`` measures a batch (compiling in parallel is the caller's business)
and returns, per candidate, microseconds or an exception. ``block_k`` is capped so that one
loop step unrolls at most ``MAX_UNROLL_DOTS`` decoded tiles (Triton compile time grows quickly
with the unroll; the pipeline depth keeps loads in flight instead) and at 2048 rows, and
configurations whose pipelined shared memory would not fit are skipped unmeasured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

BLOCK_N = (64, 128, 256)
SPLIT_K = (1, 2, 4, 8)
NUM_WARPS = (2, 4, 8)
NUM_STAGES = (2, 3, 4)
MAX_BLOCK_K = 2048
MAX_UNROLL_DOTS = 16
SMEM_BYTES = 227 * 1024  # Hopper: shared memory per block


def block_k_options(chunk: int, dots_per_chunk: int) -> tuple[int, ...]:
    """Multiples of ``chunk`` (doubling) up to 2048 rows and ``MAX_UNROLL_DOTS`` tiles."""
    out, bk = [], chunk
    while bk <= MAX_BLOCK_K and (bk // chunk) * dots_per_chunk <= MAX_UNROLL_DOTS:
        out.append(bk)
        bk *= 2
    return tuple(out) or (chunk,)


def smem_estimate(cand: dict, *, m_tile: int, weight_bytes_per_elem: float) -> float:
    """Bytes of shared memory the pipelined loop stages: weight + x tiles per stage."""
    bk, bn = cand["block_k"], cand["block_n"]
    per_stage = bk * bn * weight_bytes_per_elem + m_tile * bk * 2
    return cand["num_stages"] * per_stage


def _near(options: Sequence[int], v: int) -> list[int]:
    """The neighbours of ``v`` in ``options`` (one step down and up)."""
    if v not in options:
        return list(options)
    i = options.index(v)
    return [options[j] for j in (i - 1, i + 1) if 0 <= j < len(options)]


def search(
    evaluate: Callable[[list[dict]], list],
    normalize: Callable[[dict], object],
    *,
    default: dict,
    chunk: int,
    dots_per_chunk: int,
    m: int,
    weight_bytes_per_elem: float,
    deadline: float,
    late_scale_ok: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[dict | None, list[dict]]:
    """Best candidate (dict with ``us``) and every record, within ``deadline``
    (``time.perf_counter()`` seconds)."""
    bks = block_k_options(chunk, dots_per_chunk)
    # seeds unroll at most 8 tiles (quick to compile); deeper unrolls come in round 1
    seed_bk = max([b for b in bks if b <= 256 and (b // chunk) * dots_per_chunk <= 8] or [chunk])
    seen: dict = {}
    records: list[dict] = []

    def fits(c: dict) -> bool:
        return smem_estimate(c, m_tile=16, weight_bytes_per_elem=weight_bytes_per_elem) <= (
            SMEM_BYTES
        )

    def run(cands: list[dict], label: str) -> None:
        batch = []
        for c in cands:
            if not c.get("fma") and not fits(c):
                records.append(dict(cfg=c, error="skipped: shared memory estimate", round=label))
                continue
            try:
                key = normalize(c)
            except Exception as e:  # invalid for this shape
                records.append(dict(cfg=c, error=f"invalid: {e}"[:200], round=label))
                continue
            if key in seen:
                continue
            seen[key] = c
            batch.append(c)
        if not batch or time.perf_counter() > deadline:
            return
        for c, res in zip(batch, evaluate(batch), strict=True):
            rec = dict(cfg=c, round=label)
            if isinstance(res, Exception) or res is None:
                rec["error"] = repr(res)[:300]
            else:
                rec["us"] = float(res)
            records.append(rec)
            if log:
                log(f"    {label} {c}: {rec.get('us', rec.get('error'))}")

    def ranked() -> list[dict]:
        return sorted((r for r in records if "us" in r), key=lambda r: r["us"])

    base = dict(block_k=seed_bk, num_warps=4, num_stages=4)
    seeds = [dict(default)] + [dict(base, block_n=bn, split_k=s) for bn in BLOCK_N for s in SPLIT_K]
    run(seeds, "seed")
    top = [r["cfg"] for r in ranked()[:2]]
    if top and time.perf_counter() < deadline:
        cands = []
        if late_scale_ok:
            cands.append(dict(top[0], late_scale=True))
        if top[0]["num_warps"] != 8:
            cands.append(dict(top[0], num_warps=8))
        for c in top:
            cands += [dict(c, num_stages=st) for st in NUM_STAGES if st != c["num_stages"]]
            cands += [dict(c, block_k=bk) for bk in bks if bk != c["block_k"]]
        run(cands, "depth")
    best = ranked()[0]["cfg"] if ranked() else None
    if best and time.perf_counter() < deadline:
        cands = [dict(best, num_warps=w) for w in NUM_WARPS if w != best["num_warps"]]
        if late_scale_ok and not best.get("late_scale"):
            cands.append(dict(best, late_scale=True))
        if m == 1:
            cands += [dict(best, fma=True, late_scale=False, block_n=bn) for bn in (32, 64, 128)]
        run(cands, "warps")
    while time.perf_counter() < deadline and ranked():
        best = ranked()[0]["cfg"]
        cands = [dict(best, block_n=v) for v in _near(BLOCK_N, best["block_n"])]
        cands += [dict(best, split_k=v) for v in _near(SPLIT_K, best["split_k"])]
        cands += [dict(best, num_stages=v) for v in _near(NUM_STAGES, best["num_stages"])]
        cands += [dict(best, num_warps=v) for v in _near(NUM_WARPS, best["num_warps"])]
        cands += [dict(best, block_k=v) for v in _near(bks, best["block_k"])]
        n_before = len(seen)
        run(cands, "descent")
        if len(seen) == n_before:
            break
    top = ranked()
    return (dict(top[0]["cfg"], us=top[0]["us"]) if top else None), records


def format_table(best: dict[tuple[str, int], dict], *, device: str, note: str = "") -> str:
    """Python source for ``shrinkjax/kernels/tuned.py``'s ``TUNED`` dict."""
    fields = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "fma", "late_scale")
    lines = [f"# measured on {device}{note} by benchmarks/kernels.py --sweep", "TUNED = {"]
    for (kind, m), cfg in sorted(best.items()):
        kv = ", ".join(f"{f!r}: {cfg[f]!r}" for f in fields if cfg.get(f) not in (None, False))
        lines.append(f"    ({kind!r}, {m}): {{{kv}}},")
    lines.append("}")
    return "\n".join(lines)
