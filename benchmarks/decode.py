"""Greedy decode throughput of a Llama-3-8B-shaped model: bf16 vs packed weights (GPU).

Random weights (speed only) at the real shape: 32 decoder layers, each holding its own device
copy of one randomly generated block (the host builds and packs one block, the device copies it
32 times: ~16 GB in bf16, ~5 GB in int4), so every token streams the whole model from HBM as a
real checkpoint would. Embeddings stay bf16; lm_head too (as the default quantization rules
keep it) unless ``--lm-head format`` packs it like the linears (a 128256 x 4096 bf16 lm_head is
1 GB: ~15% of an int4 step).

Every format runs the same model: by default with q/k/v and gate/up fused into one matmul each
(``--projections fused``, ``shrinkjax.models.fuse``: 5 matmuls per block, as serving stacks run
them); ``--projections separate`` keeps the 7.

Measured per (format, batch B): one jitted greedy loop of ``--steps`` decode steps (a
``lax.scan``; each step runs the full model on B tokens against the KV cache, starting at slot
``--prompt`` of a cache whose first ``--prompt`` slots are marked valid: their content does not
change the work), timed after a compile + warm-up call; tokens/s = B * steps / time. One compile
per (format, batch). ``--prefill-tokens P`` also times a P-token prefill per row (M = B * P rows
through every linear: the dequantize-then-cuBLAS path once M >= ``--prefill-min-m``).
(format, batch) cells that would start after ``--budget-s`` are skipped; the table and JSON are
always written.

    python benchmarks/decode.py --out benchmarks/results/decode.json   # H100: ~5-7 min
    python benchmarks/decode.py --quick                  # tiny shapes, CPU smoke (reference path)
    python benchmarks/decode.py --quick --interpret-kernels   # CPU, through the Pallas kernels
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shrinkjax.kernels import dispatch, driver, fp4_tc, int4_tc, layouts, sparse24_tc  # noqa: E402
from shrinkjax.models.kv_cache import init_cache  # noqa: E402
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
FORMATS = ("bf16", "int4_g128", "mxfp4", "2:4_bf16")
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def linear_shapes(cfg):
    """{linear: (K, N)} of one block (q/k/v and gate/up as one each when fused)."""
    h = cfg.head_width
    if cfg.fused_projections:
        return {
            "attn.qkv_proj": (cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * h),
            "attn.o_proj": (cfg.n_heads * h, cfg.dim),
            "mlp.gate_up_proj": (cfg.dim, 2 * cfg.hidden_dim),
            "mlp.down_proj": (cfg.hidden_dim, cfg.dim),
        }
    return {
        "attn.q_proj": (cfg.dim, cfg.n_heads * h),
        "attn.k_proj": (cfg.dim, cfg.n_kv_heads * h),
        "attn.v_proj": (cfg.dim, cfg.n_kv_heads * h),
        "attn.o_proj": (cfg.n_heads * h, cfg.dim),
        "mlp.gate_proj": (cfg.dim, cfg.hidden_dim),
        "mlp.up_proj": (cfg.dim, cfg.hidden_dim),
        "mlp.down_proj": (cfg.hidden_dim, cfg.dim),
    }


# --<kind>-layout flags: the weights each applies to, and its packed layouts ("tc", "split_half")
LAYOUT_FLAGS = {
    "int4": "int4_g128 as int4_tc.TcInt4 (tensor-core kernel) or PackedInt (fused)",
    "fp4": "mxfp4 as fp4_tc.TcFP4 (tensor-core kernel) or PackedMXFP4 (fused)",
    "sparse": "2:4_bf16 as sparse24_tc.Tc24 (tensor-core kernel) or Packed24 (fused)",
}


def make_weight(fmt, k, n, rng, packing=None):
    """One random [k, n] weight in ``fmt``; ``packing``: {"int4"|"fp4"|"sparse": "tc" or
    "split_half"} (default "tc" for all)."""
    tc = {kind: (packing or {}).get(kind, "tc") == "tc" for kind in LAYOUT_FLAGS}
    if fmt == "bf16":
        w = jax.random.normal(jax.random.PRNGKey(int(rng.integers(2**31))), (k, n), jnp.float32)
        return (w * 0.02).astype(jnp.bfloat16)
    if fmt == "int4_g128":
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        scales = (rng.random((k // 128, n), np.float32) + 0.5) * 0.003
        packed = layouts.pack_int(codes, scales, None, bits=4, group=128)
        return int4_tc.pack_tc(packed) if tc["int4"] else packed
    if fmt == "mxfp4":
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        e8m0 = rng.integers(118, 124, (k // 32, n), dtype=np.uint8)
        packed = layouts.pack_mxfp4(codes, e8m0)
        return fp4_tc.pack_fp4_tc(packed) if tc["fp4"] else packed
    if fmt == "2:4_bf16":
        dense = rng.standard_normal((k, n), np.float32) * 0.02
        packed = layouts.pack_24(
            np.where(layouts.random_mask_24(rng, k, n), dense, 0.0).astype(np.float32)
        )
        return sparse24_tc.pack_24_tc(packed) if tc["sparse"] else packed
    raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def _copy(tree):
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def build_model(cfg, fmt, seed=0, packing=None, lm_head="bf16"):
    """The model with ``fmt`` linears; each layer owns a device copy of one random block.
    ``packing``: as :func:`make_weight`; ``lm_head``: "bf16", or "format" for an lm_head in
    ``fmt`` too."""
    if lm_head not in ("bf16", "format"):
        raise ValueError(f"lm_head must be 'bf16' or 'format', got {lm_head!r}")
    import shrinkjax.kernels.fp4_matmul  # noqa: F401  (register kernels with dispatch)
    import shrinkjax.kernels.int_matmul  # noqa: F401
    import shrinkjax.kernels.sparse_matmul  # noqa: F401

    rng = np.random.default_rng(seed)
    block = {nm: make_weight(fmt, *shape, rng, packing) for nm, shape in linear_shapes(cfg).items()}
    key = jax.random.PRNGKey(seed)
    emb = jax.random.normal(key, (cfg.vocab_size, cfg.dim), jnp.float32)
    flat = {
        "embed.embedding": (emb * 0.02).astype(jnp.bfloat16),
        "norm.scale": np.ones(cfg.dim, np.float32),
        "lm_head.kernel": make_weight(
            fmt if lm_head == "format" else "bf16",
            cfg.dim,
            cfg.vocab_size,
            rng,
            packing,
        ),
    }
    del emb
    for i in range(cfg.n_layers):
        flat[f"layers.{i}.attn_norm.scale"] = np.ones(cfg.dim, np.float32)
        flat[f"layers.{i}.mlp_norm.scale"] = np.ones(cfg.dim, np.float32)
        for nm in block:
            flat[f"layers.{i}.{nm}.kernel"] = _copy(block[nm])
    nbytes = dict(
        linears=cfg.n_layers * sum(_nbytes(w) for w in block.values()),
        lm_head=_nbytes(flat["lm_head.kernel"]),
    )
    del block
    return model_from_params(cfg, flat), nbytes


def _nbytes(w):
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(w)))


def make_decode(graphdef, steps):
    """jit(state, cache, tok[B]) -> last tokens after ``steps`` greedy decode steps."""

    def run(state, cache, tok):
        model = nnx.merge(graphdef, state)

        def step(carry, _):
            tok, cache = carry
            logits, cache = model(tok[:, None], cache=cache)
            return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache), None

        (tok, _), _ = jax.lax.scan(step, (tok, cache), None, length=steps)
        return tok

    return jax.jit(run)


def make_prefill(graphdef):
    def run(state, cache, prompt):
        model = nnx.merge(graphdef, state)
        logits, _ = model(prompt, cache=cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

    return jax.jit(run)


def timed(fn, args, reps):
    """(seconds of the first call (compile + run), median seconds of ``reps`` more)."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return first, float(np.median(ts))


