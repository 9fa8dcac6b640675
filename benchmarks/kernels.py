"""Benchmark the packed-weight Pallas matmul kernels against XLA and PyTorch on one GPU.

    python3 benchmarks/kernels.py --out kernels.json            # full grid (< 6 min on H100)
    python3 benchmarks/kernels.py --quick --out kernels.json    # 8192x8192, M in 1/16/256/4096
    python3 benchmarks/kernels.py --sweep --out sweep.json      # decode tile sweep (tuning aid)

For every kernel (int4_g128, int8_g128, mxfp4, nvfp4, 2:4_bf16, 2:4_int4), K x N and M it
records (microseconds): our kernel, XLA bf16 ``jnp.dot``, XLA dequantize-then-dot (the jnp
reference), PyTorch bf16 matmul (cuBLAS) and PyTorch's own kernel where one exists
(``torch._weight_int4pack_mm`` for int4, ``to_sparse_semi_structured`` for 2:4 bf16; null
otherwise or on failure), plus the relative error against the reference on fresh random inputs
(checked before timing) and the fraction of the measured copy bandwidth achieved on the bytes
the kernel must move (packed weight + x + y).

Timing. JAX: one jitted executable makes R back-to-back calls, each on its own weight copy
(copies rotate so that more than 160 MB is touched between reuses: the 50 MB L2 never serves
a weight) and its own x; wall clock of the executable / R, median over trials. PyTorch:
``triton.testing.do_bench`` median (it flushes L2 before each run). Copy bandwidth: a 1 GiB
device-to-device copy, read + write bytes.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from shrinkjax.kernels import layouts as L  # noqa: E402
from shrinkjax.kernels import reference as R  # noqa: E402
from shrinkjax.kernels.fp4_matmul import fp4_matmul  # noqa: E402
from shrinkjax.kernels.int_matmul import int_matmul  # noqa: E402
from shrinkjax.kernels.sparse_matmul import sparse24_matmul  # noqa: E402

try:
    import torch
except Exception:  # pragma: no cover
    torch = None
try:
    from triton.testing import do_bench
except Exception:  # pragma: no cover
    do_bench = None

KERNELS = ["int4_g128", "int8_g128", "mxfp4", "nvfp4", "2:4_bf16", "2:4_int4"]
SHAPES = [(8192, 8192), (4096, 4096), (4096, 14336)]
MS = [1, 4, 16, 64, 256, 1024, 4096]
QUICK_SHAPES = [(8192, 8192)]
QUICK_MS = [1, 16, 256, 4096]
ROTATE_BYTES = 160e6  # > 3x the H100 L2
GROUP = 128
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


# ------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------

_PAIRS = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])


def _keep_24(rng, k, n):
    pat = _PAIRS[rng.integers(0, 6, (k // 4, n))]  # [K/4, N, 2]
    keep = np.zeros((k // 4, 4, n), bool)
    j, c = np.meshgrid(np.arange(k // 4), np.arange(n), indexing="ij")
    keep[j, pat[..., 0], c] = True
    keep[j, pat[..., 1], c] = True
    return keep.reshape(k, n)


def make_problem(kind, k, n, rng):
    """Packed weight + plain arrays (for the PyTorch kernels)."""
    plain = {}
    if kind in ("int4_g128", "int8_g128"):
        bits = 4 if kind == "int4_g128" else 8
        codes = rng.integers(0, 2**bits, (k, n), dtype=np.uint8)
        scales = (rng.uniform(0.5, 1.0, (k // GROUP, n)) / 2 ** (bits - 1)).astype(np.float32)
        zeros = rng.integers(0, 2**bits, (k // GROUP, n), dtype=np.uint8)
        p = L.pack_int(codes, scales, zeros, bits=bits, group=GROUP)
        plain = dict(codes=codes, scales=np.asarray(p.scales[: k // GROUP, :n]), zeros=zeros)
    elif kind == "mxfp4":
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        p = L.pack_mxfp4(codes, rng.integers(118, 124, (k // 32, n), dtype=np.uint8))
    elif kind == "nvfp4":
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        s = rng.uniform(0.1, 2.0, (k // 16, n)).astype(np.float32)
        p = L.pack_nvfp4(codes, s, 0.01)
    elif kind == "2:4_bf16":
        keep = _keep_24(rng, k, n)
        dense = np.where(keep, rng.standard_normal((k, n), dtype=np.float32) * 0.02, 0)
        p = L.pack_24(dense)
        plain = dict(dense=dense)
    elif kind == "2:4_int4":
        keep = _keep_24(rng, k, n)
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        scales = rng.uniform(0.002, 0.004, (k // GROUP, n)).astype(np.float32)
        p = L.pack_24_int4(codes, scales, None, group=GROUP, keep_KxN=keep)
    else:
        raise ValueError(kind)
    return p, plain


def kernel_fn(kind):
    if kind.startswith("int"):
        return int_matmul
    if kind.endswith("fp4"):
        return fp4_matmul
    return sparse24_matmul


def n_copies(nbytes):
    return int(max(2, min(48, math.ceil(ROTATE_BYTES / max(nbytes, 1)))))


def copies_of(tree, count):
    return [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree) for _ in range(count)]


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


def build_multi(fn, xs, ws):
    """Executable making len(xs) calls ``fn(xs[i], ws[i % len(ws)])`` (all distinct)."""
    nw = len(ws)

    def many(xs, ws):
        outs = []
        for i, x in enumerate(xs):
            if outs:  # call i runs after call i-1: XLA may not reorder the weight rotation
                x, _ = jax.lax.optimization_barrier((x, outs[-1]))
            outs.append(fn(x, ws[i % nw]))
        return outs

    return jax.jit(many).lower(xs, ws).compile()


def time_compiled(exe, xs, ws, budget_s=0.2):
    """Microseconds per call. Executions are queued back to back (JAX dispatch is async) and
    blocked on once per batch, so host dispatch overlaps the GPU work."""
    out = exe(xs, ws)
    jax.block_until_ready(out)
    t = time.perf_counter()
    out = exe(xs, ws)
    jax.block_until_ready(out)
    single = max(time.perf_counter() - t, 1e-6)
    reps = int(min(50, max(1, 0.03 / single)))
    batches = int(min(10, max(3, budget_s / (single * reps))))
    ts = []
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(reps):
            out = exe(xs, ws)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / reps)
    return statistics.median(ts) / len(xs) * 1e6, out


def torch_bench(fn):
    if do_bench is None:
        return None
    try:
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median")) * 1e3
    except TypeError:
        return float(do_bench(fn, warmup=10, rep=40, quantiles=[0.5])) * 1e3


def n_calls(m, n_weights=1):
    """Calls per timed executable: enough to amortize, and at least one per weight copy."""
    return min(48, max(16 if m <= 16 else (8 if m <= 256 else 2), n_weights))


def rel_err(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def copy_bandwidth():
    res = {}
    nbytes = 1 << 30
    try:
        a = jnp.zeros((nbytes,), jnp.uint8)
        f = jax.jit(lambda a: a + 1)
        jax.block_until_ready(f(a))
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            jax.block_until_ready(f(a))
            ts.append(time.perf_counter() - t)
        res["jax_copy_tbps"] = 2 * nbytes / statistics.median(ts) / 1e12
        del a
    except Exception as e:
        res["jax_copy_error"] = repr(e)
    if torch is not None and torch.cuda.is_available():
        try:
            a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            b = torch.empty_like(a)
            us = torch_bench(lambda: b.copy_(a))
            res["torch_copy_tbps"] = 2 * nbytes / (us * 1e-6) / 1e12
            del a, b
            torch.cuda.empty_cache()
        except Exception as e:
            res["torch_copy_error"] = repr(e)
    res["copy_tbps"] = res.get("torch_copy_tbps", res.get("jax_copy_tbps"))
    return res


# ------------------------------------------------------------------------------------------
# PyTorch baselines
# ------------------------------------------------------------------------------------------


def torch_kernel(kind, plain, k, n):
    """A callable x_t -> y_t running PyTorch's own kernel for this format, or None."""
    if torch is None or not torch.cuda.is_available():
        return None
    if kind == "int4_g128":
        q = plain["codes"].T  # [N, K]
        qb = ((q[:, ::2] << 4) | q[:, 1::2]).astype(np.uint8)
        wp = torch._convert_weight_to_int4pack(torch.from_numpy(np.ascontiguousarray(qb)).cuda(), 8)
        s = plain["scales"].astype(np.float32)
        z = (8.0 - plain["zeros"].astype(np.float32)) * s  # (q-8)*s + z == (q - zq)*s
        sz = torch.from_numpy(np.stack([s, z], -1)).to(torch.bfloat16).cuda().contiguous()
        return lambda x: torch._weight_int4pack_mm(x, wp, GROUP, sz)
    if kind == "2:4_bf16":
        from torch.sparse import to_sparse_semi_structured

        wt = torch.from_numpy(np.ascontiguousarray(plain["dense"].T)).to(torch.bfloat16).cuda()
        ws = to_sparse_semi_structured(wt)
        return lambda x: torch.nn.functional.linear(x, ws)
    return None


