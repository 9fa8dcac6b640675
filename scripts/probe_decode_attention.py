"""GPU probe: device time of one layer's decode attention at the Llama-3-8B heads, per config.

    python scripts/probe_decode_attention.py --slots 80,128,1000 --out probe_attn.json

For each cache length S and tile configuration (``--block-s``, ``--stages``, ``--warps``), three
ways of one decode token's attention (B = 1, 32 query heads on 8 KV heads of width 128, bf16),
each as ``--calls`` chained calls in one jitted function (each call's output feeds the next, so
XLA keeps them all), timed from a ``jax.profiler`` trace (device busy time per call, all
kernels: the split combine and XLA's glue included):

- ``update``: :func:`~shrinkjax.kernels.decode_attention.decode_attention_update` (RoPE, cache
  write and attention in one kernel);
- ``kernel``: :func:`~shrinkjax.kernels.decode_attention.decode_attention` after XLA's RoPE and
  cache writes (``apply_rope`` + ``cache_write``, as the model's unfused path runs);
- ``xla``: the einsum path (no tile configuration; once per S).

Prints a table (µs per call) and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

B, N, K, H = 1, 32, 8, 128  # Llama-3-8B heads


def busy_us_per_call(fn, args, calls):
    """Device busy time per call (µs) of ``fn(*args)``, which chains ``calls`` calls."""
    import jax
    import trace_summary as TS

    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        with gzip.open(TS.newest_trace(d), "rt") as f:
            events = TS.device_events(json.load(f))
    events = [e for e in events if "memcpy" not in e["name"].lower()]
    return sum(float(e["dur"]) for e in events) / calls


def make(way, s_len, calls, tile):
    """A jitted chain of ``calls`` attention steps and its arguments."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from shrinkjax.kernels import decode_attention as DA
    from shrinkjax.models.kv_cache import cache_write
    from shrinkjax.models.llama import apply_rope, attention

    rng = np.random.default_rng(s_len)
    q = jnp.asarray(rng.standard_normal((B, N, H)), jnp.bfloat16)
    kn = jnp.asarray(rng.standard_normal((B, K, H)), jnp.bfloat16)
    kc = jnp.asarray(rng.standard_normal((B, s_len, K, H)), jnp.bfloat16)
    vc = jnp.asarray(rng.standard_normal((B, s_len, K, H)), jnp.bfloat16)
    ang = jnp.asarray(rng.uniform(0, 50, (B, H // 2)), jnp.float32)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    valid = jnp.ones((B, s_len), bool)
    index = jnp.int32(s_len - 1)

    def chain(q, kn, kc, vc, cos, sin):
        for _ in range(calls):
            if way == "update":
                out, kc, vc = DA.decode_attention_update(
                    q, kn, kn, cos, sin, kc, vc, index, valid, **tile
                )
            else:
                rope = (cos[:, None], sin[:, None])
                qr = apply_rope(q[:, None], *rope)  # [B, 1, N, H]
                kr = apply_rope(kn[:, None], *rope)
                kc, vc = cache_write(kc, kr, index), cache_write(vc, kn[:, None], index)
                if way == "kernel":
                    out = DA.decode_attention(qr[:, 0], kc, vc, valid, **tile)
                else:
                    out = attention(qr, kc, vc, valid[:, None]).reshape(B, N, H)
            q = out  # the next call's query: keeps every call
            kn = out[:, :K]
        return q, kc, vc

    return jax.jit(chain), (q, kn, kc, vc, cos, sin)  # (no donation: it runs twice)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slots", default="80,128,1000", help="cache lengths S")
    ap.add_argument("--block-s", default="32,64,128")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--ways", default="update,kernel,xla")
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    rows = []
    for s_len in ints(a.slots):
        for way in a.ways.split(","):
            grid = [None] if way == "xla" else []
            if way != "xla":
                grid = itertools.product(ints(a.block_s), ints(a.stages), ints(a.warps))
            for cfg in grid:
                tile = {}
                if cfg is not None:
                    tile = dict(block_s=cfg[0], num_stages=cfg[1], num_warps=cfg[2])
                try:
                    fn, args = make(way, s_len, a.calls, tile)
                    us = busy_us_per_call(fn, args, a.calls)
                    row = dict(slots=s_len, way=way, **tile, us=us)
                except Exception as e:  # a config Triton rejects (shared memory): reported
                    row = dict(slots=s_len, way=way, **tile, error=repr(e)[:300])
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'S':>5s} {'way':8s} {'block_s':>7s} {'stages':>6s} {'warps':>5s} {'us':>7s}")
    for r in rows:
        us = f"{r['us']:7.2f}" if "us" in r else "  ERR"
        cfg = [str(r.get(k, "-")) for k in ("block_s", "num_stages", "num_warps")]
        print(f"{r['slots']:5d} {r['way']:8s} {cfg[0]:>7s} {cfg[1]:>6s} {cfg[2]:>5s} {us}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"heads": dict(B=B, N=N, K=K, H=H), "calls": a.calls, "rows": rows}, f)


if __name__ == "__main__":
    main()
