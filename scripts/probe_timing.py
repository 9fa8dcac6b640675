"""GPU probe: is ``benchmarks/kernels.py``'s wall time per call the device's time?

    python scripts/probe_timing.py --shapes 4096x4096,8192x8192 --ms 1,16 --out timing.json

For each K x N and M, the int4 kernel at its defaults (through ``dispatch.linear``, as a model
calls it) and cuBLAS-backed XLA bf16 are timed three ways on the same executable (16 calls on
rotating weight copies, ``benchmarks/kernels.build_multi``):

- ``wall_us``: ``kernels.time_compiled`` (executions queued back to back, wall clock per call);
- ``busy_us``: the device's kernel time per call, from a ``jax.profiler`` trace;
- ``span_us``: first kernel start to last kernel end per execution, per call (includes gaps).

``wall >> span`` means the host (launching each kernel) sets the benchmark's number;
``span >> busy`` means gaps between kernels on the device. Run it under different ``XLA_FLAGS``
(e.g. command buffers on or off) to compare launch methods.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def device_times(exe, xs, ws, reps=3):
    """(busy µs, span µs) per call, from a trace of ``reps`` executions."""
    import jax
    import trace_summary as TS

    jax.block_until_ready(exe(xs, ws))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(exe(xs, ws))
        with gzip.open(TS.newest_trace(d), "rt") as f:
            events = TS.device_events(json.load(f))
    import kernels as KB

    busy = sum(b for _, _, b in KB.split_executions(events, 50.0))
    spans = [end - start for start, end, _ in KB.split_executions(events, 50.0)]
    events = [e for e in events if "memcpy" not in e["name"].lower()]
    names = collections.defaultdict(float)
    for e in events:
        names[e["name"]] += float(e["dur"])
    calls = reps * len(xs)
    return busy / calls, sum(spans) / calls, {k: v / calls for k, v in names.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,8192x8192")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--out", default="probe_timing.json")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import kernels as KB  # benchmarks/kernels.py

    from shrinkjax.kernels import dispatch
    from shrinkjax.kernels import int4_tc as T

    res = {
        "device": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "rows": [],
    }
    print(f"device {res['device']}, XLA_FLAGS={res['xla_flags']!r}", flush=True)
    for k, n in KB.parse_shapes(a.shapes):
        for m in (int(v) for v in a.ms.split(",")):
            cell = KB.int4_probe_cell(k, n, m)
            xs, ws = cell["xs"], [T.pack_tc(w) for w in cell["ws"]]
            wb = KB.copies_of(
                jax.random.normal(jax.random.PRNGKey(k), (k, n), jnp.bfloat16),
                KB.n_copies(k * n * 2),
            )
            for name, fn, w in (
                ("int4_tc", lambda x, t: dispatch.linear(x, t), ws),
                ("xla_bf16", KB.bf16_dot, wb),
            ):
                exe = KB.build_multi(fn, xs, w)
                wall, _ = KB.time_compiled(exe, xs, w)
                busy, span, per_name = device_times(exe, xs, w)
                row = dict(kernel=name, K=k, N=n, M=m, wall_us=wall, busy_us=busy, span_us=span)
                row["kernels_per_call"] = per_name
                res["rows"].append(row)
                print(
                    f"{name:9s} {k}x{n} M={m:3d}: wall {wall:6.1f} us, span {span:6.1f}, "
                    f"busy {busy:6.1f}; µs/call by kernel: "
                    + ", ".join(f"{q[:40]} {v:.1f}" for q, v in per_name.items()),
                    flush=True,
                )
            row = cell["row"]
            print(f"  torch int4 {row.get('torch_us')}, torch bf16 {row.get('torch_bf16_us')}")
            res["rows"].append(dict(row, kernel="torch"))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