# ------------------------------------------------------------------------------------------
# main grid
# ------------------------------------------------------------------------------------------


def compile_jobs(jobs, workers):
    """jobs: {key: thunk}. Compiles in a thread pool (XLA/Triton release the GIL)."""
    out = {}
    if workers <= 1:
        for key, th in jobs.items():
            try:
                out[key] = th()
            except Exception as e:
                out[key] = e
        return out
    with cf.ThreadPoolExecutor(workers) as pool:
        futs = {pool.submit(th): key for key, th in jobs.items()}
        for f in cf.as_completed(futs):
            key = futs[f]
            try:
                out[key] = f.result()
            except Exception as e:
                out[key] = e
    return out


def empty_row(kind, m, k, n):
    row = dict(kernel=kind, M=m, K=k, N=n, us=None, bytes=None, xla_bf16_us=None)
    row.update(xla_dequant_us=None, torch_bf16_us=None, torch_us=None, bw_frac=None)
    row.update(rel_err=None)
    return row


def run_shape(k, n, ms, kernels, args, copy_tbps, rows, deadline):
    if time.perf_counter() > deadline - 30:
        log(f"shape K={k} N={n}: skipped (time budget)")
        for m in ms:
            for kind in kernels:
                rows.append(dict(empty_row(kind, m, k, n), error="skipped: time budget"))
        return
    rng = np.random.default_rng([args.seed, k, n])
    log(f"shape K={k} N={n}: building problems")
    probs = {}
    for kind in kernels:
        try:
            p, plain = make_problem(kind, k, n, rng)
            nbytes = L.packed_nbytes(p)
            probs[kind] = dict(p=p, plain=plain, ws=copies_of(p, n_copies(nbytes)), nbytes=nbytes)
        except Exception as e:
            log(f"  {kind}: problem build failed: {e!r}")
            probs[kind] = dict(error=repr(e))
    wb = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) * 0.02, jnp.bfloat16)
    wbs = copies_of(wb, n_copies(k * n * 2))
    del wb
    key = jax.random.PRNGKey(args.seed + k + n)
    n_w = [len(wbs)] + [len(pr["ws"]) for pr in probs.values() if "ws" in pr]
    xs_by_m = {}
    for m in ms:
        key, sub = jax.random.split(key)
        xs_by_m[m] = [
            jax.random.normal(s, (m, k), jnp.float32).astype(jnp.bfloat16)
            for s in jax.random.split(sub, max(n_calls(m, nw) for nw in n_w))
        ]

    def xs_for(m, ws):
        return xs_by_m[m][: n_calls(m, len(ws))]

    jobs = {}
    bf16_dot = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    for m in ms:
        jobs[("xla_bf16", m)] = lambda m=m: build_multi(bf16_dot, xs_for(m, wbs), wbs)
        for kind in kernels:
            pr = probs[kind]
            if "error" in pr:
                continue
            fn = kernel_fn(kind)
            xs = xs_for(m, pr["ws"])
            jobs[(kind, m)] = lambda xs=xs, pr=pr, fn=fn: build_multi(fn, xs, pr["ws"])
            jobs[(kind + "/ref", m)] = lambda xs=xs, pr=pr: build_multi(R.matmul_ref, xs, pr["ws"])
    log(f"  compiling {len(jobs)} executables with {args.jobs} threads")
    exes = compile_jobs(jobs, args.jobs)
    errs = [(key, v) for key, v in exes.items() if isinstance(v, Exception)]
    log(f"  compiled ({len(errs)} failures)")
    for key, v in errs[:6]:
        log(f"    compile failure {key}: {v!r}"[:600])

    wt = None
    if torch is not None and torch.cuda.is_available():
        wt = torch.randn(k, n, dtype=torch.bfloat16, device="cuda") * 0.02
    for m in ms:
        xla_bf16_us = torch_bf16_us = None
        e = exes.get(("xla_bf16", m))
        if not isinstance(e, Exception) and time.perf_counter() < deadline:
            try:
                xla_bf16_us, _ = time_compiled(e, xs_for(m, wbs), wbs)
            except Exception as ex:
                log(f"  xla_bf16 M={m}: {ex!r}")
        x_t = None
        if wt is not None:
            try:
                x_t = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                torch_bf16_us = torch_bench(lambda x_t=x_t: x_t @ wt)
            except Exception as ex:
                log(f"  torch bf16 M={m}: {ex!r}")
        for kind in kernels:
            row = empty_row(kind, m, k, n)
            row.update(xla_bf16_us=xla_bf16_us, torch_bf16_us=torch_bf16_us)
            rows.append(row)
            pr = probs[kind]
            if "error" in pr:
                row["error"] = pr["error"]
                continue
            if time.perf_counter() > deadline:
                row["error"] = "skipped: time budget"
                continue
            row["bytes"] = int(pr["nbytes"] + m * k * 2 + m * n * 2)
            p = pr["p"]
            cfg = L.config_for(p, m)
            row["cfg"] = [cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps]
            row["cfg"].append(cfg.num_stages)
            exe, ref = exes.get((kind, m)), exes.get((kind + "/ref", m))
            xs = xs_for(m, pr["ws"])
            try:
                y_ref = None
                if not isinstance(ref, Exception):
                    row["xla_dequant_us"], y_ref = time_compiled(ref, xs, pr["ws"])
                else:
                    row["ref_error"] = repr(ref)[:400]
                if isinstance(exe, Exception):
                    raise exe
                y = exe(xs, pr["ws"])  # correctness first, fresh random inputs
                if y_ref is None:
                    y_ref = [R.matmul_ref(xs[0], pr["ws"][0])]
                row["rel_err"] = rel_err(y[0], y_ref[0])
                row["us"], _ = time_compiled(exe, xs, pr["ws"])
                if copy_tbps:
                    row["bw_frac"] = row["bytes"] / (row["us"] * 1e-6) / (copy_tbps * 1e12)
            except Exception as ex:
                row["error"] = (repr(ex) + " | " + traceback.format_exc(limit=3))[-1500:]
            try:
                tk = torch_kernel(kind, pr["plain"], k, n) if x_t is not None else None
                if tk is not None:
                    yt = tk(x_t)
                    x_j = jnp.asarray(x_t.float().cpu().numpy(), jnp.bfloat16)
                    yr = R.matmul_ref(x_j, p)
                    row["torch_rel_err"] = rel_err(jnp.asarray(yt.float().cpu().numpy()), yr)
                    row["torch_us"] = torch_bench(lambda tk=tk, x_t=x_t: tk(x_t))
            except Exception as ex:
                row["torch_error"] = repr(ex)[:400]
            log(
                f"  {kind:9s} M={m:5d}: us={_f(row['us'])} xla_deq={_f(row['xla_dequant_us'])} "
                f"xla_bf16={_f(xla_bf16_us)} torch_bf16={_f(torch_bf16_us)} "
                f"torch={_f(row['torch_us'])} bw={_f(row['bw_frac'], 2)} "
                f"err={_f(row['rel_err'], 5)}"
                + (f" ERR {row['error'][:200]}" if "error" in row else "")
            )