def profile_call(fn, fargs, args, tag, steps):
    """Device time of one more call, per decode step, by kernel (``scripts/trace_summary``)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
    import gzip

    import trace_summary

    out = os.path.join(args.profile, tag)
    with jax.profiler.trace(out, create_perfetto_trace=True):
        jax.block_until_ready(fn(*fargs))
    with gzip.open(trace_summary.newest_trace(out), "rt") as f:
        events = trace_summary.device_events(json.load(f))
    s = trace_summary.summarise(events, steps, 40, merge_numbered=True)
    log(
        f"  profile {tag}: busy {1000 * s['busy_ms_per_step']:.0f} us/step over a "
        f"{1000 * s['span_ms_per_step']:.0f} us/step span"
    )
    for r in s["kernels"][:25]:
        log(
            f"    {r['name'][:70]:<70} {1000 * r['ms_per_step']:8.1f} us/step "
            f"{r['calls_per_step']:5.1f} calls/step"
        )
    return s


def measure(model, batch, args, fmt=""):
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    p, steps = args.prompt, args.steps
    cache = init_cache(cfg, batch, p + steps)
    cache = cache.replace(valid=cache.valid.at[:, :p].set(True), index=jnp.asarray(p, jnp.int32))
    tok = jnp.asarray(np.random.default_rng(batch).integers(0, cfg.vocab_size, batch), jnp.int32)
    decode = make_decode(graphdef, steps)
    first, t = timed(decode, (state, cache, tok), args.reps)
    row = dict(batch=batch, tokens_per_s=batch * steps / t, ms_per_step=1000 * t / steps)
    row.update(compile_and_first_s=first, steps=steps, prompt=p)
    if args.profile:
        tag = f"{fmt}_b{batch}".replace(":", "")  # (a directory name)
        row["profile"] = profile_call(decode, (state, cache, tok), args, tag, steps)
    if args.prefill_tokens:
        cache = init_cache(cfg, batch, args.prefill_tokens)
        prompt = jnp.asarray(
            np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, args.prefill_tokens)),
            jnp.int32,
        )
        pf_first, pf = timed(make_prefill(graphdef), (state, cache, prompt), args.reps)
        row.update(prefill_ms=1000 * pf, prefill_tokens_per_s=batch * args.prefill_tokens / pf)
        row["prefill_rows"] = batch * args.prefill_tokens
        row["prefill_path"] = dispatch.choose_path("auto", row["prefill_rows"])
    return row


def run(cfg, args):
    """Rows of the (format, batch) grid; cells that would start after the budget are skipped."""
    deadline = T0 + args.budget_s
    batches = [int(x) for x in args.batches.split(",")]
    rows, est = [], 30.0
    for fmt in args.formats.split(","):
        if time.perf_counter() + est > deadline:
            log(f"[{fmt}] skipped (time budget)")
            rows += [dict(format=fmt, batch=b, error="skipped: time budget") for b in batches]
            continue
        t0 = time.perf_counter()
        try:
            model, nbytes = build_model(
                cfg,
                fmt,
                packing={kind: getattr(args, f"{kind}_layout") for kind in LAYOUT_FLAGS},
                lm_head=args.lm_head,
            )
        except Exception as e:
            log(f"[{fmt}] build failed: {e!r}")
            rows += [dict(format=fmt, batch=b, error=repr(e)[:500]) for b in batches]
            continue
        log(f"[{fmt}] built in {time.perf_counter() - t0:.1f}s, weights {nbytes}")
        for b in batches:
            if time.perf_counter() + est > deadline:
                log(f"  batch {b}: skipped (time budget)")
                rows.append(dict(format=fmt, batch=b, error="skipped: time budget"))
                continue
            t0 = time.perf_counter()
            try:
                row = dict(format=fmt, **measure(model, b, args, fmt))
                step_bytes = nbytes["linears"] + nbytes["lm_head"]
                row["weight_gbps"] = step_bytes / (row["ms_per_step"] / 1000) / 1e9
                log(
                    f"  batch {b:3d}: {row['tokens_per_s']:10.1f} tok/s "
                    f"({row['ms_per_step']:.2f} ms/step, weights {row['weight_gbps']:.0f} GB/s, "
                    f"first call {row['compile_and_first_s']:.1f}s)"
                    + (f" prefill {row['prefill_ms']:.1f} ms" if "prefill_ms" in row else "")
                )
            except Exception as e:
                row = dict(format=fmt, batch=b, error=repr(e)[:1000])
                log(f"  batch {b}: FAILED {e!r}"[:1000])
            rows.append(row)
            est = max(5.0, time.perf_counter() - t0)
        del model
    return rows


def print_table(rows):
    base = {
        r["batch"]: r["tokens_per_s"] for r in rows if r["format"] == "bf16" and "error" not in r
    }
    print(f"\n{'format':10s} {'batch':>5s} {'tok/s':>10s} {'ms/step':>8s} {'vs bf16':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['format']:10s} {r['batch']:5d} {'ERR':>10s}  {r['error'][:60]}")
            continue
        rel = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        r["speedup_vs_bf16"] = rel
        print(
            f"{r['format']:10s} {r['batch']:5d} {r['tokens_per_s']:10.1f} "
            f"{r['ms_per_step']:8.2f} {rel:8.2f}"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=64, help="cache slots already filled")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per timed call")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill-tokens", type=int, default=0, help="also time a prefill")
    ap.add_argument("--prefill-min-m", type=int, default=None, help="dispatch.PREFILL_MIN_M")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument(
        "--interpret-kernels",
        action="store_true",
        help="route packed weights through the Pallas kernels off-GPU (interpret mode)",
    )
    ap.add_argument(
        "--int4-xsum",
        default=None,
        choices=("none", "xla", "sum", "mma"),
        help="int4_tc's sum-of-x mode (default: int4_tc.DEFAULT_XSUM) outside batches "
        "int4_tc.FEW_TOKENS + 1 .. MID_TOKENS (9-32), which sum x on the tensor core",
    )
    ap.add_argument(
        "--int4-opaque-xsum",
        default=None,
        choices=("xla", "sum", "mma"),
        help="int4_tc's sum-of-x mode for o_proj, whose input XLA cannot fuse a reduction "
        "into (default: int4_tc.OPAQUE_XSUM)",
    )
    ap.add_argument(
        "--int4-tiles",
        default="default",
        choices=("default", "wgmma"),
        help="int4_tc's tiles: the defaults (M <= int4_tc.FEW_TOKENS: 64-row programs, 2 warps "
        "(mma.sync)) or the earlier ones (128-row programs, 4 warps (wgmma), about two per SM "
        "at every M)",
    )
    ap.add_argument(
        "--projections",
        default="fused",
        choices=("fused", "separate"),
        help="q/k/v and gate/up as one matmul each (shrinkjax.models.fuse; every format alike) "
        "or as 7 linears per block",
    )
    for kind, what in LAYOUT_FLAGS.items():
        ap.add_argument(f"--{kind}-layout", default="tc", choices=("tc", "split_half"), help=what)
    ap.add_argument(
        "--lm-head",
        default="bf16",
        choices=("bf16", "format"),
        help="lm_head in bf16 (default) or packed in the format of the linears",
    )
    ap.add_argument(
        "--attention",
        default="einsum",
        choices=("einsum", "pallas_decode", "pallas_decode_fused"),
        help="decode attention: XLA einsums, one Pallas kernel per layer after XLA's RoPE and "
        "cache writes, or one kernel doing all three (shrinkjax.kernels.decode_attention; "
        "LlamaConfig.attention_impl)",
    )
    ap.add_argument(
        "--norm",
        default="plain",
        choices=("plain", "deferred"),
        help="RMSNorm as written, or with its 1/rms applied after the next linears "
        "(LlamaConfig.deferred_norm, FlashNorm)",
    )
    ap.add_argument(
        "--profile",
        default="",
        help="trace one more call per cell into this directory; print device time by kernel",
    )
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--kernels-json",
        default="",
        help="also write the tokens/s rows as the 'decode' list of this kernels.json",
    )
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else LLAMA3_8B
    cfg = cfg.replace(
        fused_projections=args.projections == "fused",
        attention_impl=args.attention,
        deferred_norm=args.norm == "deferred",
    )
    if args.quick:
        args.steps, args.reps, args.prompt = min(args.steps, 4), 1, min(args.prompt, 8)
    saved = dispatch.PREFILL_MIN_M, driver.use_kernel_backend, int4_tc.DEFAULT_XSUM
    few_tokens, opaque_xsum = int4_tc.FEW_TOKENS, int4_tc.OPAQUE_XSUM
    if args.int4_opaque_xsum:
        int4_tc.OPAQUE_XSUM = args.int4_opaque_xsum
    if args.int4_xsum:
        int4_tc.DEFAULT_XSUM = args.int4_xsum
    if args.int4_tiles == "wgmma":  # whole tiles, 4 warps, two programs per SM at every M
        int4_tc.FEW_TOKENS = 0
    if args.prefill_min_m is not None:
        dispatch.PREFILL_MIN_M = args.prefill_min_m
    if args.interpret_kernels:
        driver.use_kernel_backend = lambda: True  # kernels pick interpret mode off-GPU
    try:
        rows = run(cfg, args)
        prefill_min_m = dispatch.PREFILL_MIN_M
    finally:
        dispatch.PREFILL_MIN_M, driver.use_kernel_backend, int4_tc.DEFAULT_XSUM = saved
        int4_tc.FEW_TOKENS, int4_tc.OPAQUE_XSUM = few_tokens, opaque_xsum
    print_table(rows)
    result = {
        "device": jax.devices()[0].device_kind,
        "int4_xsum": args.int4_xsum or int4_tc.DEFAULT_XSUM,
        "int4_tiles": args.int4_tiles,
        "int4_opaque_xsum": args.int4_opaque_xsum or int4_tc.OPAQUE_XSUM,
        **{f"{kind}_layout": getattr(args, f"{kind}_layout") for kind in LAYOUT_FLAGS},
        "lm_head": args.lm_head,
        "projections": args.projections,
        "attention": args.attention,
        "norm": args.norm,
        "model": "llama3-8b-shape" if not args.quick else "quick",
        "prompt": args.prompt,
        "decode_steps": args.steps,
        "prefill_min_m": prefill_min_m,
        "decode": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.kernels_json:  # the kernels.json carries the throughput as "decode"
        doc = {}
        if os.path.isfile(args.kernels_json):
            with open(args.kernels_json) as f:
                doc = json.load(f)
        doc["decode"] = [
            {k: r[k] for k in ("format", "batch", "tokens_per_s", "speedup_vs_bf16") if k in r}
            for r in rows
        ]
        doc["decode_model"] = result["model"]
        doc["decode_settings"] = {
            k: result[k] for k in ("device", "lm_head", "projections", "attention", "norm")
        }
        with open(args.kernels_json, "w") as f:
            json.dump(doc, f, indent=1)
    return result


if __name__ == "__main__":
    main()
