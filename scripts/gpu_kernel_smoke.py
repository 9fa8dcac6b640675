"""GPU smoke test of the packed-weight Pallas kernels: PASS/FAIL per kernel and shape.

    python3 scripts/gpu_kernel_smoke.py            # native kernels (interpret mode on CPU)
    python3 scripts/gpu_kernel_smoke.py --kinds int4_g128,mxfp4 --labels decode,dequant

Runs each kernel once at a small ragged shape, decode shapes (M=1: tensor cores, CUDA-core FMA,
late scaling) and prefill shapes (M=300 fused; M=600 dequantize-then-cuBLAS, whose Pallas
dequantize pass must also equal the reference dequantization bit for bit) on fresh random
inputs, compares with the pure-jnp reference (relative Frobenius error < 1e-2) and prints the
exception text on failure. Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from shrinkjax.kernels import dequant, driver  # noqa: E402
from shrinkjax.kernels import layouts as L  # noqa: E402
from shrinkjax.kernels import reference as R  # noqa: E402
from shrinkjax.kernels.fp4_matmul import fp4_matmul  # noqa: E402
from shrinkjax.kernels.int_matmul import int_matmul  # noqa: E402
from shrinkjax.kernels.sparse_matmul import sparse24_matmul  # noqa: E402

SHAPES = [  # label, M, K, N, kernel keyword arguments
    ("small", 5, 512, 384, dict(fma=False)),
    ("decode", 1, 4096, 4096, dict(fma=False)),
    ("dec-fma", 1, 4096, 4096, dict(fma=True)),
    ("dec-late", 1, 4096, 4096, dict(late_scale=True)),
    ("dec-wide", 16, 4096, 4096, dict(block_n=256, split_k=2, num_stages=3)),
    ("prefill", 300, 1024, 512, dict(fma=False)),
    ("dequant", 600, 1024, 520, dict(path="dequant_dot")),
]
KINDS = ["int4_g128", "int4_g32_sym", "int8_g128", "mxfp4", "nvfp4", "2:4_bf16", "2:4_int4"]


def keep_24(rng, k, n):
    pairs = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    pat = pairs[rng.integers(0, 6, (k // 4, n))]
    keep = np.zeros((k // 4, 4, n), bool)
    j, c = np.meshgrid(np.arange(k // 4), np.arange(n), indexing="ij")
    keep[j, pat[..., 0], c] = True
    keep[j, pat[..., 1], c] = True
    return keep.reshape(k, n)


def build(kind, k, n, rng):
    if kind in ("int4_g128", "int8_g128"):
        bits = 4 if kind == "int4_g128" else 8
        codes = rng.integers(0, 2**bits, (k, n))
        scales = rng.uniform(0.5, 1.0, (k // 128, n)) / 2 ** (bits - 1)
        zeros = rng.integers(0, 2**bits, (k // 128, n))
        return int_matmul, L.pack_int(codes, scales, zeros, bits=bits, group=128)
    if kind == "int4_g32_sym":
        codes = rng.integers(0, 16, (k, n))
        return int_matmul, L.pack_int(codes, rng.uniform(0.05, 0.1, (k // 32, n)), group=32)
    if kind == "mxfp4":
        codes = rng.integers(0, 16, (k, n))
        return fp4_matmul, L.pack_mxfp4(codes, rng.integers(118, 124, (k // 32, n), np.uint8))
    if kind == "nvfp4":
        codes = rng.integers(0, 16, (k, n))
        return fp4_matmul, L.pack_nvfp4(codes, rng.uniform(0.1, 2.0, (k // 16, n)), 0.01)
    if kind == "2:4_bf16":
        keep = keep_24(rng, k, n)
        return sparse24_matmul, L.pack_24(np.where(keep, rng.standard_normal((k, n)) * 0.02, 0))
    if kind == "2:4_int4":
        keep = keep_24(rng, k, n)
        codes = rng.integers(0, 16, (k, n))
        scales = rng.uniform(0.002, 0.004, (k // 128, n))
        return sparse24_matmul, L.pack_24_int4(codes, scales, group=128, keep_KxN=keep)
    raise ValueError(kind)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--labels", default=",".join(s[0] for s in SHAPES))
    args = ap.parse_args()
    labels = set(args.labels.split(","))
    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__} backend={jax.default_backend()} device={dev.device_kind} "
        f"sms={getattr(dev, 'core_count', None)}",
        flush=True,
    )
    native = jax.default_backend() == "gpu"
    failures = 0
    rng = np.random.default_rng(0)
    for kind in args.kinds.split(","):
        for label, m, k, n, kw in SHAPES:
            if label not in labels:
                continue
            t = time.perf_counter()
            try:
                fn, p = build(kind, k, n, rng)
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                deq_ok, cfg = True, "dequant_dot"
                if kw.get("path") == "dequant_dot":
                    w = dequant.dequantize(p, interpret=not native)
                    want = R.dequantize(p)
                    u16 = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)
                    deq_ok = bool(jnp.all(u16(w) == u16(want)))
                else:
                    cfg = driver.config_for(p, m, **kw)
                y = jax.block_until_ready(fn(x, p, interpret=not native, **kw))
                ref = R.matmul_ref(x, p)
                a = np.asarray(y.astype(jnp.float32), np.float64)
                b = np.asarray(ref.astype(jnp.float32), np.float64)
                err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
                ok = err < 1e-2 and np.all(np.isfinite(a)) and y.shape == (m, n) and deq_ok
                status = "PASS" if ok else "FAIL"
                failures += not ok
                print(
                    f"{status} {kind:13s} {label:8s} M={m} K={k} N={n} rel_err={err:.2e} "
                    + ("" if deq_ok else "DEQUANT NOT BIT-EXACT ")
                    + f"cfg={cfg} {time.perf_counter() - t:.1f}s",
                    flush=True,
                )
            except Exception as e:
                failures += 1
                tb = traceback.format_exc()
                print(f"FAIL {kind:13s} {label:8s} M={m} K={k} N={n}: {type(e).__name__}: {e}")
                print("   " + tb[-3000:].replace("\n", "\n   "), flush=True)
    print(f"{'ALL PASS' if not failures else f'{failures} FAILURES'}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
