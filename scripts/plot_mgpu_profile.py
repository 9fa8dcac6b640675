"""Plot Mosaic GPU on-device profiles (``scripts/probe_mgpu_int4.py --profile``): the consumer
warpgroups' ranges of a few CTAs, one panel per trace, against SM clock cycles.

    python3 scripts/plot_mgpu_profile.py rowmajor=A-trace.json packed=B-trace.json \
        --wgs 2 --ctas 2 --out benchmarks/results/probe_mgpu_profile_fourteenth.png

Traces may be gzipped (``.json.gz``). Each range's colour is its name ("upcast", "mma", "wait",
"finish", ...); the white gaps are the pipeline's barrier waits (no stage to work on). Cycles
count from each warpgroup's first range after "Init" (the profiler's clock is per SM).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COLORS = {"upcast": "tab:orange", "decode": "tab:orange", "mma": "tab:blue", "wait": "tab:red",
          "finish": "tab:green", "scale": "tab:purple", "stage": "tab:gray"}  # fmt: skip


def load_ranges(path):
    """``{tid: [(name, start, end), ...]}`` in cycles from a profiler trace (each tid's ranges
    counted from its first non-"Init" range; tids with none are left out)."""
    from shrinkjax.kernels.mgpu_pipeline import trace_ranges

    out = {}
    for tid, ranges in trace_ranges(path).items():
        work = [r for r in ranges if r[0] != "Init"]
        if work:
            t0 = work[0][1]
            out[tid] = [(n, a - t0, b - t0) for n, a, b in work]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("traces", nargs="+", help="LABEL=PATH of a profiler trace (.json or .json.gz)")
    ap.add_argument("--wgs", type=int, default=2, help="consumer warpgroups per CTA")
    ap.add_argument("--ctas", type=int, default=2, help="CTAs to draw per trace")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args(argv)
    pairs = []
    for item in args.traces:
        label, eq, path = item.rpartition("=")  # (labels may hold "=")
        if not eq or not os.path.exists(path):
            ap.error(f"expected LABEL=PATH of an existing trace, got {item!r}")
        pairs.append((label, path))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 1.2 + 0.5 * args.ctas * args.wgs * len(pairs)
    fig, axes = plt.subplots(len(pairs), 1, figsize=(11, height), sharex=True, squeeze=False)
    for ax, (label, path) in zip(axes[:, 0], pairs, strict=True):
        ranges = load_ranges(path)
        tids = [t for t in ranges if (t - 1) % (args.wgs + 1) < args.wgs][: args.ctas * args.wgs]
        for row, tid in enumerate(tids):
            for name, a, b in ranges[tid]:
                ax.barh(row, b - a, left=a, height=0.8, color=COLORS.get(name, "black"))
        ax.set_yticks(range(len(tids)))
        cta_wg = [divmod(t - 1, args.wgs + 1) for t in tids]
        ax.set_yticklabels([f"CTA {c} group {g}" for c, g in cta_wg])
        end = max(b for t in tids for _, _, b in ranges[t])
        ax.set_title(f"{label}: {end:.0f} cycles to the last range's end", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    fig.legend(handles, list(COLORS), ncol=len(COLORS), fontsize=8, loc="upper center")
    axes[-1, 0].set_xlabel("SM clock cycles from the group's first range")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
