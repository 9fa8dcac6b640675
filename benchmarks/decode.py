"""Greedy decode throughput of a Llama-3-8B-shaped model: bf16 vs packed weights (GPU).

Random weights (speed only). Every decoder layer gets its own reference to ONE block's weight
arrays: each layer still streams its 218M weights (109 MB in int4, far beyond the 50 MB L2)
from HBM per token, while the whole model fits any card. Embeddings and lm_head stay bf16, as
quantization rules keep them. Decode rate = B * (T2 - T1) / (t(T2) - t(T1)): two generations of
different lengths from the same prompt cancel the prefill and launch overheads.

    python benchmarks/decode.py --out benchmarks/results/decode.json
    python benchmarks/decode.py --quick          # tiny shapes, CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shrinkjax.kernels import layouts  # noqa: E402
from shrinkjax.models.generate import generate  # noqa: E402
from shrinkjax.models.llama import LlamaConfig  # noqa: E402
from shrinkjax.models.params import model_from_params  # noqa: E402

LLAMA3_8B = LlamaConfig(
    vocab_size=128256,
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    hidden_dim=14336,
    rope_theta=500000.0,
    max_seq_len=8192,
    tie_embeddings=False,
    dtype="bfloat16",
)
QUICK = LLAMA3_8B.replace(
    vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512
)
LINEARS = (
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def linear_shapes(cfg):
    h = cfg.head_width
    return {
        "attn.q_proj": (cfg.dim, cfg.n_heads * h),
        "attn.k_proj": (cfg.dim, cfg.n_kv_heads * h),
        "attn.v_proj": (cfg.dim, cfg.n_kv_heads * h),
        "attn.o_proj": (cfg.n_heads * h, cfg.dim),
        "mlp.gate_proj": (cfg.dim, cfg.hidden_dim),
        "mlp.up_proj": (cfg.dim, cfg.hidden_dim),
        "mlp.down_proj": (cfg.hidden_dim, cfg.dim),
    }


def make_weight(fmt, k, n, rng):
    if fmt == "bf16":
        return jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02, jnp.bfloat16)
    if fmt == "int4_g128":
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        scales = (rng.random((k // 128, n), np.float32) + 0.5) * 0.003
        return layouts.pack_int(codes, scales, None, bits=4, group=128)
    if fmt == "mxfp4":
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        e8m0 = rng.integers(118, 124, (k // 32, n), dtype=np.uint8)
        return layouts.pack_mxfp4(codes, e8m0)
    if fmt == "2:4_bf16":
        dense = rng.standard_normal((k, n), np.float32) * 0.02
        keep = np.argsort(rng.random((k // 4, 4, n)), axis=1)[:, :2]  # 2 random rows of 4
        mask = np.zeros((k // 4, 4, n), bool)
        np.put_along_axis(mask, keep, True, axis=1)
        return layouts.pack_24((dense * mask.reshape(k, n)).astype(np.float32))
    raise ValueError(f"unknown format {fmt!r}")


def build_model(cfg, fmt, seed=0):
    import shrinkjax.kernels.fp4_matmul  # noqa: F401  (register kernels with dispatch)
    import shrinkjax.kernels.int_matmul  # noqa: F401
    import shrinkjax.kernels.sparse_matmul  # noqa: F401

    rng = np.random.default_rng(seed)
    block = {nm: make_weight(fmt, *shape, rng) for nm, shape in linear_shapes(cfg).items()}
    flat = {
        "embed.embedding": jnp.asarray(
            rng.standard_normal((cfg.vocab_size, cfg.dim), np.float32) * 0.02, jnp.bfloat16
        ),
        "norm.scale": np.ones(cfg.dim, np.float32),
        "lm_head.kernel": make_weight("bf16", cfg.dim, cfg.vocab_size, rng),
    }
    for i in range(cfg.n_layers):
        flat[f"layers.{i}.attn_norm.scale"] = np.ones(cfg.dim, np.float32)
        flat[f"layers.{i}.mlp_norm.scale"] = np.ones(cfg.dim, np.float32)
        for nm in LINEARS:
            flat[f"layers.{i}.{nm}.kernel"] = block[nm]
    return model_from_params(cfg, flat)


def weight_bytes(model_cfg, fmt, block_bytes):
    return block_bytes * model_cfg.n_layers + 2 * model_cfg.vocab_size * model_cfg.dim * 2


def decode_rate(model, batch, prompt_len, t1, t2, reps):
    prompt = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (batch, prompt_len))
    times = {}
    for t in (t1, t2):
        generate(model, prompt, t)  # compile + warm up
        best = []
        for _ in range(reps):
            s = time.perf_counter()
            out = generate(model, prompt, t)
            best.append(time.perf_counter() - s)
        assert out.shape == (batch, t)
        times[t] = float(np.median(best))
    return batch * (t2 - t1) / (times[t2] - times[t1]), times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--formats", default="bf16,int4_g128,mxfp4,2:4_bf16")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--t1", type=int, default=16)
    ap.add_argument("--t2", type=int, default=80)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cfg = QUICK if args.quick else LLAMA3_8B
    if args.quick:
        args.t1, args.t2, args.reps, args.prompt = 2, 4, 1, 8
    rows = []
    for fmt in args.formats.split(","):
        t0 = time.perf_counter()
        model = build_model(cfg, fmt)
        print(f"[{fmt}] built in {time.perf_counter() - t0:.1f}s", flush=True)
        for b in (int(x) for x in args.batches.split(",")):
            tps, times = decode_rate(model, b, args.prompt, args.t1, args.t2, args.reps)
            rows.append(
                {
                    "format": fmt,
                    "batch": b,
                    "tokens_per_s": tps,
                    "ms_per_step": 1000 * b / tps,
                    "times_s": times,
                }
            )
            print(f"  batch {b:3d}: {tps:10.1f} tok/s  ({1000 * b / tps:.2f} ms/step)", flush=True)
        del model
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["format"] == "bf16"}
    print(f"\n{'format':10s} {'batch':>5s} {'tok/s':>10s} {'ms/step':>8s} {'vs bf16':>8s}")
    for r in rows:
        rel = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        r["speedup_vs_bf16"] = rel
        print(
            f"{r['format']:10s} {r['batch']:5d} {r['tokens_per_s']:10.1f} "
            f"{r['ms_per_step']:8.2f} {rel:8.2f}"
        )
    result = {
        "device": jax.devices()[0].device_kind,
        "model": "llama3-8b-shape" if not args.quick else "quick",
        "prompt": args.prompt,
        "decode_tokens": args.t2 - args.t1,
        "decode": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
