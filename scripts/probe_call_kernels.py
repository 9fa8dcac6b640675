"""Which device kernels one call of a decode kernel launches, and where its span goes.

    python3 scripts/probe_call_kernels.py int4_g128:1 mxfp4:1 nvfp4:4 --json out.json

For each ``KIND:M`` it builds ``benchmarks/kernels.py``'s packed weight (8192 x 8192 unless
``--k/--n``), checks one call against the float reference on fresh random x, then traces one
executable that makes ``--calls`` back-to-back calls on distinct weight copies, as the benchmark
times them (inside ``dispatch.opaque_input()`` unless ``--x-context fusible``). It prints, per
kernel name, the µs per call and the count per call, then the span per call (first kernel start
to last kernel end of the execution, over the calls) and the summed idle gaps between kernels:
how much of the benchmark's time is the decode kernel itself and how much is the small XLA
kernels around it (split-K sum, x conversions) and their launch gaps.

``--set module.CONST=VALUE`` patches a ``shrinkjax.kernels`` constant first (as
``scripts/ncu_kernel.py``); each spec may add its own after a second colon
(``int4_g128:1:int4_tc.OPAQUE_XSUM=xla``), and tile keywords of the kernel
(``int4_g128:16:num_warps=2,xsum=sum``). Without a GPU there is no device timeline: the script
checks the kernels in interpret mode at a small shape and reports no timings.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from ncu_kernel import (  # noqa: E402
    benchmark_kernels,
    parse_assignments,
    patch_constants,
    restore_constants,
)

KINDS = ("int4_g128", "mxfp4", "nvfp4", "2:4_bf16", "2:4_int4")


def parse_spec(spec: str):
    """``"KIND:M[:mod.CONST=V,key=V,...]"`` -> (kind, m, [(name, value)], {tile key: value})."""
    kind = next((k for k in KINDS if spec.startswith(k + ":")), None)  # (2:4 kinds hold a colon)
    parts = spec[len(kind) + 1 :].split(":") if kind else []
    if not parts:
        raise SystemExit(f"spec {spec!r}: expected KIND:M[:mod.CONST=V,...], KIND in {KINDS}")
    try:
        m = int(parts[0])
    except ValueError:
        raise SystemExit(f"spec {spec!r}: M must be an integer") from None
    items = parse_assignments(",".join(parts[1:]).split(",") if parts[1:] else [], "set")
    sets = [(a, b) for a, b in items if "." in a]
    tiles = {a: b for a, b in items if "." not in a}
    return kind, m, sets, tiles


def per_call(events: list[dict], calls: int) -> dict:
    """Kernel time and count per call by name, the span per call and the idle gaps per call."""
    ev = sorted(events, key=lambda e: e["ts"])
    by_name = collections.defaultdict(lambda: [0.0, 0])
    gaps = 0.0
    for i, e in enumerate(ev):
        by_name[e["name"]][0] += float(e["dur"])
        by_name[e["name"]][1] += 1
        if i:  # idle since the latest end among the few kernels before (they may overlap)
            gaps += max(0.0, e["ts"] - max(p["ts"] + p["dur"] for p in ev[max(0, i - 4) : i]))
    span = (max(e["ts"] + e["dur"] for e in ev) - ev[0]["ts"]) if ev else 0.0
    kernels = sorted(
        ({"name": k, "us": v[0] / calls, "count": v[1] / calls} for k, v in by_name.items()),
        key=lambda r: -r["us"],
    )
    return {"span_us": span / calls, "gap_us": gaps / calls, "kernels": kernels}


def trace_one(exe, xs, ws, calls):
    KB = benchmark_kernels()
    import jax
    import trace_summary as TS

    jax.block_until_ready(exe(xs, ws))  # warm
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready(exe(xs, ws))
                time.sleep(0.005)
        with gzip.open(TS.newest_trace(d), "rt") as f:
            events = TS.device_events(json.load(f))
    events = [e for e in events if "memcpy" not in e["name"].lower()]
    segs = KB.split_executions(events, 2000.0)
    if len(segs) != 3:
        return None
    a, b, _ = segs[1]  # the middle execution
    return per_call([e for e in events if a <= e["ts"] <= b], calls)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("specs", nargs="+", metavar="KIND:M[:mod.CONST=V,key=V,...]")
    ap.add_argument("--k", type=int, default=None, help="default 8192 (256 without a GPU)")
    ap.add_argument("--n", type=int, default=None, help="default 8192 (256 without a GPU)")
    ap.add_argument("--calls", type=int, default=8, help="calls per traced execution")
    ap.add_argument("--x-context", default="opaque", choices=("opaque", "fusible"))
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.CONST=VALUE")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument(
        "--keep-going", action="store_true", help="report a spec that fails and go on to the next"
    )
    args = ap.parse_args(argv)
    specs = [parse_spec(s) for s in args.specs]

    import jax
    import jax.numpy as jnp

    KB = benchmark_kernels()
    KB.X_CONTEXT = args.x_context
    gpu = jax.default_backend() == "gpu"
    k = args.k or (8192 if gpu else 256)
    n = args.n or (8192 if gpu else 256)
    patch_constants(parse_assignments(args.set, "set"))
    results = []
    for spec, (kind, m, sets, tiles) in zip(args.specs, specs):
        saved = patch_constants(sets)  # (restored after the spec)
        try:
            rng = np.random.default_rng([0, k, n])
            p, plain = KB.make_problem(kind, k, n, rng)
            ref_p = plain.get("source", p)
            fn = KB.path_fn(functools.partial(KB.kernel_fn(kind), **tiles), "auto")
            key = jax.random.PRNGKey(m)
            xs = [
                jax.random.normal(s, (m, k), jnp.float32).astype(jnp.bfloat16)
                for s in jax.random.split(key, args.calls)
            ]
            want = np.asarray(KB.R.matmul_ref(xs[0], ref_p), np.float32)
            got = np.asarray(jax.jit(fn)(xs[0], p), np.float32)
            err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
            if not err < 2e-2:
                raise SystemExit(
                    f"{kind} M={m} {sets} {tiles}: does not match the reference ({err:.2e})"
                )
            ws = KB.copies_of(p, args.calls)
            exe = KB.build_multi(fn, xs, ws)
            res = trace_one(exe, xs, ws, args.calls) if gpu else None
        except (Exception, SystemExit) as e:  # (SystemExit: a mismatch)
            if not args.keep_going:
                raise
            print(f"{spec}: FAILED: {type(e).__name__}: {str(e)[:300]}")
            results.append(dict(kind=kind, m=m, spec=spec, error=f"{type(e).__name__}: {e}"))
            continue
        finally:
            restore_constants(saved)
        given = [f"{a}={b}" for a, b in sets] + [f"{a}={b}" for a, b in tiles.items()]
        row = dict(kind=kind, m=m, k=k, n=n, set=given, rel_err=err)
        row.update(res or {})
        results.append(row)
        label = f"{kind} M={m} {' '.join(row['set'])}".strip()
        if res is None:
            print(f"{label}: rel. err {err:.1e}; no device timeline")
            continue
        span, gaps = res["span_us"], res["gap_us"]
        print(f"{label}: span {span:.2f} µs/call, gaps {gaps:.2f}, err {err:.1e}")
        for r in res["kernels"]:
            print(f"    {r['us']:8.2f} µs  x{r['count']:.2f}  {r['name'][:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(jax.devices()[0].device_kind), "rows": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
