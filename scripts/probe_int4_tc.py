"""GPU probe: the swapped-operand tensor-core int4 decode kernel (:mod:`shrinkjax.kernels.int4_tc`)
against the fused int4 kernel, ``torch._weight_int4pack_mm`` and cuBLAS bf16, same run.

Wall-clock timing and 4 warps (wgmma) only. Its successor for this kernel is
``scripts/probe_tc.py --kinds int4_g128`` (device time, 2 or 4 warps, 64-row programs, the
in-kernel sum of x), which found the current defaults.

    python scripts/probe_int4_tc.py --budget-s 300 --out probe_tc.json
    python scripts/probe_int4_tc.py --shapes 8192x8192 --ms 1,16
    python scripts/probe_int4_tc.py --shapes 4096x28672,14336x4096,4096x6144,4096x4096 --ms 1 \
        --splits 1,2,4,8,16 --block-ns 128     # the 8B decode's fused shapes, split-K

For each K x N and M: the fused kernel at its tuned tiles, torch's int4 and bf16 matmuls, then
a sweep of the kernel's tiles (block_n, warps, stages, split_k) within the budget (the first
cell gets 40% of it; winners are tried first on later cells), every config checked against the
float reference on fresh random x before it is timed. Timing and weight rotation (no L2 reuse)
are ``benchmarks/kernels.py``'s. Prints a line per cell and writes every config to the JSON.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

KEYS = ("block_n", "num_warps", "num_stages", "split_k", "xsum")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--out", default="probe_int4_tc.json")
    ap.add_argument("--shapes", default="8192x8192,4096x4096,4096x14336")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument(
        "--defaults-only",
        action="store_true",
        help="only the default tiles and split-K, once per --modes",
    )
    ap.add_argument("--modes", default="none,xla", help="xsum modes for --defaults-only")
    ap.add_argument("--splits", default="8,16,32", help="split_k values of the sweep")
    ap.add_argument("--block-ns", default="64,128,256", help="block_n values of the sweep")
    ap.add_argument(
        "--profile",
        default="",
        help="trace the first cell's best config and the fused kernel (3 x 16 calls each) with "
        "jax.profiler into this directory; summarise with scripts/trace_summary.py",
    )
    a = ap.parse_args(argv)
    t0 = time.perf_counter()

    import jax
    import kernels as KB  # benchmarks/kernels.py
    import numpy as np

    from shrinkjax.kernels import int4_tc as T
    from shrinkjax.kernels.int_matmul import int_matmul

    res = KB.probe_result()
    copy = res["copy_tbps"]
    block_ns = [int(v) for v in a.block_ns.split(",")]
    splits = [int(v) for v in a.splits.split(",")]
    grid = list(itertools.product(block_ns, (4,), (2, 3), splits, ("xla",)))
    if a.splits == "8,16,32" and a.block_ns == "64,128,256":  # the first sweep's extras
        grid += [(128, 4, 3, 8, "mma"), (128, 8, 3, 8, "xla"), (256, 8, 3, 8, "xla")]
    np.random.default_rng(0).shuffle(grid)
    if a.defaults_only:
        grid = [(T.DEFAULT_BLOCK_N, 4, 3, 0, mode) for mode in a.modes.split(",")]  # 0: default
    shapes = KB.parse_shapes(a.shapes)
    ms = [int(v) for v in a.ms.split(",")]
    cells = list(itertools.product(shapes, ms))
    for ci, ((k, n), m) in enumerate(cells):
        cell = KB.int4_probe_cell(k, n, m)
        ws, x, xs, ref, row = (cell[q] for q in ("ws", "x", "xs", "ref", "row"))
        nbytes = row["bytes"]
        row["copy_tbps"] = copy
        bns = sorted({*block_ns, T.DEFAULT_BLOCK_N})
        tcs = {bn: [T.pack_tc(w, bn) for w in ws] for bn in bns if n % bn == 0}
        jax.block_until_ready(tcs)
        if T.DEFAULT_BLOCK_N in tcs:  # the dispatch entry point at default settings
            from shrinkjax.kernels import dispatch

            packed = tcs[T.DEFAULT_BLOCK_N]
            exe = KB.build_multi(lambda x, t: dispatch.linear(x, t), xs, packed)
            row["dispatch_us"], _ = KB.time_compiled(exe, xs, packed)
            print(f"  dispatch.linear (defaults) {row['dispatch_us']:.1f} us", flush=True)
        left = a.budget_s - 5 - (time.perf_counter() - t0)
        cell_end = time.perf_counter() + (0.4 * left if ci == 0 else left / (len(cells) - ci))
        tried = []
        for cfg in grid if ci == 0 else KB.winners_first(grid, res["rows"], "tc_top", KEYS):
            if time.perf_counter() > cell_end:
                break
            kw = dict(zip(KEYS, cfg))
            if kw["split_k"] == 0 and kw["block_n"] in tcs:
                kw["split_k"] = T.default_split(tcs[kw["block_n"]][0])
            if n % kw["block_n"] or (T.round_up(k, T.CHUNK) // T.CHUNK) % kw["split_k"]:
                continue
            run = {q: v for q, v in kw.items() if q != "block_n"}
            packed = tcs[kw["block_n"]]
            try:
                y = T.int4_tc_matmul(x, packed[0], **run)
                err = KB.rel_err(y, ref)
                if not err < 1e-2:
                    tried.append(dict(cfg=kw, error=f"rel_err {err:.3g}"))
                    continue
                exe = KB.build_multi(lambda x, t, r=run: T.int4_tc_matmul(x, t, **r), xs, packed)
                us, _ = KB.time_compiled(exe, xs, packed)
                tried.append(dict(cfg=kw, us=us, rel_err=err))
            except Exception as e:  # noqa: BLE001
                tried.append(dict(cfg=kw, error=f"{type(e).__name__}: {str(e)[:300]}"))
        ok = sorted((t for t in tried if "us" in t), key=lambda t: t["us"])
        row.update(tc_tried=len(tried), tc_failed=sum("error" in t for t in tried))
        row["tc_top"] = ok[:6]
        row["tc_all"] = [(t["cfg"], round(t["us"], 2)) for t in ok]
        row["tc_errors"] = [t for t in tried if "error" in t][:3]
        if ok:
            row["tc_us"] = ok[0]["us"]
            row["tc_bw_frac"] = nbytes / (ok[0]["us"] * 1e-6) / 1e12 / copy
        row["fused_bw_frac"] = nbytes / (row["fused_us"] * 1e-6) / 1e12 / copy
        if a.profile and ci == 0 and ok:  # the best config of each xsum mode, and fused
            exes = [(KB.build_multi(lambda x, w: int_matmul(x, w, path="fused"), xs, ws), ws)]
            for mode in ("mma", "xla"):
                best = next((t["cfg"] for t in ok if t["cfg"]["xsum"] == mode), None)
                if best is None:
                    continue
                run = {q: v for q, v in best.items() if q != "block_n"}
                packed = tcs[best["block_n"]]
                fn = functools.partial(T.int4_tc_matmul, **run)
                exes.append((KB.build_multi(lambda x, t, fn=fn: fn(x, t), xs, packed), packed))
            for exe, w in exes:
                jax.block_until_ready(exe(xs, w))
            with jax.profiler.trace(a.profile, create_perfetto_trace=True):
                for _ in range(3):
                    for exe, w in exes:
                        jax.block_until_ready(exe(xs, w))
        res["rows"].append(row)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(
            f"{k}x{n} M={m}: tc {row.get('tc_us', float('nan')):.1f} us "
            f"({row.get('tc_bw_frac', float('nan')):.2f} of copy) best "
            f"{ok[0]['cfg'] if ok else row['tc_errors']}; fused {row['fused_us']:.1f} "
            f"({row['fused_bw_frac']:.2f}); torch int4 {row.get('torch_us')}, torch bf16 "
            f"{row.get('torch_bf16_us')}; tried {len(tried)} failed {row['tc_failed']}",
            flush=True,
        )
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
