"""Plot ``benchmarks/kernels.py``'s grid: speed-up over cuBLAS bf16 against M, per shape.

    python scripts/plot_kernels.py benchmarks/results/kernels.json \
        --out benchmarks/results/kernels.png

One panel per K x N; one line per kernel (``us`` of the dispatched path, device time when the
JSON says ``timing: device``) as ``torch_bf16_us / us``; torch's int4 kernel dashed for scale;
the horizontal line at 1 is cuBLAS bf16. Needs matplotlib (``pip install -e .[plots]``).
"""

from __future__ import annotations

import argparse
import json


def series(rows, shape, key):
    """{name: ([M], [speed-up over cuBLAS bf16])} for one (K, N)."""
    out: dict[str, tuple[list, list]] = {}
    for r in sorted(rows, key=lambda r: r["M"]):
        if (r["K"], r["N"]) != shape or not r.get(key) or not r.get("torch_bf16_us"):
            continue
        name = r["kernel"] if key == "us" else f"torch {r['kernel']}"
        ms, xs = out.setdefault(name, ([], []))
        ms.append(r["M"])
        xs.append(r["torch_bf16_us"] / r[key])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", help="a kernels.json written by benchmarks/kernels.py")
    ap.add_argument("--out", default="kernels.png")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(a.json) as f:
        res = json.load(f)
    rows = [r for r in res["rows"] if r.get("us")]
    shapes = sorted({(r["K"], r["N"]) for r in rows}, key=lambda s: -s[0] * s[1])
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), sharey=True)
    axes = [axes] if len(shapes) == 1 else list(axes)
    for ax, shape in zip(axes, shapes):
        for name, (ms, xs) in series(rows, shape, "us").items():
            ax.plot(ms, xs, marker="o", label=name)
        for name, (ms, xs) in series(
            [r for r in rows if r["kernel"] == "int4_g128"], shape, "torch_us"
        ).items():
            ax.plot(ms, xs, "k--", marker="x", label=f"{name} (torch._weight_int4pack_mm)")
        ax.axhline(1.0, color="grey", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"K={shape[0]}, N={shape[1]}")
        ax.set_xlabel("M (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up over cuBLAS bf16 (×)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    calls = len({r.get("run") for r in rows})  # merged JSONs: rows of several calls
    where = "one call" if calls == 1 else f"each ratio within its call, rows of {calls} calls"
    fig.suptitle(f"{res.get('device', '')}: y = x @ W ({where}; timing: device)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