def _f(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def print_table(rows):
    hdr = (
        f"{'kernel':10s} {'M':>5s} {'K':>5s} {'N':>6s} {'us':>8s} {'xla_bf16':>8s} "
        f"{'xla_deq':>8s} {'trch_bf16':>9s} {'torch':>8s} {'bw_frac':>7s} {'vs_cuBLAS':>9s} "
        f"{'rel_err':>8s}"
    )
    print("\n" + hdr)
    print("-" * len(hdr))
    for r in rows:
        sp = r["torch_bf16_us"] / r["us"] if r.get("us") and r.get("torch_bf16_us") else None
        print(
            f"{r['kernel']:10s} {r['M']:5d} {r['K']:5d} {r['N']:6d} {_f(r['us']):>8s} "
            f"{_f(r['xla_bf16_us']):>8s} {_f(r['xla_dequant_us']):>8s} "
            f"{_f(r['torch_bf16_us']):>9s} {_f(r['torch_us']):>8s} {_f(r['bw_frac'], 2):>7s} "
            f"{_f(sp, 2):>9s} {_f(r['rel_err'], 5):>8s}" + ("  ERR" if "error" in r else "")
        )


SWEEP_CFGS = [
    dict(),  # heuristic default
    dict(block_n=32),
    dict(block_n=128),
    dict(block_n=64, block_k=128),
    dict(block_n=64, block_k=512),
    dict(block_n=64, num_warps=8),
    dict(block_n=64, num_stages=2),
    dict(block_n=128, num_warps=8, block_k=512),
    dict(fma=True),
    dict(fma=True, block_n=128),
    dict(fma=True, block_n=32),
    dict(fma=True, block_k=512),
]


def run_sweep(kernels, args, copy_tbps):
    """Decode tile sweep on 8192x8192 for M in (1, 16): prints the best config per kernel."""
    k = n = 8192
    rng = np.random.default_rng(args.seed)
    out = []
    for kind in kernels:
        p, _ = make_problem(kind, k, n, rng)
        nbytes = L.packed_nbytes(p)
        ws = copies_of(p, n_copies(nbytes))
        for m in (1, 16):
            key = jax.random.PRNGKey(m)
            xs = [
                jax.random.normal(s, (m, k), jnp.float32).astype(jnp.bfloat16)
                for s in jax.random.split(key, n_calls(m, len(ws)))
            ]
            ref = R.matmul_ref(xs[0], ws[0])
            fn = kernel_fn(kind)
            jobs = {}
            for i, c in enumerate(SWEEP_CFGS):
                if c.get("fma") and m > 8:
                    continue
                splits = (None, "x2") if len(c) <= 1 else (None,)
                for split in splits:
                    cc = dict(c)
                    try:
                        if split:
                            cc["split_k"] = L.config_for(p, m, **cc).split_k * 2
                        L.config_for(p, m, **cc)  # validates
                    except Exception:
                        continue
                    f = lambda x, w, cc=cc: fn(x, w, **cc)
                    jobs[(i, split)] = lambda f=f: build_multi(f, xs, ws)
            exes = compile_jobs(jobs, args.jobs)
            best = None
            for key2, exe in exes.items():
                cfg = dict(SWEEP_CFGS[key2[0]], split=key2[1])
                rec = dict(kernel=kind, M=m, cfg=cfg)
                if isinstance(exe, Exception):
                    rec["error"] = repr(exe)[:300]
                else:
                    try:
                        us, y = time_compiled(exe, xs, ws)
                        rec.update(us=us, rel_err=rel_err(y[0], ref))
                        rec["bw_frac"] = (
                            (nbytes + m * k * 2 + m * n * 2) / (us * 1e-6) / (copy_tbps * 1e12)
                        )
                        if best is None or us < best["us"]:
                            best = rec
                    except Exception as ex:
                        rec["error"] = repr(ex)[:300]
                out.append(rec)
                log(f"  sweep {kind} M={m} {cfg}: {_f(rec.get('us'))} us {rec.get('error', '')}")
            if best:
                log(
                    f"BEST {kind} M={m}: {best['cfg']} {best['us']:.1f} us bw={best['bw_frac']:.2f}"
                )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="kernels_bench.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="decode tile sweep instead of the grid")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--shapes", default=None, help="e.g. 8192x8192,4096x14336 (K x N)")
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile threads")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop timing after this")
    ap.add_argument("--seed", type=int, default=None, help="default: fresh random each run")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(3), "little")

    kernels = [k for k in args.kernels.split(",") if k]
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (QUICK_MS if args.quick else MS)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = QUICK_SHAPES if args.quick else SHAPES
    dev = jax.devices()[0]
    info = dict(
        device=getattr(dev, "device_kind", str(dev)),
        jax=jax.__version__,
        torch=None if torch is None else torch.__version__,
        backend=jax.default_backend(),
        num_sms=getattr(dev, "core_count", None),
        seed=args.seed,
    )
    log("device", info)
    bw = copy_bandwidth()
    log("copy bandwidth", bw)
    result = dict(info, **bw, rows=[])
    deadline = T0 + args.budget_s

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.sweep:
        result["sweep"] = run_sweep(kernels, args, bw.get("copy_tbps") or 3.0)
        save()
        return
    for k, n in shapes:
        try:
            run_shape(k, n, ms, kernels, args, bw.get("copy_tbps"), result["rows"], deadline)
        except Exception as ex:
            log(f"shape {k}x{n} failed: {ex!r}\n{traceback.format_exc()}")
        save()
    print_table(result["rows"])
    save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
