"""GPU probe: the tensor-core decode kernels for int4 g128 (:mod:`shrinkjax.kernels.int4_tc`),
MXFP4 / NVFP4 (:mod:`shrinkjax.kernels.fp4_tc`) and 2:4 with bf16 or int4 values
(:mod:`shrinkjax.kernels.sparse24_tc`) against their split-half kernels
(:mod:`~shrinkjax.kernels.int_matmul`, :mod:`~shrinkjax.kernels.fp4_matmul`,
:mod:`~shrinkjax.kernels.sparse_matmul`, tuned tiles) and cuBLAS bf16, same run, device time
(one profiler trace per cell).

    python scripts/probe_tc.py --out probe_tc.json
    python scripts/probe_tc.py --kinds 2:4_bf16 --shapes 8192x8192 --ms 1,16 --full-grid 2
    python scripts/probe_tc.py --kinds int4_g128,mxfp4 --warps 2,4 --ms 1,4,16   # mma.sync

For each kind, K x N and M: the split-half kernel at its tuned tiles, torch's bf16 matmul,
then tensor-core kernel configs (block_n, num_stages, split_k as a multiple of the default,
and for FP4 at M = 1 the scale mode): the whole grid on the first ``--full-grid`` cells of a
kind, its best six so far plus the default elsewhere. Every config is checked against the
float reference on fresh random x before it is timed. Timing and weight rotation (no L2 reuse)
are ``benchmarks/kernels.py``'s. Prints a line per cell (bandwidth fractions count the packed
weight, x and y bytes against the copy bandwidth measured in the same run) and writes every
config to the JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

# split: x default_split; x_prefetch: fp4_tc "columns" only
KEYS = ("block_n", "num_stages", "split", "scale_mode", "num_warps", "x_prefetch")


def adapter(
    kind, block_ns=(64, 128, 256), warps=None, xsums=None, x_ins=None, stages=(2, 3, 4),
    modes=None, mults=(0.5, 1, 2),
):  # fmt: skip
    """(pack(w, bn), matmul(x, t, **kw), split-half fn, grid, default(t, m), kwargs(cfg, t, m)
    -> the matmul's keywords, or None where the config does not apply). ``warps``: the
    num_warps values of the grid (None: the kind's own; 2 makes Triton emit ``mma.sync``
    instead of Hopper's ``wgmma``, which needs 4 warps per warpgroup); ``xsums``: int4's
    ``sum_k x`` modes (None: ``"xla"``); ``x_ins``: 2:4's sources of x (None: ``"xla"``, XLA's
    by-position copy; ``"kernel"``: x read in place, ``sparse24_tc.X_IN_MODES``); ``stages``:
    num_stages values of the grid; ``mults``: K splits as multiples of the kind's default (the
    product rounded down, at least 1); ``modes``: FP4's scale modes (None: ``"columns"``,
    ``"late"``; ``"late+kernel"``: "late" with x read in place, ``fp4_tc.X_IN_MODES``)."""
    from shrinkjax.kernels import fp4_tc as F
    from shrinkjax.kernels import int4_tc as T
    from shrinkjax.kernels import sparse24_tc as S
    from shrinkjax.kernels.fp4_matmul import fp4_matmul
    from shrinkjax.kernels.int_matmul import int_matmul
    from shrinkjax.kernels.sparse_matmul import sparse24_matmul

    if kind == "int4_g128":  # packs the split-half PackedInt (probe: ws = the source layout);
        # block_n is the program's rows: 64 runs half tiles of the default 128-row packing
        # (scale_mode's place holds xsum: "xla" (XLA's reduction) or "sum" (in the kernel))
        grid = itertools.product(
            block_ns, stages, mults, xsums or ("xla",), warps or (2, 4), (True,)
        )
        grid = list(grid)

        def kwargs(cfg, t, m):
            bn, stages, mult, xsum, nw, _ = cfg
            split = max(1, int(T.default_split(t, m, bn) * mult))
            if (t.kw // T.CHUNK) % split:
                return None
            return dict(split_k=split, num_stages=stages, num_warps=nw, rows=bn, xsum=xsum)

        def default(t, m):
            c = T.resolve_tiles(t, m)
            return (c["rows"], c["num_stages"], 1, c["xsum"], c["num_warps"], True)

        def pack(w, bn):
            return T.pack_tc(w, max(bn, T.DEFAULT_BLOCK_N))

        return pack, T.int4_tc_matmul, int_matmul, grid, default, kwargs
    if kind in ("mxfp4", "nvfp4"):
        grid = itertools.product(
            block_ns,
            stages,
            mults,
            modes or ("columns", "late"),
            warps or (4, 8),
            (True, False),
        )  # 8 warps and x slabs loaded at use: the wide MMA's
        grid = [c for c in grid if (c[4] in (2, 4) and c[5]) or c[3] == "columns"]

        def kwargs(cfg, t, m):
            bn, stages, mult, mode, warps, x_prefetch = cfg
            mode, _, x_in = mode.partition("+")
            if mode == "columns" and m > F.COLUMNS_MAX_M:
                return None
            if not x_prefetch and (mode != "columns" or m == 1):
                return None
            cols = mode == "columns"
            split = max(1, int(F.default_split(t, cols, m) * mult))
            if (t.kw // (t.step_rows if cols else F.CHUNK)) % split:
                return None
            kw = dict(split_k=split, num_stages=stages, scale_mode=mode, num_warps=warps)
            kw["x_in"] = x_in or "xla"
            return kw if x_prefetch else {**kw, "x_prefetch": False}

        def default(t, m):  # what scale_mode="auto" runs
            c = F.resolve_tiles(t, m)
            mode, stages, warps = c["scale_mode"], c["num_stages"], c["num_warps"]
            return (F.DEFAULT_BLOCK_N, stages, 1, mode, warps, True)

        return F.pack_fp4_tc, F.fp4_tc_matmul, fp4_matmul, grid, default, kwargs
    if kind in ("2:4_bf16", "2:4_int4"):  # block_n: the program's rows (packed at least at
        # the kind's default tile: 64 on the int4 values' 128-row packing runs half tiles)
        grid = list(
            itertools.product((64, 128), stages, mults, x_ins or ("xla",), warps or (4,), (True,))
        )  # (scale_mode's place holds x_in)

        def packed_bn(is_int4):
            return S.DEFAULT_BLOCK_N_INT4 if is_int4 else S.DEFAULT_BLOCK_N

        def kwargs(cfg, t, m):
            bn, stages, mult, x_in, nw, _ = cfg
            split = max(1, int(S.default_split(t, m, bn, x_in) * mult))
            if (t.kw // S.SUPER) % split:
                return None
            return dict(split_k=split, num_stages=stages, num_warps=nw, rows=bn, x_in=x_in)

        def default(t, m):  # (on the kind's default packing)
            c = S.resolve_tiles(t, m)
            rows = c["rows"] if c["rows"] < t.block_n else packed_bn(t.is_int4)
            return (rows, c["num_stages"], 1, c["x_in"], c["num_warps"], True)

        def pack(w, bn):
            return S.pack_24_tc(w, max(bn, packed_bn(w.is_int4)))

        return pack, S.tc24_matmul, sparse24_matmul, grid, default, kwargs
    raise SystemExit(f"unknown kind {kind!r}: int4_g128 | mxfp4 | nvfp4 | 2:4_bf16 | 2:4_int4")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="probe_tc.json")
    ap.add_argument("--kinds", default="mxfp4,nvfp4,2:4_bf16")
    ap.add_argument("--shapes", default="8192x8192,4096x14336,4096x4096")
    ap.add_argument("--ms", default="1,16,4")
    ap.add_argument("--full-grid", type=int, default=2, help="cells that try the whole grid")
    ap.add_argument("--block-ns", default="64,128,256", help="block_n values of the grid")
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting cells after")
    ap.add_argument("--warps", default="", help="num_warps values of the grid (default: per kind)")
    ap.add_argument("--xsums", default="xla", help="int4_g128: xsum modes of the grid (xla,sum)")
    ap.add_argument("--x-ins", default="xla", help="2:4: sources of x of the grid (xla,kernel)")
    ap.add_argument("--stages", default="2,3,4", help="num_stages values of the grid")
    ap.add_argument("--modes", default="", help="FP4 scale modes (columns,late,late+kernel)")
    ap.add_argument("--split-mults", default="0.5,1,2", help="K splits: x the default split")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()

    import jax.numpy as jnp
    import kernels as KB  # benchmarks/kernels.py
    import numpy as np

    from shrinkjax.kernels import reference as R

    KB.FP4_LAYOUT = KB.SPARSE_LAYOUT = "split_half"  # the benchmark's problems, split-half
    res = KB.probe_result()
    copy = res["copy_tbps"]
    kinds = a.kinds.split(",")
    cells = list(
        itertools.product(kinds, KB.parse_shapes(a.shapes), [int(v) for v in a.ms.split(",")])
    )
    for ci, (kind, (k, n), m) in enumerate(cells):
        if time.perf_counter() - t0 > a.budget_s:
            print(f"budget: skipped {len(cells) - ci} cells", flush=True)
            break
        sh = KB.Shape(k, n, [kind], seed=ci)
        pr = sh.probs[kind]
        ws = pr["src_ws"] if kind == "int4_g128" else pr["ws"]  # (int4: ws are TcInt4)
        xs = sh.x(m, KB.n_calls(m, len(ws)))
        x = xs[0]
        ref = np.asarray(R.matmul_ref(x, ws[0]).astype(jnp.float32))
        bns = tuple(int(v) for v in a.block_ns.split(","))
        warps = tuple(int(v) for v in a.warps.split(",")) if a.warps else None
        xsums = tuple(a.xsums.split(","))
        x_ins = tuple(a.x_ins.split(","))
        stages = tuple(int(v) for v in a.stages.split(","))
        modes = tuple(a.modes.split(",")) if a.modes else None
        mults = tuple(float(v) for v in a.split_mults.split(","))
        pack, matmul, split_half, grid, default, kwargs = adapter(
            kind, bns, warps, xsums, x_ins, stages, modes, mults
        )
        tcs = {bn: [pack(w, bn) for w in ws] for bn in (64, 128, 256) if n % bn == 0}
        nbytes = int(KB.L.packed_nbytes(tcs[128][0]) + m * k * 2 + m * n * 2)
        row = dict(kind=kind, K=k, N=n, M=m, bytes=nbytes, copy_tbps=copy)
        dflt = default(tcs[128][0], m)
        cands = list(grid)  # (invalid ones are skipped below: kwargs -> None)
        if ci >= a.full_grid:
            cands = KB.winners_first(
                cands, [r for r in res["rows"] if r["kind"] == kind], "top", KEYS
            )
            cands = cands[:6]
        cands = [dflt] + cands  # first: a config equal to it is timed under the default's key
        jobs = {
            "split_half": lambda: KB.build_multi(
                lambda x, w: split_half(x, w, path="fused"), xs, ws
            )
        }
        jobs["xla_bf16"] = lambda: KB.build_multi(KB.bf16_dot, sh.x(m, len(xs)), sh.wbs)
        runs_kw, seen = {}, set()
        for cfg in dict.fromkeys(cands):
            bn = cfg[0]
            kw = kwargs(cfg, tcs[bn][0], m) if bn in tcs else None
            if kw is None or (bn, *kw.values()) in seen:
                continue
            seen.add((bn, *kw.values()))
            runs_kw[cfg] = kw
            jobs[cfg] = lambda kw=kw, bn=bn: KB.build_multi(
                lambda x, t: matmul(x, t, **kw), xs, tcs[bn]
            )
        exes = KB.compile_jobs(jobs, 8, time.perf_counter() + 240)
        runs, tried = {}, []
        for key, exe in exes.items():
            if isinstance(exe, Exception):
                tried.append(dict(cfg=key, error=f"{type(exe).__name__}: {str(exe)[:300]}"))
                continue
            wts = sh.wbs if key == "xla_bf16" else (ws if key == "split_half" else tcs[key[0]])
            xin = sh.x(m, len(xs)) if key == "xla_bf16" else xs
            if key != "xla_bf16":
                err = KB.rel_err(exe(xin, wts)[0], ref)
                if not err < 1e-2:
                    tried.append(dict(cfg=key, error=f"rel_err {err:.3g}"))
                    continue
            runs[key] = (exe, xin, wts)
        dev = KB.trace_device_times(runs)
        times = {key: span for key, (span, _) in dev.items()}
        for key in runs:
            if key not in times:  # no device trace: the wall clock
                times[key], _ = KB.time_compiled(*runs[key])
        for key, us in times.items():
            if isinstance(key, tuple):
                tried.append(dict(cfg=dict(zip(KEYS, key)), kw=runs_kw[key], us=us))
        ok = sorted((t for t in tried if "us" in t), key=lambda t: t["us"])
        row["split_half_us"] = times.get("split_half")
        row["xla_bf16_us"] = times.get("xla_bf16")
        if sh.wt is not None:
            import torch

            xt = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            row["torch_bf16_us"] = KB.torch_bench(lambda: xt @ sh.wt)
        row["top"] = ok[:6]
        row["errors"] = [t for t in tried if "error" in t][:4]
        if ok:
            row["tc_us"] = ok[0]["us"]
            row["tc_bw_frac"] = nbytes / (ok[0]["us"] * 1e-6) / 1e12 / copy
        default = times.get(dflt)
        row["tc_default_us"] = default
        res["rows"].append(row)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        tb = row.get("torch_bf16_us")
        print(
            f"{kind} {k}x{n} M={m}: tc {row.get('tc_us', float('nan')):.1f} us "
            f"({row.get('tc_bw_frac', float('nan')):.2f} of copy, "
            f"{(tb or float('nan')) / row.get('tc_us', float('nan')):.2f}x torch bf16) best "
            f"{ok[0]['cfg'] if ok else row['errors']}; default {default}; split-half "
            f"{row['split_half_us']}; torch bf16 {tb}; xla bf16 {row['xla_bf16_us']}; "
            f"tried {len(tried)}",
            flush=True,
        )
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
