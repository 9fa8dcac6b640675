"""Inspect what a Pallas (Triton lowering) kernel compiles to, on a machine without a GPU.

    pip install triton     # a separate venv is fine: only the compile step needs it
    python scripts/triton_sass.py int4_gemv --late --out /tmp/sass     # JAX side: lower to TTIR
    /path/to/triton-venv/bin/python scripts/triton_sass.py --compile /tmp/sass/int4_gemv.ttir

Step 1 (needs jax, no GPU) lowers a kernel for the ``cuda`` platform with ``pallas_call(...,
debug=True)`` and saves the Triton IR it prints (location info stripped, so another Triton's
parser reads it). Step 2 (needs the ``triton`` package, no GPU) compiles that TTIR for sm_90
(H100) and writes ``.ttgir``, ``.ptx``, ``.cubin`` and ``.sass`` beside it, then prints the
registers per thread, the programs that fit an SM by registers, and the SASS of the main loop:
instruction counts by opcode, global loads, barriers and shuffles. Layout conversions through
shared memory (``ttg.convert_layout``) inside the loop are counted from the TTGIR.

What this answers without device time: how many instructions the inner loop issues per weight,
whether loads sit at the top of the loop or are sunk next to their use (one memory latency per
use), whether barriers or shuffles run every iteration, and whether registers limit occupancy.
It does not time anything; ``benchmarks/kernels.py`` / ``scripts/probe_int4_gemv.py`` do.

Kernels: ``int4_gemv`` (:mod:`shrinkjax.kernels.int4_gemv`, ``--late``), ``int4_fused``
(:mod:`shrinkjax.kernels.int_matmul` at its tuned M = 1 tiles), ``int4_tc`` (env ``XSUM``,
``SPLIT``), ``mxfp4_tc`` / ``nvfp4_tc`` (:mod:`shrinkjax.kernels.fp4_tc`; env ``SPLIT``,
``SCALE_MODE``, ``XPREFETCH=0``, ``X_IN=kernel``) and ``sparse24_tc``
(:mod:`shrinkjax.kernels.sparse24_tc`; env ``SPLIT``, ``VALUES=int4``, ``X_IN=kernel``), at
K = N = 8192; env ``M``: rows of x (default 1), ``MMA_SYNC_MIN_N``: the 2-warp MMA's least
token side (:func:`shrinkjax.kernels.driver.mma_tokens`);
``decode_attention`` and ``decode_attention_update`` (:mod:`shrinkjax.kernels.decode_attention`,
the 8B heads, env ``S`` cache slots).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import io
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGS_PER_SM = 65536
KINDS = (
    "int4_gemv", "int4_fused", "int4_tc", "mxfp4_tc", "nvfp4_tc", "sparse24_tc", "decode_attention",
    "decode_attention_update",
)  # fmt: skip


def lower(kind: str, late: bool, out: str, warps: int, stages: int, block_n: int = 64) -> str:
    """Lower one kernel for CUDA on this (CPU) machine; returns the TTIR path."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import pallas as pl

    from shrinkjax.kernels import layouts as L

    orig = pl.pallas_call
    pl.pallas_call = lambda *a, **k: orig(*a, **{**k, "debug": True})
    k = n = 8192
    rng = np.random.default_rng(0)
    p = L.pack_int(
        rng.integers(0, 16, (k, n), dtype=np.uint8),
        np.full((k // 128, n), 0.01, np.float32),
        rng.integers(0, 16, (k // 128, n), dtype=np.uint8),
        bits=4,
        group=128,
    )
    x = jnp.ones((int(os.environ.get("M", 1)), k), jnp.bfloat16)  # env M: rows of x
    if kind == "int4_gemv":
        from shrinkjax.kernels import int4_gemv as G

        ops = G.gemv_operands(p)

        def f(x, w, s, o):
            return G.gemv_padded(
                x, w, s, o, k=k, n=n, pair=p.pair, group=p.group, block_n=256, rows=16,
                split_k=16, num_warps=warps, num_stages=stages, interpret=False, late=late,
            )  # fmt: skip

        args = (x, *ops)
    elif kind in ("int4_tc", "mxfp4_tc", "nvfp4_tc", "sparse24_tc"):  # the tc kernels' 2-D call
        kernel_2d, tc, extra = _tc_problem(kind, p, rng, k, n, block_n)
        tile = dict(split_k=int(os.environ.get("SPLIT", 4)), num_warps=warps, num_stages=stages)
        f = functools.partial(kernel_2d, **tile, **extra, interpret=False)
        args = (x, tc)
    elif kind == "decode_attention":  # one layer of the 8B decode: 32 heads, 8 KV heads
        from shrinkjax.kernels.decode_attention import decode_attention

        s_len = int(os.environ.get("S", 128))
        q = jnp.ones((1, 32, 128), jnp.bfloat16)
        kv = jnp.ones((1, s_len, 8, 128), jnp.bfloat16)
        f = functools.partial(decode_attention, num_warps=warps, num_stages=stages, interpret=False)
        args = (q, kv, kv, jnp.ones((1, s_len), bool))
    elif kind == "decode_attention_update":  # the same with RoPE and the cache write fused
        from shrinkjax.kernels.decode_attention import decode_attention_update

        s_len = int(os.environ.get("S", 128))
        q = jnp.ones((1, 32, 128), jnp.bfloat16)
        new = jnp.ones((1, 8, 128), jnp.bfloat16)
        kv = jnp.ones((1, s_len, 8, 128), jnp.bfloat16)
        cs = jnp.ones((1, 64), jnp.float32)
        f = functools.partial(
            decode_attention_update, num_warps=warps, num_stages=stages, interpret=False
        )
        args = (q, new, new, cs, cs, kv, kv, jnp.int32(5), jnp.ones((1, s_len), bool))
    elif kind == "int4_fused":
        from shrinkjax.kernels.int_matmul import int_matmul

        def f(x, p):
            return int_matmul(x, p, path="fused", interpret=False)

        args = (x, p)
    else:
        raise SystemExit(f"unknown kernel {kind!r}: {' | '.join(KINDS)}")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    text = buf.getvalue()
    if "The Triton module" not in text:
        raise SystemExit("no Triton module printed: is this jax's Pallas Triton lowering?")
    mod = text[text.index("\n", text.index("The Triton module")) + 1 :]
    lines = []
    for line in mod.splitlines():  # drop locations: jax's printer writes its own syntax
        if line.startswith("#loc") or re.match(r"\s*at #loc", line):
            continue
        line = re.sub(r' (\[unknown\]|"[^"]*"\(#loc\d*\)|loc\([^)]*\))', "", line)
        lines.append(line)
        if line == "}":
            break
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{kind}{'_late' if late else ''}.ttir")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {path} (compile it with --compile in a venv that has triton)")
    return path


def _tc_problem(kind, p, rng, k, n, block_n):
    """(kernel_2d, packed weight, extra keywords from the env) of a tensor-core kernel."""
    import numpy as np

    from shrinkjax.kernels import driver, fp4_tc, int4_tc, sparse24_tc
    from shrinkjax.kernels import layouts as L

    # the 2-warp MMA's least token side (N of the MMA, not the weight's N)
    driver.MMA_SYNC_MIN_N = int(os.environ.get("MMA_SYNC_MIN_N", driver.MMA_SYNC_MIN_N))

    if kind == "int4_tc":
        return int4_tc._tc_2d, int4_tc.pack_tc(p, block_n), {"xsum": os.environ.get("XSUM", "mma")}
    codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
    if kind == "sparse24_tc":
        keep = L.random_mask_24(rng, k, n)
        if os.environ.get("VALUES") == "int4":  # symmetric int4 codes, g128
            scales = np.full((k // 128, n), 0.01, np.float32)
            packed = L.pack_24_int4(codes, scales, None, group=128, keep_KxN=keep)
        else:
            packed = L.pack_24(np.where(keep, rng.standard_normal((k, n), dtype=np.float32), 0))
        extra = {"x_in": os.environ.get("X_IN", "xla")}
        return sparse24_tc._tc24_2d, sparse24_tc.pack_24_tc(packed, block_n), extra
    if kind == "mxfp4_tc":
        packed = L.pack_mxfp4(codes, np.full((k // 32, n), 120, np.uint8))
    else:
        packed = L.pack_nvfp4(codes, np.full((k // 16, n), 0.5, np.float32), 0.01)
    extra = {"scale_mode": os.environ.get("SCALE_MODE", "auto")}
    extra["x_prefetch"] = os.environ.get("XPREFETCH", "1") != "0"
    extra["x_in"] = os.environ.get("X_IN", "xla")
    return fp4_tc._fp4_tc_2d, fp4_tc.pack_fp4_tc(packed, block_n), extra


def compile_and_report(ttir: str, warps: int, stages: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    k = triton.compile(
        ttir,
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=warps, num_stages=stages),
    )
    base = ttir.rsplit(".", 1)[0]
    for key in ("ttgir", "ptx"):
        with open(f"{base}.{key}", "w") as fh:
            fh.write(k.asm[key])
    with open(f"{base}.cubin", "wb") as fh:
        fh.write(k.asm["cubin"])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(tools, "cuobjdump")
    sass = subprocess.run(
        [cuobjdump, "-sass", f"{base}.cubin"], capture_output=True, text=True, check=True
    ).stdout
    with open(f"{base}.sass", "w") as fh:
        fh.write(sass)
    res = subprocess.run(
        [cuobjdump, "-res-usage", f"{base}.cubin"], capture_output=True, text=True, check=True
    ).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    threads = 32 * warps
    print(f"{ttir}: {regs} registers/thread, {warps} warps, shared {k.metadata.shared} B")
    print(f"  programs per SM by registers: {REGS_PER_SM // (regs * threads)}")

    ttgir = k.asm["ttgir"]
    m = re.search(r"scf\.for.*?scf\.yield", ttgir, re.S)
    if m:
        body = m.group(0)
        print(
            f"  TTGIR loop: {body.count('ttg.convert_layout')} convert_layout, "
            f"{body.count('tt.reduce')} reduce, {body.count('tt.load')} load"
        )
    ins = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\d\s+)?([A-Z][A-Z0-9_.]*)", sass)
    back = [
        (int(a, 16), int(t, 16))
        for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+@!?P\d\s+BRA\s+0x([0-9a-f]+)", sass)
    ]
    loops = [(t, a) for a, t in back if t < a]
    if not loops:
        print("  no backward branch: no loop found in the SASS")
        return
    lo, hi = max(loops, key=lambda r: r[1] - r[0])
    ops = collections.Counter(op.split(".")[0] for addr, _, op in ins if lo <= int(addr, 16) <= hi)
    loads = [op for addr, _, op in ins if lo <= int(addr, 16) <= hi and op.startswith("LDG")]
    print(f"  SASS main loop 0x{lo:x}-0x{hi:x}: {sum(ops.values())} instructions")
    print("   ", ", ".join(f"{o} {c}" for o, c in ops.most_common(14)))
    print(f"    global loads: {collections.Counter(loads)}")
    print(f"    BAR {ops.get('BAR', 0)}, SHFL {ops.get('SHFL', 0)}, STS {ops.get('STS', 0)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kernel", nargs="?", default="int4_gemv", help=" | ".join(KINDS))
    ap.add_argument("--late", action="store_true", help="int4_gemv: late scaling")
    ap.add_argument("--out", default="/tmp/shrinkjax_sass")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--block-n", type=int, default=64, help="tc kernels: weight rows per program")
    ap.add_argument("--compile", default="", help="a .ttir from step 1: compile and report")
    a = ap.parse_args(argv)
    if a.compile:
        compile_and_report(a.compile, a.warps, a.stages)
    else:
        lower(a.kernel, a.late, a.out, a.warps, a.stages, a.block_n)


if __name__ == "__main__":
    main()
