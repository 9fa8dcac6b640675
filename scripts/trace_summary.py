"""Where the device time of a ``jax.profiler`` trace goes: kernels summed by name and kind.

    python scripts/trace_summary.py PROFILE_DIR [--steps 3] [--top 25] [--json out.json]

Reads the newest ``*.trace.json.gz`` under ``PROFILE_DIR`` (written by
``jax.profiler.trace(..., create_perfetto_trace=True)``, e.g. ``benchmarks/distill_speed.py
--profile DIR``). Device events are those of processes whose name mentions a GPU/TPU device
(on CPU, every complete event). Per kernel kind (GEMM, attention, fusions, copies, ...) and per
kernel name: total time, share of the busy time and calls; plus busy time per step and the
span of the device timeline (busy / span = how much of the wall the device worked).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

KINDS = (  # first match wins, on the lower-cased kernel name
    ("attention", r"cudnn|fmha|flash|attention"),
    ("gemm", r"gemm|cutlass|xmma|cublas|nvjet|sm90_|matmul|dot"),
    ("triton", r"triton"),
    ("reduce", r"reduce|reduction"),
    ("scatter/gather", r"scatter|gather|dynamic.update.slice|dynamic.slice"),
    ("copy/transpose", r"memcpy|memset|copy|transpose"),
    ("fusion", r"fusion|loop_|input_|wrapped_|convert|broadcast|select|add|multiply"),
)


def kind_of(name: str) -> str:
    n = name.lower()
    for k, pat in KINDS:
        if re.search(pat, n):
            return k
    return "other"


def newest_trace(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
    if not found:
        raise SystemExit(f"no *.trace.json.gz under {path} (trace with create_perfetto_trace)")
    return max(found, key=os.path.getmtime)


def device_events(trace: dict) -> list[dict]:
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    dev = {pid for pid, n in names.items() if re.search(r"gpu|tpu|/device:", n.lower())}
    out = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if dev:
        out = [e for e in out if e["pid"] in dev]
    return out


def summarise(events: list[dict], steps: int, top: int, merge_numbered: bool = False) -> dict:
    """``merge_numbered``: count ``dot.12`` and ``dot.13`` (XLA's numbered instances) as ``dot``."""
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        d = float(e["dur"])
        name = re.sub(r"[._]\d+$", "", e["name"]) if merge_numbered else e["name"]
        for table, key in ((by_name, name), (by_kind, kind_of(e["name"]))):
            table[key][0] += d
            table[key][1] += 1
    busy = sum(v[0] for v in by_kind.values())
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events) if events else 0.0

    def rows(table, n):
        items = sorted(table.items(), key=lambda kv: -kv[1][0])[:n]
        return [
            {
                "name": k,
                "ms_per_step": v[0] / 1e3 / steps,
                "share": v[0] / busy if busy else 0.0,
                "calls_per_step": v[1] / steps,
            }
            for k, v in items
        ]

    return {
        "events": len(events),
        "busy_ms_per_step": busy / 1e3 / steps,
        "span_ms_per_step": span / 1e3 / steps,
        "kinds": rows(by_kind, len(by_kind)),
        "kernels": rows(by_name, top),
    }


def sequence(events: list[dict], start: int, count: int) -> list[dict]:
    """Events ``start .. start + count`` by start time: name, duration and the idle gap since
    the previous event ended (µs)."""
    ev = sorted(events, key=lambda e: e["ts"])
    out = []
    for i in range(start, min(start + count, len(ev))):
        e = ev[i]
        gap = e["ts"] - (ev[i - 1]["ts"] + ev[i - 1]["dur"]) if i else 0.0
        out.append(dict(index=i, name=e["name"], us=float(e["dur"]), gap_us=float(gap)))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="profile directory (or one .trace.json.gz)")
    p.add_argument("--steps", type=int, default=3, help="steps traced (per-step numbers)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default="", help="also write the summary here")
    p.add_argument("--merge", action="store_true", help="merge XLA's numbered instances (dot.3)")
    p.add_argument(
        "--sequence",
        default="",
        help="START:COUNT: also print device events START..START+COUNT in time order, with the "
        "gap before each (e.g. one decoder layer of a decode step)",
    )
    a = p.parse_args(argv)
    path = newest_trace(a.path)
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    s = summarise(device_events(trace), a.steps, a.top, a.merge)
    s["trace"] = path
    print(
        f"{path}\n{s['events']} device events; busy {s['busy_ms_per_step']:.2f} ms/step over "
        f"a {s['span_ms_per_step']:.2f} ms/step span"
    )
    for title, key in (("kind", "kinds"), ("kernel", "kernels")):
        print(f"\n{title:<60} {'ms/step':>9} {'share':>7} {'calls':>7}")
        for r in s[key]:
            print(
                f"{r['name'][:60]:<60} {r['ms_per_step']:9.3f} {100 * r['share']:6.1f}% "
                f"{r['calls_per_step']:7.1f}"
            )
    if a.sequence:
        start, count = (int(v) for v in a.sequence.split(":"))
        s["sequence"] = sequence(device_events(trace), start, count)
        print(f"\n{'#':>5} {'gap us':>7} {'us':>7}  kernel")
        for r in s["sequence"]:
            print(f"{r['index']:5d} {r['gap_us']:7.2f} {r['us']:7.2f}  {r['name'][:90]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1)
    return s


if __name__ == "__main__":
    main()
