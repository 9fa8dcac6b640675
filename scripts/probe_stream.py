"""GPU probe: how close to the copy bandwidth can a Pallas (Triton) kernel stream a packed
decode weight, and what do the decode kernel's split-K and its XLA sum cost?

    python scripts/probe_stream.py --out probe_stream.json
    python scripts/probe_stream.py --shape 8192x8192 --modes dot --splits 1,8 --warps 2

Streams ``int4_tc``'s ``words`` array (uint32 ``[Np/bn, Kw/128, bn, 16]``, random bits; the
bytes of a K x N int4 weight without scales) with the decode kernels' program structure: grid
``(Np / rows, split)``, each program looping over its K chunks, ``per_step`` chunks per
iteration, and

* ``add``: adds the words into a uint32 accumulator (no tensor-core work);
* ``dot``: converts them to bf16 and multiplies a ``[rows, 16] @ [16, 16]`` ones tile on the
  tensor core (Triton pipelines only tensor-core operands with ``cp.async``, as in the real
  kernels, where the decoded words feed the MMA).

Beside them, in the same run: XLA's own reduction over the same array (a read-only stream XLA
tunes itself), XLA's sum of split-K partials alone (8 x 8192 f32, as int4_tc's at M = 1), and
``int4_tc_matmul`` at M = 1 with its defaults and with each K split given. Device time (span
per call, ``benchmarks/kernels.py``'s profiler trace), one array per call (no L2 reuse, and no
two calls XLA could merge); bandwidth fractions count the bytes read against the copy bandwidth
measured in the same run. Prints a table, fastest first per group, and writes every row to the
JSON.

H100 (``benchmarks/RESULTS.md``, ninth session): the best ``add`` stream takes 12.8 µs (0.87 of
the copy bandwidth), XLA's reduction 13.8 µs (0.81), the split-K sum 1.07 µs, int4_tc 17.9 µs.
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

MODES = ("add", "dot")


def stream_fn(mode, rows, split, warps, stages, per_step, block_n, interpret=False):
    """f(words) -> uint32/f32 [split, Np] for a ``[Np/bn, C, bn, 16]`` uint32 ``words``."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    from shrinkjax.kernels import driver as D

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def kernel(w_ref, o_ref, *, steps):
        sid = pl.program_id(1)
        if mode == "add":
            acc0 = jnp.zeros((rows, 16), jnp.uint32)
        else:
            acc0 = jnp.zeros((rows, 16), jnp.float32)
        ones = jnp.ones((16, 16), jnp.bfloat16)

        def body(i, acc):
            t = sid * steps * per_step + i * per_step
            for p in range(per_step):
                w = w_ref[t + p]  # uint32 [rows, 16]
                if mode == "add":
                    acc = acc + w
                else:
                    wb = (w & 0xFFFF).astype(jnp.float32).astype(jnp.bfloat16)
                    acc = acc + jnp.dot(wb, ones, preferred_element_type=jnp.float32)
            return acc

        acc = jax.lax.fori_loop(0, steps, body, acc0)
        o_ref[...] = jnp.sum(acc.astype(jnp.float32), axis=1)

    def f(words):
        nt, chunks, bn, _ = words.shape
        if chunks % (split * per_step):
            raise ValueError(f"split {split} x per_step {per_step} must divide {chunks} chunks")
        parts = bn // rows
        squeezed = getattr(pl, "squeezed", None)
        return D.pallas_gpu_call(
            functools.partial(kernel, steps=chunks // (split * per_step)),
            out_shape=jax.ShapeDtypeStruct((split, nt * bn), jnp.float32),
            grid=(nt * parts, split),
            in_specs=[D.row_part_spec(chunks, rows, 16, parts)],
            out_specs=pl.BlockSpec((squeezed, rows), lambda j, s: (s, j)),
            interpret=interpret,
            num_warps=warps,
            num_stages=stages,
            name=f"stream_{mode}",
        )(words)

    return f


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="probe_stream.json")
    ap.add_argument("--shape", default="8192x8192", help="K x N of the int4 weight")
    ap.add_argument("--modes", default="add,dot")
    ap.add_argument("--rows", default="64,128")
    ap.add_argument("--splits", default="1,2,4,8")
    ap.add_argument("--warps", default="2,4")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--per-step", default="1,2")
    ap.add_argument("--int4-splits", default="4,8,16", help="int4_tc K splits at M = 1")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import kernels as KB  # benchmarks/kernels.py
    import numpy as np

    from shrinkjax.kernels import int4_tc as T
    from shrinkjax.kernels import layouts as L
    from shrinkjax.kernels import reference as R

    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    res = KB.probe_result()
    copy = res["copy_tbps"]
    (k, n), block_n = KB.parse_shapes(a.shape)[0], T.DEFAULT_BLOCK_N
    shape = (n // block_n, k // T.CHUNK, block_n, 16)
    nbytes = 4 * int(np.prod(shape))
    key = jax.random.PRNGKey(0)
    calls = KB.n_calls(1, KB.n_copies(nbytes))
    # one array per call: calls on the same array would be one computation to XLA (CSE)
    ws = [jax.random.bits(s, shape, jnp.uint32) for s in jax.random.split(key, calls)]

    cfgs = [c for c in itertools.product(
        a.modes.split(","), ints(a.rows), ints(a.splits), ints(a.warps), ints(a.stages),
        ints(a.per_step),
    ) if shape[1] % (c[2] * c[5]) == 0 and block_n % c[1] == 0]  # fmt: skip
    runs, rows = {}, []
    xla = jax.jit(lambda w: jnp.sum(w, axis=(1, 3), dtype=jnp.uint32))
    jobs = {("xla_reduce",): lambda: KB.build_multi(lambda x, w: xla(w), [None] * calls, ws)}
    # XLA's sum of int4_tc's split-K partials alone (split 8, M = 1): its launch and run
    parts = [jax.random.normal(s, (8, 1, n)) for s in jax.random.split(key, calls)]
    jobs[("xla_split_sum",)] = lambda: KB.build_multi(
        lambda x, w: w.sum(axis=0).astype(jnp.bfloat16), [None] * calls, parts
    )
    for c in cfgs:
        jobs[("stream", *c)] = functools.partial(
            lambda c: KB.build_multi(lambda x, w: stream_fn(*c, block_n)(w), [None] * calls, ws),
            c,
        )

    # int4_tc at M = 1, with its defaults and with each split given (same bytes + scales)
    sh = KB.Shape(k, n, ["int4_g128"], seed=0)  # the benchmark's int4 problem
    pr = sh.probs["int4_g128"]
    tcs, x1 = pr["ws"], sh.x(1, calls)
    src = pr["src_ws"]
    refs = [R.matmul_ref(x, src[i % len(src)]).astype(jnp.float32) for i, x in enumerate(x1)]
    int4_nbytes = int(L.packed_nbytes(tcs[0]) + 2 * k + 2 * n)
    for s in [None] + [s for s in ints(a.int4_splits) if shape[1] % s == 0]:
        fn = functools.partial(T.int4_tc_matmul, split_k=s)
        jobs[("int4_tc", s)] = functools.partial(KB.build_multi, fn, x1, tcs)
    t0 = time.perf_counter()
    exes = KB.compile_jobs(jobs, 12, time.perf_counter() + 300)
    print(f"compiled {len(exes)} in {time.perf_counter() - t0:.0f} s", flush=True)
    for key_, exe in exes.items():
        if isinstance(exe, Exception):
            rows.append(dict(key=list(key_), error=repr(exe)[:300]))
            print(f"{key_}: {exe!r}"[:300], flush=True)
            continue
        if key_[0] == "int4_tc":
            # every call of the timed executable checked against the reference
            err = max(KB.rel_err(y, r) for y, r in zip(exe(x1, tcs), refs))
            if err > 2e-2:
                rows.append(dict(key=list(key_), error=f"rel_err {err:.3g}"))
                continue
            runs[key_] = (exe, x1, tcs)
        else:
            runs[key_] = (exe, [None] * calls, parts if key_[0] == "xla_split_sum" else ws)
    keys = list(runs)
    for i in range(0, len(keys), 24):  # one profiler trace per 24 executables
        part = {kk: runs[kk] for kk in keys[i : i + 24]}
        dev = KB.trace_device_times(part)
        for kk in part:
            if kk not in dev:
                continue
            us = dev[kk][0]
            b = int4_nbytes if kk[0] == "int4_tc" else nbytes if kk[0] != "xla_split_sum" else 0
            rows.append(dict(key=list(kk), us=us, busy_us=dev[kk][1], bytes=b,
                             bw_frac=b / (us * 1e-6) / (copy * 1e12)))  # fmt: skip
    res["rows"] = rows
    res["shape"] = [k, n]
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    ok = sorted((r for r in rows if "us" in r), key=lambda r: (r["key"][0], r["us"]))
    print(f"\n{'key':<48} {'us':>7} {'busy':>7} {'bw_frac':>7}")
    for r in ok:
        print(f"{str(r['key']):<48} {r['us']:7.2f} {r['busy_us']:7.2f} {r['bw_frac']:7.3f}")


if __name__ == "__main__":
    main()
