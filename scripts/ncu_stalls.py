"""Where a kernel's warps wait: summarize an Nsight Compute per-instruction page.

    ncu --import k.ncu-rep --page source --csv --print-source sass > k.sass.csv
    python scripts/ncu_stalls.py k.sass.csv --min-samples 15

Prints the warp-stall samples by reason over the whole kernel, how many of them fall in the
main loop (the instructions executed most often), and every instruction with at least
``--min-samples`` samples with its top three reasons. A stall is charged to the instruction
that waits, so a ``long_sb`` (long scoreboard: a global load's result) sample names the
*consumer* of a load; the instruction right after a ``DEPBAR`` carries the wait for ``cp.async``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys


def summarize(path: str, min_samples: int = 15) -> str:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    start = next((i for i, r in enumerate(rows) if "Source" in r), None)
    if start is None:
        raise SystemExit(f"{path}: no 'Source' header; is it `ncu --page source --csv` output?")
    hdr, data = rows[start], [r for r in rows[start + 1 :] if len(r) == len(rows[start])]
    col = {name: i for i, name in enumerate(hdr)}
    need = ("Source", "Warp Stall Sampling (All Samples)", "Instructions Executed")
    missing = [c for c in need if c not in col]
    if missing:
        raise SystemExit(f"{path}: no column {missing}; profile with `--set full` (stall sampling)")
    src, samples = col["Source"], col["Warp Stall Sampling (All Samples)"]
    execs = col["Instructions Executed"]
    reasons = [c for c in hdr if c.startswith("stall_") and "Not Issued" not in c]

    def num(r, c):
        return int(float(r[col[c]] or 0))

    total = sum(num(r, hdr[samples]) for r in data)
    most = max(int(float(r[execs] or 0)) for r in data)
    loop = [r for r in data if int(float(r[execs] or 0)) == most]
    by_reason = collections.Counter()
    for r in data:
        for c in reasons:
            by_reason[c[6:]] += num(r, c)
    out = [
        f"{path}: {total} samples; main loop {len(loop)} instructions, "
        f"{sum(num(r, hdr[samples]) for r in loop)} samples",
        "by reason: " + ", ".join(f"{k} {v}" for k, v in by_reason.most_common() if v),
    ]
    for i, r in enumerate(data):
        s = num(r, hdr[samples])
        if s >= min_samples:
            top = sorted(((num(r, c), c[6:]) for c in reasons), reverse=True)[:3]
            why = " ".join(f"{c}:{v}" for v, c in top if v)
            out.append(f"{i:5d} {s:6d} {r[execs]:>8} {r[src].strip()[:64]:64s} {why}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("csv", nargs="+", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--min-samples", type=int, default=15)
    a = ap.parse_args(argv)
    for path in a.csv:
        print(summarize(path, a.min_samples))


if __name__ == "__main__":
    sys.exit(main())
