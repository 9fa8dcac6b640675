"""GPU probe: the word-decoding int4 GEMV (:mod:`shrinkjax.kernels.int4_gemv`) against the
fused int4 kernel and ``torch._weight_int4pack_mm``, same weights, same run.

    python scripts/probe_int4_gemv.py --budget-s 240 --out probe.json
    python scripts/probe_int4_gemv.py --shapes 8192x8192 --ms 1 --small-grid --load-only

For each K x N of the kernel benchmark and M in {1, 4}: the fused kernel at its tuned tiles,
then a sweep of the GEMV's tiles (block_n, rows, split_k, warps, stages, late scaling) within
the budget — the first cell gets 35% of it, winners are tried first on later cells — each
config checked against the float reference on fresh random x before it is timed;
``--load-only`` also times each config with ``load_only=True`` (its weight loads alone). Timing
and weight rotation (no L2 reuse) are ``benchmarks/kernels.py``'s. Prints a line per cell and
writes every config tried to the JSON. Results: ``benchmarks/RESULTS.md`` (Pallas kernels).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

GEMV_KEYS = ("block_n", "rows", "split_k", "num_warps", "num_stages", "late")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--out", default="probe_int4_gemv.json")
    ap.add_argument("--shapes", default="8192x8192,4096x4096,4096x14336")
    ap.add_argument("--ms", default="1,4")
    ap.add_argument(
        "--load-only",
        action="store_true",
        help="also time the kernel's loads alone (one FMA per word, no decode; wrong result) "
        "with each config, to tell a decode bound from a memory bound",
    )
    ap.add_argument("--small-grid", action="store_true", help="48 configs at the auto split")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()

    import jax
    import kernels as KB  # benchmarks/kernels.py
    import numpy as np

    from shrinkjax.kernels.int4_gemv import gemv_operands, int4_gemv

    res = KB.probe_result()
    copy = res["copy_tbps"]

    if a.small_grid:  # (block_n, rows, split_k, warps, stages, late)
        grid = list(itertools.product((128, 256), (16, 32, 64), (None,), (4, 8), (1, 3), (0, 1)))
    else:
        grid = list(
            itertools.product(
                (64, 128, 256), (16, 32, 64), (None, 1, 2, 4), (4, 8), (1, 2, 3), (0, 1)
            )
        )
        np.random.default_rng(0).shuffle(grid)
    shapes = KB.parse_shapes(a.shapes)
    ms = [int(v) for v in a.ms.split(",")]
    n_cells = len(shapes) * len(ms)
    for ci, ((k, n), m) in enumerate(itertools.product(shapes, ms)):
        cell = KB.int4_probe_cell(k, n, m)
        p, ws, x, xs, ref, row = (cell[q] for q in ("p", "ws", "x", "xs", "ref", "row"))
        nbytes = row["bytes"]
        row["copy_tbps"] = copy
        ops = [gemv_operands(w) for w in ws]
        jax.block_until_ready(ops)
        left = a.budget_s - 5 - (time.perf_counter() - t0)
        cell_end = time.perf_counter() + (0.35 * left if ci == 0 else left / (n_cells - ci))
        tried = []
        for bn, rows, split, warps, stages, late in (
            grid if ci == 0 else KB.winners_first(grid, res["rows"], "gemv_top", GEMV_KEYS)
        ):
            if time.perf_counter() > cell_end:
                break
            if (n // 4) % (bn // 4) or n % bn:
                continue
            kw = dict(
                block_n=bn,
                rows=rows,
                split_k=split,
                num_warps=warps,
                num_stages=stages,
                late=bool(late),
            )
            try:
                y = int4_gemv(x, p, operands=ops[0], **kw)
                err = KB.rel_err(y, ref)
                if not err < 1e-2:
                    tried.append(dict(cfg=kw, error=f"rel_err {err:.3g}"))
                    continue

                def fn(x, w_ops, kw=kw):
                    return int4_gemv(x, p, operands=w_ops, **kw)

                exe = KB.build_multi(fn, xs, ops)
                us, _ = KB.time_compiled(exe, xs, ops)
                t = dict(cfg=kw, us=us, rel_err=err)
                if a.load_only:

                    def fl(x, w_ops, kw=kw):
                        return int4_gemv(x, p, operands=w_ops, load_only=True, **kw)

                    exe = KB.build_multi(fl, xs, ops)
                    t["load_only_us"], _ = KB.time_compiled(exe, xs, ops)
                tried.append(t)
            except Exception as e:  # noqa: BLE001
                tried.append(dict(cfg=kw, error=f"{type(e).__name__}: {str(e)[:200]}"))
        ok = sorted((t for t in tried if "us" in t), key=lambda t: t["us"])
        row["gemv_tried"] = len(tried)
        row["gemv_failed"] = sum("error" in t for t in tried)
        row["gemv_top"] = ok[:5]
        row["gemv_errors"] = [t for t in tried if "error" in t][:3]
        if ok:
            row["gemv_us"] = ok[0]["us"]
            row["gemv_bw_frac"] = nbytes / (ok[0]["us"] * 1e-6) / 1e12 / copy
        row["fused_bw_frac"] = nbytes / (row["fused_us"] * 1e-6) / 1e12 / copy
        res["rows"].append(row)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(
            f"{k}x{n} M={m}: fused {row['fused_us']:.1f} us ({row['fused_bw_frac']:.2f}), "
            f"gemv {row.get('gemv_us', float('nan')):.1f} us "
            f"({row.get('gemv_bw_frac', float('nan')):.2f}) best {ok[0]['cfg'] if ok else None}, "
            f"torch {row.get('torch_us')}, tried {len(tried)} failed {row['gemv_failed']}"
            + (f", load-only at best cfg {ok[0].get('load_only_us')}" if ok else ""),
            flush=True,
        )
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
