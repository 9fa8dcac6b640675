"""Benchmark the packed-weight Pallas kernels against XLA and PyTorch on one GPU.

    python3 benchmarks/kernels.py --out kernels.json           # grid, --budget-s 300 (H100)
    python3 benchmarks/kernels.py --quick --out kernels.json   # 8192x8192, M in 1/16/256/4096
    python3 benchmarks/kernels.py --sweep --sweep-budget-s 170 --budget-s 250 --out k.json
    python3 benchmarks/kernels.py --sweep-only --out sweep.json

``--sweep`` runs the decode sweep first (``--sweep-budget-s``, default 240 s, includes building
its problems), applies the winners in-process, then the grid (``--budget-s`` counted from the
end of the sweep; for a plain run from startup). Results are saved after every cell and phase.

Grid. For every kernel (int4_g128, int8_g128, mxfp4, nvfp4, 2:4_bf16, 2:4_int4), K x N and M
it records (microseconds): our kernels on the default ``path="auto"`` (``us``; the fused decode
kernel below ``dispatch.PREFILL_MIN_M`` rows, dequantize-then-cuBLAS from there) and, for
M >= 256, both prefill paths (``fused_us``, ``dequant_dot_us``) plus the Pallas dequantize
pass alone (``dequant_us``); XLA bf16 ``jnp.dot`` (bf16 output, f32 accumulation); XLA
dequantize-then-dot (the jnp reference); PyTorch bf16 matmul (cuBLAS) and PyTorch's own kernel
where one exists (``torch._weight_int4pack_mm`` for int4, ``to_sparse_semi_structured`` for
2:4 bf16; null otherwise or on failure); the relative error against the reference on fresh
random inputs (checked before timing) and ``bw_frac``, the fraction of the copy bandwidth
measured in the same run achieved on the bytes the kernel must move (packed weight + x + y).
int4_g128 runs the tensor-core decode layout (``shrinkjax.kernels.int4_tc``: its kernel for
M <= 128, its Pallas dequantize + cuBLAS above; no ``fused_us`` there; ``--x-context``: traced
inside ``dispatch.opaque_input()`` by default, so its ``sum_k x`` per group is computed in the
kernel, as for any x no XLA fusion produces), and so do mxfp4 and
nvfp4 (``shrinkjax.kernels.fp4_tc``; ``--fp4-layout split_half`` runs their split-half kernels)
and both 2:4 kinds (``shrinkjax.kernels.sparse24_tc``; ``--sparse-layout split_half``); int8 runs
the split-half kernel. Cells run in priority order (8192x8192 first; M = 1,
16, 4096 first) and are skipped, not started, once the next one would pass ``--budget-s``; the
table and JSON are always written.

Sweep (``--sweep``; not int4: ``scripts/probe_int4_tc.py`` sweeps that kernel). For M in (1, 16)
at K = N = 8192 and the kernels of ``--sweep-kernels``,
``shrinkjax.kernels.autotune.search`` measures decode tile configurations (block_n, block_k,
split_k, num_warps, num_stages, late_scale, fma) most promising axes first within
``--sweep-budget-s`` (configs that fail to compile are recorded and skipped). The best per
(kernel, M) is printed with its bandwidth fraction, saved in the JSON (``decode``, ``sweep``)
and as a ``TUNED = {...}`` snippet for ``shrinkjax/kernels/tuned.py`` (``<out>.tuned.py``), and
applied in-process so the grid that follows uses it. It tunes the split-half kernels, so a run
with a sweep times MXFP4/NVFP4 and 2:4 in the split-half layouts throughout.

Timing. JAX: one jitted executable makes R back-to-back calls, each on its own weight copy
(copies rotate so that more than 160 MB is touched between reuses: the 50 MB L2 never serves
a weight) and its own x. ``--timing device`` (default): the device span of an execution / R
(first kernel start to last kernel end, from one ``jax.profiler`` trace per cell; median of 3),
so the host's per-execution work does not count (H100: it did for kernels under ~25 µs,
``scripts/probe_timing.py``); the wall clock is kept as ``*_wall_us`` and the kernels' summed
time as ``*_busy_us``. ``--timing wall`` (and the fallback when no device timeline is traced,
e.g. on CPU): wall clock of the executable / R, median over trials. PyTorch:
``triton.testing.do_bench`` median (it flushes L2 before each run). Copy bandwidth: a 1 GiB
device-to-device copy, read + write bytes.

JSON: ``{"device", "copy_tbps", "rows": [{"kernel", "M", "K", "N", "us", "bytes",
"xla_bf16_us", "torch_bf16_us", "torch_us", "bw_frac", "path", "fused_us", "dequant_dot_us",
"dequant_us", "dequant_bw_frac", "xla_dequant_us", "rel_err", "cfg", ...}],
"decode_tuning": [...], "sweep": [...], ...}`` where ``decode_tuning`` holds, per (kernel,
M <= 16) at 8192x8192, the default and (after a sweep) the best configuration with their times
and bandwidth fractions. The issue's ``"decode"`` list (greedy tokens/s of an 8B-shaped model)
is added by ``benchmarks/decode.py --kernels-json <this file>``.
The printed table's ``x_bf16`` is the faster bf16 baseline (XLA or cuBLAS) divided by ``us``.
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

from shrinkjax.kernels import autotune, dispatch, driver, tuned  # noqa: E402
from shrinkjax.kernels import dequant as DQ  # noqa: E402
from shrinkjax.kernels import fp4_tc as FT  # noqa: E402
from shrinkjax.kernels import int4_mgpu as IM  # noqa: E402
from shrinkjax.kernels import int4_tc as TC  # noqa: E402
from shrinkjax.kernels import layouts as L  # noqa: E402
from shrinkjax.kernels import reference as R  # noqa: E402
from shrinkjax.kernels import sparse24_tc as ST  # noqa: E402
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
SWEEP_KERNELS = ["mxfp4", "nvfp4", "2:4_bf16", "2:4_int4"]  # (int4: scripts/probe_int4_tc.py)
FP4_LAYOUT = "tc"  # --fp4-layout: MXFP4/NVFP4 as fp4_tc.TcFP4 ("tc") or split-half layouts
SPARSE_LAYOUT = "tc"  # --sparse-layout: 2:4 weights as sparse24_tc.Tc24 ("tc") or Packed24
SHAPES = [(8192, 8192), (4096, 14336), (4096, 4096)]  # (K, N), in priority order
MS = [1, 16, 4096, 256, 1024, 64, 4]  # priority order (rows are sorted for output)
QUICK_SHAPES = [(8192, 8192)]
QUICK_MS = [1, 16, 4096, 256]
SWEEP_MS = (1, 16)
ROTATE_BYTES = 160e6  # > 3x the H100 L2
GROUP = 128
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


# ------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------


def make_problem(kind, k, n, rng):
    """Packed weight + plain arrays (for the PyTorch kernels; ``plain["source"]``: the packed
    layout a tensor-core layout was converted from, which the XLA dequantize-then-dot baseline
    and the correctness reference read)."""
    plain = {}
    if kind in ("int4_g128", "int8_g128"):
        bits = 4 if kind == "int4_g128" else 8
        codes = rng.integers(0, 2**bits, (k, n), dtype=np.uint8)
        scales = (rng.uniform(0.5, 1.0, (k // GROUP, n)) / 2 ** (bits - 1)).astype(np.float32)
        zeros = rng.integers(0, 2**bits, (k // GROUP, n), dtype=np.uint8)
        p = L.pack_int(codes, scales, zeros, bits=bits, group=GROUP)
        scales_bf16 = np.asarray(p.scales[: k // GROUP, :n].astype(jnp.float32))
        plain = dict(codes=codes, scales=scales_bf16, zeros=zeros)
        if bits == 4:  # int4 runs in the tensor-core decode layout (kernels/int4_tc.py)
            plain["source"], p = p, TC.pack_tc(p, TC.DEFAULT_BLOCK_N)
    elif kind == "mxfp4":
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        p = L.pack_mxfp4(codes, rng.integers(118, 124, (k // 32, n), dtype=np.uint8))
        plain["source"], p = p, (FT.pack_fp4_tc(p) if FP4_LAYOUT == "tc" else p)
    elif kind == "nvfp4":
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        s = rng.uniform(0.1, 2.0, (k // 16, n)).astype(np.float32)
        p = L.pack_nvfp4(codes, s, 0.01)
        plain["source"], p = p, (FT.pack_fp4_tc(p) if FP4_LAYOUT == "tc" else p)
    elif kind == "2:4_bf16":
        keep = L.random_mask_24(rng, k, n)
        dense = np.where(keep, rng.standard_normal((k, n), dtype=np.float32) * 0.02, 0)
        p = L.pack_24(dense)
        plain = dict(dense=dense)
        plain["source"], p = p, (ST.pack_24_tc(p) if SPARSE_LAYOUT == "tc" else p)
    elif kind == "2:4_int4":
        keep = L.random_mask_24(rng, k, n)
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        scales = rng.uniform(0.002, 0.004, (k // GROUP, n)).astype(np.float32)
        p = L.pack_24_int4(codes, scales, None, group=GROUP, keep_KxN=keep)
        plain["source"], p = p, (ST.pack_24_tc(p) if SPARSE_LAYOUT == "tc" else p)
    else:
        raise ValueError(kind)
    return p, plain


def kernel_fn(kind):
    if kind == "int4_g128":
        return TC.tc_linear
    if kind.startswith("int"):
        return int_matmul
    if kind.endswith("fp4"):
        return FT.fp4_tc_linear if FP4_LAYOUT == "tc" else fp4_matmul
    if kind.startswith("2:4") and SPARSE_LAYOUT == "tc":
        return ST.tc24_linear
    return sparse24_matmul


def dots_per_chunk(kind) -> int:
    return {"int8_g128": 1, "2:4_bf16": 8, "2:4_int4": 8}.get(kind, 2)


def n_copies(nbytes):
    return int(max(2, min(48, math.ceil(ROTATE_BYTES / max(nbytes, 1)))))


def copies_of(tree, count):
    return [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree) for _ in range(count)]


class Shape:
    """The problems of one K x N: packed weights (rotating copies), bf16 weights, inputs."""

    def __init__(self, k, n, kernels, seed):
        self.k, self.n = k, n
        rng = np.random.default_rng([seed, k, n])
        self.probs = {}
        for kind in kernels:
            try:
                p, plain = make_problem(kind, k, n, rng)
                src = plain.pop("source", p)
                nbytes = L.packed_nbytes(p)
                ws = copies_of(p, n_copies(nbytes))
                # the XLA dequantize-then-dot baseline reads the source layout: the tensor-core
                # layouts' pure-jnp dequantize is a large HLO (e.g. Tc24 int4: ~90 s to compile)
                src_ws = ws if src is p else copies_of(src, len(ws))
                self.probs[kind] = dict(p=p, plain=plain, ws=ws, src_ws=src_ws, nbytes=nbytes)
            except Exception as e:
                log(f"  {kind}: problem build failed: {e!r}")
                self.probs[kind] = dict(error=repr(e))
        wb = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) * 0.02, jnp.bfloat16)
        self.wbs = copies_of(wb, n_copies(k * n * 2))
        self.key = jax.random.PRNGKey(seed + k + n)
        self.xs = {}
        self.wt = None
        if torch is not None and torch.cuda.is_available():
            self.wt = torch.randn(k, n, dtype=torch.bfloat16, device="cuda") * 0.02

    def x(self, m, count):
        """``count`` random bf16 x [m, K] (cached per m, grown on demand)."""
        have = self.xs.get(m, [])
        if len(have) < count:
            self.key, sub = jax.random.split(self.key)
            have = have + [
                jax.random.normal(s, (m, self.k), jnp.float32).astype(jnp.bfloat16)
                for s in jax.random.split(sub, count - len(have))
            ]
            self.xs[m] = have
        return have[:count]


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


def split_executions(events, gap_us):
    """[(start, end, busy)] µs per execution: device kernel events (memcpys dropped) split where
    the device idles longer than ``gap_us``."""
    events = sorted((e for e in events if "memcpy" not in e["name"].lower()), key=lambda e: e["ts"])
    segs, end = [], None
    for e in events:
        if end is None or e["ts"] - end > gap_us:
            segs.append([float(e["ts"]), 0.0, 0.0])
        end = max(end or 0.0, float(e["ts"]) + float(e["dur"]))
        segs[-1][1], segs[-1][2] = end, segs[-1][2] + float(e["dur"])
    return [tuple(sg) for sg in segs]


def trace_device_times(runs, reps=3, pause_s=0.005, gap_us=2000.0):
    """Device time per call of each executable in ``runs`` ({key: (exe, xs, ws)}), from one
    ``jax.profiler`` trace: ``{key: (span_us, busy_us)}`` (span: first kernel start to last
    kernel end of an execution; busy: the kernels' summed durations; both per call), or ``{}``
    when the trace cannot be split into the executions (e.g. no device timeline on CPU).

    Why: ``time_compiled``'s wall clock includes the host's work per execution (argument
    handling, one launch per kernel), which exceeds the device time of small kernels (H100,
    int4 4096², ``scripts/probe_timing.py``: 25 µs wall per call, 9 µs on the device). A model
    step launched as one graph sees the device time."""
    import gzip
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
    import trace_summary as TS

    keys = list(runs)
    try:
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for key in keys:
                    exe, xs, ws = runs[key]
                    for _ in range(reps):
                        jax.block_until_ready(exe(xs, ws))
                        time.sleep(pause_s)  # a gap that marks the execution's end
            with gzip.open(TS.newest_trace(d), "rt") as f:
                events = TS.device_events(json.load(f))
    except Exception as ex:  # noqa: BLE001  (no profiler: the caller keeps the wall clock)
        log(f"  device trace failed: {ex!r}"[:300])
        return {}
    segs = split_executions(events, gap_us)
    if len(segs) != reps * len(keys):
        log(f"  device trace: {len(segs)} executions for {reps * len(keys)} runs; wall clock kept")
        return {}
    out = {}
    for i, key in enumerate(keys):
        calls = len(runs[key][1])
        mine = segs[i * reps : (i + 1) * reps]
        out[key] = (
            statistics.median((b - a) / calls for a, b, _ in mine),
            statistics.median(busy / calls for _, _, busy in mine),
        )
    return out


def torch_bench(fn):
    if do_bench is None:
        return None
    try:
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median")) * 1e3
    except TypeError:
        return float(do_bench(fn, warmup=10, rep=40, quantiles=[0.5])) * 1e3


MAX_CALLS = 48


def n_calls(m, n_weights=1):
    """Calls per timed executable: enough to amortize, and at least one per weight copy."""
    return min(MAX_CALLS, max(16 if m <= 16 else (8 if m <= 256 else 2), n_weights))


def rel_err(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """``"8192x8192,4096x14336"`` -> [(K, N), ...]; a clear error for anything else."""
    out = []
    for item in spec.split(","):
        try:
            k, n = (int(v) for v in item.strip().split("x"))
        except ValueError:
            raise ValueError(f"shape {item!r}: expected KxN, e.g. 8192x8192") from None
        out.append((k, n))
    return out


def probe_result() -> dict:
    """The probes' result header: device, copy bandwidth (printed), empty rows."""
    res = {"device": str(jax.devices()[0].device_kind), "rows": []}
    res.update(copy_bandwidth())
    print(f"device {res['device']}, copy {res['copy_tbps']:.2f} TB/s", flush=True)
    return res


def copy_bandwidth():
    res = {}
    nbytes = 1 << (30 if jax.default_backend() == "gpu" else 24)
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


def compile_jobs(jobs, workers, deadline=None):
    """jobs: {key: thunk}. Compiles in a thread pool (XLA/Triton release the GIL); jobs not
    done by ``deadline`` are reported as TimeoutError and abandoned (never waited for)."""
    out = {}
    if not jobs:
        return out
    pool = cf.ThreadPoolExecutor(max(1, workers))
    futs = {pool.submit(th): key for key, th in jobs.items()}
    timeout = None if deadline is None else max(1.0, deadline - time.perf_counter())
    done, pending = cf.wait(futs, timeout=timeout)
    for f in done:
        try:
            out[futs[f]] = f.result()
        except Exception as e:
            out[futs[f]] = e
    for f in pending:
        out[futs[f]] = TimeoutError("compile did not finish within the time budget")
    pool.shutdown(wait=False, cancel_futures=True)
    return out


# ------------------------------------------------------------------------------------------
# PyTorch baselines
# ------------------------------------------------------------------------------------------


def torch_int4(plain):
    """``torch._weight_int4pack_mm`` (tinygemm) for the same int4 g128 weight.

    Packing (torch >= 2.5, CUDA): ``_convert_weight_to_int4pack(w, innerKTiles)`` takes a
    contiguous uint8 ``[N, K/2]`` with the even-k code in the high nibble; the scales-and-zeros
    tensor is bf16 ``[K/g, N, 2]`` and tinygemm computes ``(q - 8) * scale + zero``, so our
    ``(q - zq) * s`` uses ``zero = (8 - zq) * s``."""
    q = torch.from_numpy(np.ascontiguousarray(plain["codes"])).cuda()  # uint8 [K, N]
    qt = q.t().contiguous()  # [N, K]
    packed = ((qt[:, ::2] << 4) | qt[:, 1::2]).to(torch.uint8).contiguous()  # [N, K/2]
    if not packed.is_contiguous():
        raise RuntimeError(f"int4 input not contiguous: stride {packed.stride()}")
    wp = torch._convert_weight_to_int4pack(packed, 8)
    s = torch.from_numpy(np.ascontiguousarray(plain["scales"], np.float32)).cuda()
    zq = torch.from_numpy(np.ascontiguousarray(plain["zeros"])).cuda().float()
    sz = torch.stack([s, (8.0 - zq) * s], dim=-1).to(torch.bfloat16).contiguous()
    return lambda x: torch._weight_int4pack_mm(x.contiguous(), wp, GROUP, sz)


def torch_kernel(kind, plain):
    """A callable x_t -> y_t running PyTorch's own kernel for this format, or None."""
    if torch is None or not torch.cuda.is_available():
        return None
    if kind == "int4_g128":
        return torch_int4(plain)
    if kind == "2:4_bf16":
        from torch.sparse import to_sparse_semi_structured

        wt = torch.from_numpy(np.ascontiguousarray(plain["dense"].T)).to(torch.bfloat16).cuda()
        ws = to_sparse_semi_structured(wt)
        return lambda x: torch.nn.functional.linear(x, ws)
    return None


# ------------------------------------------------------------------------------------------
# grid
# ------------------------------------------------------------------------------------------


def int4_probe_cell(k, n, m, seed=0):
    """The int4 probes' shared cell (``scripts/probe_int4_*.py``): the int4 g128 weight as a
    split-half ``PackedInt`` with rotating copies, x, the f32 reference, and a row holding the
    same-run baselines (fused split-half kernel, torch int4, torch bf16 at M rows)."""
    sh = Shape(k, n, ["int4_g128"], seed)
    pr = sh.probs["int4_g128"]
    plain = pr["plain"]  # (the benchmark's own int4 weight is in the int4_tc layout)
    p = L.pack_int(plain["codes"], plain["scales"], plain["zeros"], bits=4, group=GROUP)
    ws = copies_of(p, len(pr["ws"]))
    x = sh.x(m, 1)[0]
    xs = sh.x(m, n_calls(m))
    row = dict(K=k, N=n, M=m, bytes=L.packed_nbytes(p))
    row["fused_us"], _ = time_compiled(
        build_multi(lambda x, w: int_matmul(x, w, path="fused"), xs, ws), xs, ws
    )
    tf = torch_kernel("int4_g128", plain)
    if tf is not None and sh.wt is not None:
        xt = torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda().to(torch.bfloat16)
        row["torch_us"] = torch_bench(lambda: tf(xt))
        row["torch_bf16_us"] = torch_bench(lambda: xt @ sh.wt)
    ref = np.asarray(R.int_matmul_ref(x, p).astype(jnp.float32))
    return dict(p=p, ws=ws, x=x, xs=xs, ref=ref, row=row)


def winners_first(grid, rows, top_key, keys):
    """``grid`` (tuples over ``keys``) reordered: configs in earlier rows' ``top_key`` first."""
    wins = []
    for r in rows:
        for t in r.get(top_key, []):
            key = tuple(t["cfg"][k] for k in keys)
            if key not in wins:
                wins.append(key)
    return wins + [g for g in grid if g not in wins]


def empty_row(kind, m, k, n):
    row = dict(kernel=kind, M=m, K=k, N=n, us=None, bytes=None, xla_bf16_us=None)
    row.update(torch_bf16_us=None, torch_us=None, bw_frac=None, path=None)
    row.update(fused_us=None, dequant_dot_us=None, dequant_us=None, xla_dequant_us=None)
    row.update(rel_err=None, cfg=None)
    return row


def bf16_dot(x, w):
    return jnp.dot(x, w)  # bf16 output; XLA/cuBLAS accumulate in f32


X_CONTEXT = "opaque"  # --x-context


def path_fn(fn, path):
    if X_CONTEXT == "opaque":  # x is an argument of the executable: no producer to fuse into

        def call(x, w):
            with dispatch.opaque_input():
                return fn(x, w, path=path)

        return call
    return lambda x, w: fn(x, w, path=path)


def dequant_only(x, p):
    del x  # the Pallas dequantize pass alone (timed like the matmuls, one call per copy)
    if isinstance(p, TC.TcInt4):
        return TC.dequantize_tc(p, interpret=driver.resolve_interpret(None))
    if isinstance(p, FT.TcFP4):
        return FT.dequantize_fp4_tc(p, interpret=driver.resolve_interpret(None))
    if isinstance(p, ST.Tc24):
        return ST.dequantize_24_tc(p, interpret=driver.resolve_interpret(None))
    return DQ.dequantize_padded(p, interpret=driver.resolve_interpret(None))


def dummy_x(count):
    return [jnp.zeros((8,), jnp.float32) for _ in range(count)]


def run_cell(sh: Shape, m, kernels, args, copy_tbps, rows, deadline):
    """Compile and time every kernel of one (shape, M) cell; appends one row per kernel."""
    k, n = sh.k, sh.n
    auto = dispatch.choose_path("auto", m)
    paths = [auto] + ([p for p in ("fused", "dequant_dot") if p != auto] if m >= 256 else [])
    jobs = {}
    xw = sh.x(m, n_calls(m, len(sh.wbs)))
    jobs["xla_bf16"] = lambda: build_multi(bf16_dot, xw, sh.wbs)
    for kind in kernels:
        pr = sh.probs[kind]
        if "error" in pr:
            continue
        xs = sh.x(m, n_calls(m, len(pr["ws"])))
        fn = kernel_fn(kind)
        for path in paths:
            if (
                path == "fused"
                and isinstance(pr["p"], TC.TcInt4 | FT.TcFP4 | ST.Tc24)
                and m > TC.MAX_M
            ):
                continue  # the tensor-core decode kernels take M <= 128
            f = path_fn(fn, path)
            jobs[(kind, path)] = lambda f=f, xs=xs, pr=pr: build_multi(f, xs, pr["ws"])
        jobs[(kind, "ref")] = lambda xs=xs, pr=pr: build_multi(R.matmul_ref, xs, pr["src_ws"])
        if m >= 256 and "dequant_us" not in pr:
            ws, xd = pr["ws"], dummy_x(len(pr["ws"]))
            jobs[(kind, "dequant")] = lambda ws=ws, xd=xd: build_multi(dequant_only, xd, ws)
    log(f"  M={m}: compiling {len(jobs)} executables")
    exes = compile_jobs(jobs, args.jobs, deadline)
    errs = [(key, v) for key, v in exes.items() if isinstance(v, Exception)]
    for key, v in errs[:8]:
        log(f"    compile failure {key}: {v!r}"[:600])

    xla_bf16_us = torch_bf16_us = x_t = None
    tracked = {}  # key -> [exe, xs, ws, [(row, field), ...]]: re-timed on the device below

    def track(key, exe, xs, ws, row, field):
        tracked.setdefault(key, [exe, xs, ws, []])[3].append((row, field))

    e = exes.get("xla_bf16")
    if e is not None and not isinstance(e, Exception):
        try:
            xla_bf16_us, _ = time_compiled(e, xw, sh.wbs)
        except Exception as ex:
            log(f"  xla_bf16 M={m}: {ex!r}")
    cell_rows = []
    if sh.wt is not None:
        try:
            x_t = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            torch_bf16_us = torch_bench(lambda: x_t @ sh.wt)
        except Exception as ex:
            log(f"  torch bf16 M={m}: {ex!r}")
    for kind in kernels:
        row = empty_row(kind, m, k, n)
        row.update(xla_bf16_us=xla_bf16_us, torch_bf16_us=torch_bf16_us, path=auto)
        rows.append(row)
        cell_rows.append(row)
        if xla_bf16_us is not None:
            track("xla_bf16", exes["xla_bf16"], xw, sh.wbs, row, "xla_bf16_us")
        pr = sh.probs[kind]
        if "error" in pr:
            row["error"] = pr["error"]
            continue
        p = pr["p"]
        row["bytes"] = int(pr["nbytes"] + m * k * 2 + m * n * 2)
        if auto == "fused" and isinstance(p, TC.TcInt4) and TC.resolve_backend(p, m) == "mgpu":
            row["cfg"] = ["int4_mgpu", *IM.tile_k_for(p.kw), IM.STEPS]  # tile_k, groups, steps
        elif auto == "fused" and isinstance(p, TC.TcInt4):
            with dispatch.opaque_input(X_CONTEXT == "opaque"):  # (as the timed calls)
                c = TC.resolve_tiles(p, m)
            row["cfg"] = ["int4_tc", *c.values()]  # rows, split_k, warps, stages, xsum
        elif auto == "fused" and isinstance(p, FT.TcFP4):
            with dispatch.opaque_input(X_CONTEXT == "opaque"):  # (as the timed calls)
                c = FT.resolve_tiles(p, m)
            row["cfg"] = ["fp4_tc", p.block_n, *c.values()]  # split, warps, stages, mode, x_in
        elif auto == "fused" and isinstance(p, ST.Tc24):
            with dispatch.opaque_input(X_CONTEXT == "opaque"):  # (as the timed calls)
                c = ST.resolve_tiles(p, m)
            row["cfg"] = ["sparse24_tc", *c.values()]  # rows, split_k, warps, stages, x_in
        elif auto == "fused":
            c = driver.config_for(p, m)
            row["cfg"] = [c.block_m, c.block_n, c.block_k, c.split_k, c.num_warps, c.num_stages]
            row["cfg"] += [c.fma, c.late_scale]
        xs = sh.x(m, n_calls(m, len(pr["ws"])))
        try:
            ref = exes.get((kind, "ref"))
            y_ref = None
            if ref is not None and not isinstance(ref, Exception):
                row["xla_dequant_us"], y_ref = time_compiled(ref, xs, pr["src_ws"])
                track((kind, "ref"), ref, xs, pr["src_ws"], row, "xla_dequant_us")
            else:
                row["ref_error"] = repr(ref)[:400]
                y_ref = [R.matmul_ref(xs[0], pr["src_ws"][0])]
            for path in paths:
                if (kind, path) not in jobs:
                    continue
                exe = exes.get((kind, path))
                if exe is None or isinstance(exe, Exception):
                    row[f"{path}_error"] = repr(exe)[:600]
                    continue
                y = exe(xs, pr["ws"])  # correctness first, fresh random inputs
                row[f"{path}_rel_err"] = rel_err(y[0], y_ref[0])
                row[f"{path}_us"], _ = time_compiled(exe, xs, pr["ws"])
                track((kind, path), exe, xs, pr["ws"], row, f"{path}_us")
            row["us"] = row[f"{auto}_us"]
            row["rel_err"] = row.get(f"{auto}_rel_err")
            if row["us"] is None:
                row["error"] = row.get(f"{auto}_error", "no result")
            elif copy_tbps:
                row["bw_frac"] = row["bytes"] / (row["us"] * 1e-6) / (copy_tbps * 1e12)
            exe = exes.get((kind, "dequant"))
            if exe is not None and not isinstance(exe, Exception):
                xd = dummy_x(len(pr["ws"]))
                pr["dequant_us"], _ = time_compiled(exe, xd, pr["ws"])
                track((kind, "dequant"), exe, xd, pr["ws"], row, "dequant_us")
            elif exe is not None:
                row["dequant_error"] = repr(exe)[:400]
            row["dequant_us"] = pr.get("dequant_us")
            if row["dequant_us"] and copy_tbps:  # packed read + bf16 [Kp, Np] write
                moved = pr["nbytes"] + 2 * p.kp * p.np_
                row["dequant_bw_frac"] = moved / (row["dequant_us"] * 1e-6) / (copy_tbps * 1e12)
        except Exception as ex:
            row["error"] = (repr(ex) + " | " + traceback.format_exc(limit=3))[-1500:]
        try:
            tk = torch_kernel(kind, pr["plain"]) if x_t is not None else None
            if tk is not None:
                yt = tk(x_t)
                x_j = jnp.asarray(x_t.float().cpu().numpy(), jnp.bfloat16)
                yr = R.matmul_ref(x_j, p)
                row["torch_rel_err"] = rel_err(jnp.asarray(yt.float().cpu().numpy()), yr)
                row["torch_us"] = torch_bench(lambda tk=tk: tk(x_t))
        except Exception as ex:
            row["torch_error"] = repr(ex)[:400]
    if args.timing == "device" and tracked:
        dev = trace_device_times({key: v[:3] for key, v in tracked.items()})
        for key, (_, _, _, targets) in tracked.items():
            if key not in dev:
                continue
            if key[-1] == "dequant":  # (measured once per shape, reused by later cells)
                sh.probs[key[0]]["dequant_us"] = dev[key][0]
            for row, field in targets:
                base = field[: -len("_us")]
                row[f"{base}_wall_us"], row[f"{base}_busy_us"] = row[field], dev[key][1]
                row[field] = dev[key][0]
        for row in cell_rows:
            row["timing"] = "device" if dev else "wall"
            if row.get("us") is not None:
                row["us"] = row[f"{auto}_us"]
                if copy_tbps:
                    row["bw_frac"] = row["bytes"] / (row["us"] * 1e-6) / (copy_tbps * 1e12)
            p = sh.probs[row["kernel"]].get("p")
            if row.get("dequant_us") and copy_tbps and p is not None:
                moved = sh.probs[row["kernel"]]["nbytes"] + 2 * p.kp * p.np_
                row["dequant_bw_frac"] = moved / (row["dequant_us"] * 1e-6) / (copy_tbps * 1e12)
    else:
        for row in cell_rows:
            row["timing"] = "wall"
    for row in cell_rows:
        kind, xla_bf16_us = row["kernel"], row["xla_bf16_us"]
        log(
            f"  {kind:9s} M={m:5d}: us={_f(row['us'])} ({auto}) fused={_f(row['fused_us'])} "
            f"deq_dot={_f(row['dequant_dot_us'])} deq={_f(row['dequant_us'])} "
            f"xla_deq={_f(row['xla_dequant_us'])} xla_bf16={_f(xla_bf16_us)} "
            f"torch_bf16={_f(torch_bf16_us)} torch={_f(row['torch_us'])} "
            f"bw={_f(row['bw_frac'], 2)} err={_f(row['rel_err'], 5)}"
            + (f" ERR {row['error'][:200]}" if "error" in row else "")
        )


def run_grid(shapes, ms, kernels, args, copy_tbps, rows, deadline, cache, save):
    est = 20.0  # seconds per cell until measured
    for k, n in shapes:
        for m in ms:
            now = time.perf_counter()
            if now + est > deadline or ((k, n) not in cache and now + 2 * est > deadline):
                log(f"K={k} N={n} M={m}: skipped (time budget)")
                for kind in kernels:
                    rows.append(dict(empty_row(kind, m, k, n), error="skipped: time budget"))
                continue
            t = time.perf_counter()
            try:
                if (k, n) not in cache:
                    log(f"shape K={k} N={n}: building problems")
                    cache[(k, n)] = Shape(k, n, kernels, args.seed)
                run_cell(cache[(k, n)], m, kernels, args, copy_tbps, rows, deadline)
            except Exception as ex:
                log(f"cell K={k} N={n} M={m} failed: {ex!r}\n{traceback.format_exc()}")
            est = max(5.0, time.perf_counter() - t)
            save()  # a killed run still leaves every finished cell


def _f(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def print_table(rows):
    hdr = (
        f"{'kernel':10s} {'M':>5s} {'K':>5s} {'N':>6s} {'us':>8s} {'fused':>8s} "
        f"{'deq_dot':>8s} {'deq':>6s} {'xla_bf16':>8s} {'xla_deq':>8s} {'trch_bf16':>9s} "
        f"{'torch':>8s} {'bw_frac':>7s} {'x_bf16':>9s} {'rel_err':>8s}"
    )
    print("\n" + hdr)
    print("-" * len(hdr))
    for r in rows:
        base = [v for v in (r.get("xla_bf16_us"), r.get("torch_bf16_us")) if v]
        sp = min(base) / r["us"] if r.get("us") and base else None
        print(
            f"{r['kernel']:10s} {r['M']:5d} {r['K']:5d} {r['N']:6d} {_f(r['us']):>8s} "
            f"{_f(r.get('fused_us')):>8s} {_f(r.get('dequant_dot_us')):>8s} "
            f"{_f(r.get('dequant_us')):>6s} {_f(r['xla_bf16_us']):>8s} "
            f"{_f(r.get('xla_dequant_us')):>8s} {_f(r['torch_bf16_us']):>9s} "
            f"{_f(r['torch_us']):>8s} {_f(r['bw_frac'], 2):>7s} {_f(sp, 2):>9s} "
            f"{_f(r.get('rel_err'), 5):>8s}" + ("  ERR" if "error" in r else "")
        )


def sort_rows(rows, shapes, kernels):
    order = {s: i for i, s in enumerate(shapes)}
    kord = {kk: i for i, kk in enumerate(kernels)}
    rows.sort(key=lambda r: (order.get((r["K"], r["N"]), 99), r["M"], kord.get(r["kernel"], 99)))


# ------------------------------------------------------------------------------------------
# decode sweep
# ------------------------------------------------------------------------------------------


def _explicit(cand):
    """A sweep candidate with every flag explicit (the tuned table must not fill gaps)."""
    return dict(cand, fma=bool(cand.get("fma")), late_scale=bool(cand.get("late_scale")))


def default_cfg(p, m):
    """The heuristic configuration (tuned table ignored) as sweep fields."""
    saved = dict(tuned.TUNED)
    tuned.TUNED.clear()
    try:
        c = driver.config_for(p, m)
    finally:
        tuned.TUNED.update(saved)
    return dict(
        block_n=c.block_n,
        block_k=c.block_k,
        split_k=c.split_k,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )


def sweep_pair(kind, m, pr, sh, args, copy_tbps, deadline):
    p = pr["p"]
    fn = kernel_fn(kind)
    k, n = sh.k, sh.n
    ws = pr["ws"]
    xs = sh.x(m, min(MAX_CALLS, max(4, len(ws))))
    ref = R.matmul_ref(xs[0], ws[0])
    nbytes = pr["nbytes"] + m * k * 2 + m * n * 2

    def normalize(cand):
        return driver.config_for(p, m, **_explicit(cand))

    def evaluate(cands):
        jobs = {}
        for i, c in enumerate(cands):
            kw = _explicit(c)
            f = lambda x, w, kw=kw: fn(x, w, **kw)
            jobs[i] = lambda f=f: build_multi(f, xs, ws)
        exes = compile_jobs(jobs, args.jobs, deadline + 20)
        out = []
        for i in range(len(cands)):
            exe = exes.get(i)
            if isinstance(exe, Exception):
                out.append(exe)
                continue
            try:
                us, y = time_compiled(exe, xs, ws, budget_s=0.05)
                err = rel_err(y[0], ref)
                out.append(us if err < 1e-2 else ValueError(f"wrong result: rel_err {err:.3g}"))
            except Exception as ex:
                out.append(ex)
        ok = {i: exes[i] for i, v in enumerate(out) if not isinstance(v, Exception)}
        if args.timing == "device" and ok:  # (correct results only; see trace_device_times)
            dev = trace_device_times({i: (e, xs, ws) for i, e in ok.items()})
            for i, (span, _) in dev.items():
                out[i] = span
        return out

    default = default_cfg(p, m)
    chunk = p.chunk
    best, records = autotune.search(
        evaluate,
        normalize,
        default=default,
        chunk=chunk,
        dots_per_chunk=dots_per_chunk(kind),
        m=m,
        weight_bytes_per_elem=pr["nbytes"] / (p.kp * p.np_),
        deadline=deadline,
        late_scale_ok=kind in ("int4_g128", "mxfp4", "nvfp4"),
        log=log if args.verbose else None,
    )
    for r in records:
        r.update(kernel=kind, M=m)
        if "us" in r and copy_tbps:
            r["bw_frac"] = nbytes / (r["us"] * 1e-6) / (copy_tbps * 1e12)
    d_rec = next((r for r in records if r["cfg"] == default and "us" in r), None)
    summary = dict(kernel=kind, M=m, K=k, N=n, bytes=int(nbytes), default_cfg=default)
    summary.update(default_us=d_rec and d_rec["us"], default_bw_frac=d_rec and d_rec["bw_frac"])
    summary["n_measured"] = sum("us" in r for r in records)
    summary["n_failed"] = sum(
        "error" in r and not r["error"].startswith(("skipped", "invalid")) for r in records
    )
    if best:
        summary.update(us=best["us"], cfg={kk: v for kk, v in best.items() if kk != "us"})
        if copy_tbps:
            summary["bw_frac"] = nbytes / (best["us"] * 1e-6) / (copy_tbps * 1e12)
    return summary, records


def run_sweep(kinds, args, copy_tbps, cache, result, save):
    k, n = args.sweep_shape
    deadline_all = time.perf_counter() + args.sweep_budget_s
    if (k, n) not in cache:
        log(f"sweep: building problems K={k} N={n}")
        cache[(k, n)] = Shape(k, n, sorted(set(kinds) | set(args.grid_kernels)), args.seed)
    sh = cache[(k, n)]
    pairs = [(kind, m) for kind in kinds for m in SWEEP_MS if "error" not in sh.probs[kind]]
    best_table = {}
    for i, (kind, m) in enumerate(pairs):
        left = deadline_all - time.perf_counter()
        if left < 1:
            log(f"sweep {kind} M={m}: skipped (sweep budget)")
            continue
        deadline = time.perf_counter() + left / (len(pairs) - i)
        log(f"sweep {kind} M={m}: {deadline - time.perf_counter():.0f} s")
        try:
            summary, records = sweep_pair(kind, m, sh.probs[kind], sh, args, copy_tbps, deadline)
        except Exception as ex:
            log(f"sweep {kind} M={m} failed: {ex!r}\n{traceback.format_exc()}")
            continue
        result["sweep"] += records
        result["decode_tuning"].append(summary)
        if summary.get("cfg"):
            best_table[(kind, m)] = summary["cfg"]
            log(
                f"BEST {kind} M={m}: {summary['cfg']} {summary['us']:.1f} us "
                f"bw={_f(summary.get('bw_frac'), 2)} (default {_f(summary['default_us'])} us, "
                f"bw={_f(summary['default_bw_frac'], 2)}; {summary['n_measured']} measured, "
                f"{summary['n_failed']} failed)"
            )
        save()
    snippet = autotune.format_table(best_table, device=result["device"], note=f" (K=N={k})")
    result["tuned_snippet"] = snippet
    print("\n" + snippet + "\n", flush=True)
    with open(os.path.splitext(args.out)[0] + ".tuned.py", "w") as f:
        f.write(snippet + "\n")
    tuned.TUNED.update(best_table)  # the grid below runs with the winners


def decode_from_rows(rows):
    """``decode`` entries from the grid (when no sweep ran): M <= 16 at the tuned shape."""
    out = []
    for r in rows:
        if r["M"] <= 16 and (r["K"], r["N"]) == tuned.TUNED_SHAPE and r.get("us"):
            out.append({kk: r.get(kk) for kk in ("kernel", "M", "K", "N", "us", "bw_frac", "cfg")})
    return out


def main(argv=None):
    global MAX_CALLS, FP4_LAYOUT, SPARSE_LAYOUT, X_CONTEXT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="kernels_bench.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="decode tile sweep, then the grid")
    ap.add_argument("--sweep-only", action="store_true", help="decode tile sweep only")
    ap.add_argument("--sweep-budget-s", type=float, default=240.0, help="sweep wall time")
    ap.add_argument("--sweep-kernels", default=",".join(SWEEP_KERNELS))
    ap.add_argument("--sweep-shape", default="x".join(map(str, tuned.TUNED_SHAPE)), help="K x N")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--shapes", default=None, help="e.g. 8192x8192,4096x14336 (K x N)")
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile threads")
    ap.add_argument("--budget-s", type=float, default=300.0, help="grid wall time (and startup)")
    ap.add_argument("--seed", type=int, default=None, help="default: fresh random each run")
    ap.add_argument("--verbose", action="store_true", help="log every sweep measurement")
    ap.add_argument("--max-calls", type=int, default=48, help="calls per timed executable")
    ap.add_argument(
        "--timing",
        default="device",
        choices=("device", "wall"),
        help="JAX rows: device time per call from a profiler trace (default; the wall clock "
        "is kept as *_wall_us) or the wall clock of back-to-back executions",
    )
    ap.add_argument(
        "--fp4-layout",
        default="tc",
        choices=("tc", "split_half"),
        help="MXFP4/NVFP4 weights as fp4_tc.TcFP4 (tensor-core decode kernel, default) or the "
        "split-half layouts of fp4_matmul (what --sweep tunes; a sweep implies split_half)",
    )
    ap.add_argument(
        "--sparse-layout",
        default="tc",
        choices=("tc", "split_half"),
        help="2:4 weights (bf16 and int4 values) as sparse24_tc.Tc24 (tensor-core decode "
        "kernel, default) or Packed24 (a sweep implies split_half)",
    )
    ap.add_argument(
        "--x-context",
        default="opaque",
        choices=("opaque", "fusible"),
        help="trace our kernels inside dispatch.opaque_input() (default: x is an argument of "
        "the timed executable, so no XLA fusion can host a reduction of x; int4 then sums x "
        "per group in its kernel) or as a linear whose x an XLA fusion produces (int4: XLA "
        "sums x as a kernel of its own, which a model fuses away)",
    )
    args = ap.parse_args(argv)
    MAX_CALLS, X_CONTEXT = args.max_calls, args.x_context
    FP4_LAYOUT = "split_half" if args.sweep or args.sweep_only else args.fp4_layout
    SPARSE_LAYOUT = "split_half" if args.sweep or args.sweep_only else args.sparse_layout
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(3), "little")
    args.sweep_shape = tuple(int(v) for v in args.sweep_shape.split("x"))
    args.grid_kernels = [k for k in args.kernels.split(",") if k]
    kernels = args.grid_kernels
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (QUICK_MS if args.quick else MS)
    if args.shapes:
        shapes = parse_shapes(args.shapes)
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
        prefill_min_m=dispatch.PREFILL_MIN_M,
        x_context=args.x_context,
    )
    log("device", info)
    bw = copy_bandwidth()
    log("copy bandwidth", bw)
    result = dict(info, **bw, rows=[], decode_tuning=[], sweep=[])
    cache = {}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    try:
        if args.sweep or args.sweep_only:
            kinds = [k for k in args.sweep_kernels.split(",") if k]
            if "int4_g128" in kinds:
                raise SystemExit(
                    "int4_g128 runs the tensor-core decode kernel; sweep its tiles with "
                    "scripts/probe_int4_tc.py (--sweep tunes the split-half kernels)"
                )
            run_sweep(kinds, args, bw.get("copy_tbps") or 3.0, cache, result, save)
            result["tuned_applied"] = {f"{k}|{m}": v for (k, m), v in tuned.TUNED.items()}
            save()
        if not args.sweep_only:
            # a plain run's budget counts from startup; after a sweep, from the sweep's end
            deadline = (time.perf_counter() if args.sweep else T0) + args.budget_s
            run_grid(
                shapes,
                ms,
                kernels,
                args,
                bw.get("copy_tbps"),
                result["rows"],
                deadline,
                cache,
                save,
            )
            sort_rows(result["rows"], shapes, kernels)
            if not result["decode_tuning"]:
                result["decode_tuning"] = decode_from_rows(result["rows"])
            print_table(result["rows"])
    except Exception as ex:
        log(f"failed: {ex!r}\n{traceback.format_exc()}")
    save()
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # do not wait for compile threads abandoned at the time budget
