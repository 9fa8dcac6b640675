"""Post-training quantization quality on SmolLM2-135M-Instruct: WikiText-2 perplexity.

Protocol (GPTQ/AWQ papers): WikiText-2 raw test tokenized whole, non-overlapping windows of
2048, ppl = exp(mean NLL); calibration: ``--calib-windows`` (128) random windows of 2048
tokens of WikiText-2 valid (seed 0). Rows: FP; RTN / GPTQ / AWQ at W4 g128 and W3 g128
(asymmetric int, zero points); SmoothQuant W8A8; FP8 E4M3 W8A8 (dynamic per-token
activations); LLM.int8(); NF4 (g64), MXFP4 (g32), NVFP4 (g16) round to nearest. Each row
records perplexity, stored bits per quantized weight, model bytes, quantization wall time
(compilation included) and the device. SmolLM2's K = 576 kernels cannot hold g128 groups:
they use g96 (``methods.resolve_spec``, noted per row).

Weight-only rows are evaluated with the dequantized weights in a dense model (bit-identical
to the QuantizedArray reference matmul, and it reuses the FP model's compiled forward);
``--eval-packed`` evaluates the packed model instead. W8A8 / LLM.int8 rows always run their
own weight types (activations are quantized at matmul time).

The JSON (``--out``) is rewritten after every row, so a timeout keeps the finished rows;
``--budget-s`` (default 450) is a wall-clock budget for the whole run: a row (or the qwix
section) is skipped when its estimated time would overrun it, so one 8-minute device call
always ends with the table printed.

    # GPU (one H100, ~6 min):
    python benchmarks/ptq_quality.py --out benchmarks/results/ptq_quality.json --qwix
    # CPU smoke:
    python benchmarks/ptq_quality.py --quick --out /tmp/ptq_quick.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import protocol  # noqa: E402
from benchmarks.protocol import data_dir, dense_copy  # noqa: E402

# rough H100 seconds per row (quantization + evaluation, compilation included) for the budget
ROW_SECONDS = {"gptq": 60.0, "awq": 60.0, "smoothquant": 40.0, "llm_int8": 35.0}
QWIX_MIN_SECONDS = 120.0  # qwix's eager GPTQ compiles per slice shape: ~1 min per new shape

# (method, format, group_size, extra quantize fields); order = priority under a time budget
AO_MSE = {"gptq.act_order": True, "gptq.mse_grid": 100}
ROWS = [
    ("rtn", "int4", 128, {}),
    ("gptq", "int4", 128, {}),
    ("gptq", "int4", 128, AO_MSE),
    ("rtn", "int3", 128, {}),
    ("gptq", "int3", 128, {}),
    ("gptq", "int3", 128, AO_MSE),
    ("awq", "int4", 128, {}),
    (
        "smoothquant",
        "int8",
        0,
        {"activations": "int8", "granularity": "channel", "symmetric": True},
    ),
    (
        "rtn",
        "fp8_e4m3",
        0,
        {"activations": "fp8_e4m3", "granularity": "channel", "symmetric": True},
    ),
    (
        "gptq",
        "fp8_e4m3",
        0,
        {"activations": "fp8_e4m3", "granularity": "channel", "symmetric": True},
    ),
    ("llm_int8", "int8", 0, {"granularity": "channel", "symmetric": True}),
    ("awq", "int3", 128, {}),
    ("rtn", "nf4", 64, {"symmetric": True}),
    ("rtn", "mxfp4", 32, {"symmetric": True}),
    ("rtn", "nvfp4", 16, {"symmetric": True}),
    ("gptq", "int4", 128, {"gptq.act_order": True}),
    ("gptq", "int3", 128, {"gptq.act_order": True}),
    ("gptq", "int4", 128, {"gptq.mse_grid": 100}),
    ("gptq", "int3", 128, {"gptq.mse_grid": 100}),
]


# --rows options of GPTQ rows
GPTQ_OPTIONS = {"ao": {"gptq.act_order": True}, "mse": {"gptq.mse_grid": 100}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "ptq_quality.json"))
    protocol.add_protocol_args(p)
    p.add_argument(
        "--rows",
        default="",
        help="comma list of method:format[:group] to run (default: the standard table)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="whole-run wall budget in seconds; rows that would overrun it are skipped "
        "(0 = no budget)",
    )
    p.add_argument("--eval-packed", action="store_true")
    p.add_argument("--qwix", action="store_true", help="also run qwix's GPTQ solver on real layers")
    p.add_argument("--qwix-budget-s", type=float, default=150.0)
    p.add_argument(
        "--qwix-wheel",
        default="",
        help="a qwix wheel to install when qwix is "
        "not importable (default: .whl/qwix-*.whl if present)",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows (and FP perplexity) of an existing --out JSON with the same "
        "protocol and add this run's rows to it (a row with the same method, format, group and "
        "options is replaced): split one table over several device calls",
    )
    p.add_argument(
        "--warm-repeat",
        action="store_true",
        help="after the table, time GPTQ W4 g128 once more in the same process (compiled "
        "steady state) and record it as a timing row",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.budget_s = 0.0
    return protocol.fill_defaults(a, quick=dict(seqlen=256))


def selected_rows(spec: str):
    if not spec:
        return ROWS
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        method, fmt = parts[0], parts[1]
        group = int(parts[2]) if len(parts) > 2 and parts[2] else None
        # options after a third colon, '+'-joined: gptq:int3:128:ao+mse = act-order with
        # the clipping grid search
        opts = set(parts[3].split("+")) if len(parts) > 3 and parts[3] else set()
        unknown = opts - set(GPTQ_OPTIONS)
        if unknown:
            raise SystemExit(f"--rows {item!r}: unknown options {sorted(unknown)}")
        extra = {k: v for o in sorted(opts) for k, v in GPTQ_OPTIONS[o].items()}
        hits = [
            r
            for r in ROWS
            if r[0] == method
            and r[1] == fmt
            and (group is None or r[2] == group)
            and {k: v for k, v in r[3].items() if k.startswith("gptq.")} == extra
        ]
        default = {"symmetric": not fmt.startswith("int"), **extra}
        out += hits or [(method, fmt, group or 0, default)]
    return out


def quantize_cfg(method, fmt, group, extra, calib_batch):
    from configs.ptq.common import quantize_section

    flat = {k: v for k, v in extra.items() if "." not in k}
    q = quantize_section(method=method, format=fmt, group_size=group, **flat)
    for k, v in extra.items():
        if "." in k:  # e.g. "gptq.act_order"
            sec, key = k.split(".", 1)
            q[sec][key] = v
    q.calib.batch_size = calib_batch
    return q


def group_note(model, res) -> str:
    """Kernels whose group size fell back (K not a multiple of the requested group)."""
    gs = {r.get("format", "") for r in res.get("layers", {}).values() if isinstance(r, dict)}
    gs.discard("")
    return "; ".join(sorted(gs))


def label(r: dict) -> str:
    """Row method with its GPTQ options, e.g. ``gptq+ao+mse``."""
    m = r["method"]
    if r.get("act_order"):
        m += "+ao"
    if r.get("mse_grid"):
        m += "+mse"
    if r.get("timing_repeat"):
        m += " (warm timing)"
    return m


def targets(doc: dict) -> dict:
    """The issue's targets over the measured rows; GPTQ is judged by its best variant (plain,
    act-order, clipping search), each named in ``gptq_variant_*``."""
    fp = doc.get("fp_ppl")
    measured = [r for r in doc["rows"] if "ppl" in r and not r.get("timing_repeat")]

    def best(method, fmt, group=None):
        c = [
            r
            for r in measured
            if r["method"] == method
            and r["format"] == fmt
            and (group is None or r["group"] == group)
        ]
        return min(c, key=lambda r: r["ppl"]) if c else None

    out = {}
    r4, g4, r3, g3 = (
        best("rtn", "int4", 128),
        best("gptq", "int4", 128),
        best("rtn", "int3", 128),
        best("gptq", "int3", 128),
    )
    if r4 and g4:
        out["gptq_beats_rtn_w4g128"] = g4["ppl"] < r4["ppl"]
        out["gptq_variant_w4g128"] = label(g4)
    if r3 and g3:
        out["gptq_beats_rtn_w3g128"] = g3["ppl"] < r3["ppl"]
        out["gptq_variant_w3g128"] = label(g3)
        if fp:
            out["gptq_w3g128_increase_at_most_half_rtn"] = (g3["ppl"] - fp) <= 0.5 * (
                r3["ppl"] - fp
            )
    a4 = best("awq", "int4", 128)
    if r4 and a4:
        out["awq_beats_rtn_w4g128"] = a4["ppl"] < r4["ppl"]
    sq = best("smoothquant", "int8")
    if sq and fp:
        out["smoothquant_w8a8_within_2pct"] = sq["ppl"] <= fp * 1.02
    # FP8 E4M3 W8A8: the best weight rounding (RTN or GPTQ) with FP8 per-token activations
    f8 = [r for r in measured if r["format"] == "fp8_e4m3" and r.get("act") == "fp8_e4m3"]
    if f8 and fp:
        b8 = min(f8, key=lambda r: r["ppl"])
        out["fp8_w8a8_within_2pct"] = b8["ppl"] <= fp * 1.02
        out["fp8_w8a8_variant"] = label(b8)
    times = [r["seconds"] for r in doc["rows"] if r["method"] == "gptq" and "seconds" in r]
    if times:
        out["gptq_fastest_seconds"] = min(times)
        out["gptq_under_60s"] = min(times) < 60.0
    return out


def row_key(r: dict) -> tuple:
    """What identifies a table row (for --append): method, format, group, GPTQ options."""
    return (
        r["method"],
        r["format"],
        r.get("group"),
        bool(r.get("act_order")),
        r.get("mse_grid", 0),
        bool(r.get("timing_repeat")),
    )


def load_previous(path: str, doc: dict) -> dict | None:
    """The JSON at ``path`` if it was made with the same protocol and model, else None."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        old = json.load(f)
    if old.get("protocol") != doc["protocol"] or old.get("model") != doc["model"]:
        print(f"--append: {path} has another protocol/model; starting afresh", flush=True)
        return None
    return old


def write(path: str, doc: dict) -> None:
    doc["targets"] = targets(doc)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def import_qwix(wheel: str):
    try:
        import qwix  # noqa: F401

        return
    except ImportError:
        pass
    wheels = [wheel] if wheel else sorted(glob.glob(os.path.join(ROOT, ".whl", "qwix-*.whl")))
    if not wheels or not os.path.isfile(wheels[-1]):
        raise ImportError("qwix is not installed and no wheel was given (--qwix-wheel)")
    target = os.path.join("/tmp", "qwix_site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--quiet",
            "--upgrade",
            "--target",
            target,
            wheels[-1],
        ],
        check=True,
    )
    sys.path.insert(0, target)
    import qwix  # noqa: F401


QWIX_LAYER = 5
QWIX_LINEARS = ("attn.q_proj", "mlp.down_proj", "attn.k_proj", "mlp.gate_proj", "attn.o_proj")


def qwix_group(k: int, group: int) -> int:
    """The group size both libraries use on a K-row kernel: ``group`` when it divides K (qwix
    has no ragged last group), else the largest multiple of 32 below it that does (K = 576:
    96)."""
    if k % group == 0:
        return group
    return max(g for g in range(32, group, 32) if k % g == 0)


def _qwix_how(k: int, group: int):
    import jax.numpy as jnp
    from qwix._src.core import qarray

    return qarray.HowToQuantize(
        qtype=jnp.int4, channelwise_axes=[0], tiled_axes={1: group}, calibration_method="absmax"
    )


def qwix_layers(model, calib, batch: int, budget_s: float, progress: bool) -> list[dict]:
    """Solver side by side on real layers: the Hessians of block QWIX_LAYER's linears from the
    same calibration windows; our GPTQ and ``qwix.contrib.gptq_core.quantize_weight`` both
    quantize to symmetric int4 with the same groups (qwix 0.1.8's GPTQ fails on asymmetric
    zero points). Error = mean squared layer output error predicted by H."""
    import jax
    import jax.numpy as jnp
    from qwix._src.core import qarray
    from qwix.contrib import gptq_core

    from shrinkjax.calibrate import calibrate, sub_module
    from shrinkjax.quant import formats
    from shrinkjax.quant import gptq as gptq_lib
    from shrinkjax.quant import methods as M
    from shrinkjax.quant.array import QuantSpec

    spec = QuantSpec("int4", group_size=128, symmetric=True)
    assigned = {f"layers.{QWIX_LAYER}.{nm}.kernel": spec for nm in QWIX_LINEARS}
    out: list[dict] = []
    t_start = time.perf_counter()

    class SideBySide(M.GPTQMethod):
        def apply_group(self, block, layer, names, stats):
            h = gptq_lib.hessian(stats[names[0]])
            for nm in names:
                if budget_s and time.perf_counter() - t_start > budget_s:
                    out.append({"linear": nm, "skipped": "qwix time budget"})
                    continue
                w = jnp.asarray(sub_module(block, nm).kernel.value, jnp.float32)
                g = qwix_group(w.shape[0], 128)
                fmt = formats.make(spec.replace(group_size=g))
                r = {"linear": f"layers.{layer}.{nm}", "shape": list(w.shape), "group": g}
                t0 = time.perf_counter()
                ours = gptq_lib.gptq_quantize(w, h, fmt)
                jax.block_until_ready(ours.w_hat)
                r["shrinkjax_seconds_first"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                ours = gptq_lib.gptq_quantize(w, h, fmt)
                jax.block_until_ready(ours.w_hat)
                r["shrinkjax_seconds"] = time.perf_counter() - t0
                r["shrinkjax_error"] = gptq_lib.expected_output_error(h, w, ours.w_hat)
                r["rtn_error"] = gptq_lib.expected_output_error(h, w, fmt.quantize(w).dequantize())
                t0 = time.perf_counter()
                # qwix fits a group inside one lazy-update block: blocks of whole groups
                qa, _ = gptq_core.quantize_weight(
                    w.T, h, _qwix_how(w.shape[0], g), blocksize=g * max(1, 128 // g), percdamp=0.01
                )
                wq = qarray.dequantize(qa).T
                jax.block_until_ready(wq)
                r["qwix_seconds"] = time.perf_counter() - t0
                r["qwix_error"] = gptq_lib.expected_output_error(h, w, wq)
                rq = qarray.dequantize(qarray.quantize(w.T, _qwix_how(w.shape[0], g))).T
                r["qwix_rtn_error"] = gptq_lib.expected_output_error(h, w, rq)
                out.append(r)
            return {nm: {} for nm in names}

    from flax import nnx

    model.layers = nnx.List(list(model.layers)[: QWIX_LAYER + 1])  # later blocks: not needed
    calibrate(model, jnp.asarray(calib), SideBySide(assigned), batch_size=batch, progress=progress)
    return out


def warm_repeat(args, model, calib, doc, device, t_start, add_row) -> None:
    """GPTQ W4 g128 (reference settings) once more in this process: every jitted function is
    compiled by now, so this is the steady-state quantization time (calibration included)."""
    import jax
    from flax import nnx

    from shrinkjax.quant.stage import quantize_model

    row = {
        "method": "gptq",
        "format": "int4",
        "group": 128,
        "act": "none",
        "timing_repeat": True,
        "device": device,
    }
    if args.budget_s and time.perf_counter() - t_start + ROW_SECONDS["gptq"] > args.budget_s:
        row["skipped"] = "time budget"
        add_row(row)
        return
    q = nnx.clone(model)
    t0 = time.perf_counter()
    quantize_model(q, quantize_cfg("gptq", "int4", 128, {}, args.calib_batch_size), tokens=calib)
    jax.block_until_ready(jax.tree.leaves(nnx.state(q, nnx.Param)))
    row["seconds"] = time.perf_counter() - t0
    row["note"] = "timing only (same process, compiled): perplexity as the gptq int4 row"
    add_row(row)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # flax '.value' notices
    import jax
    import numpy as np
    from flax import nnx
    from tqdm.auto import tqdm

    from shrinkjax.data.windows import tokenize, windows
    from shrinkjax.eval.perplexity import perplexity
    from shrinkjax.eval.report import table
    from shrinkjax.io.load import load_model
    from shrinkjax.quant.stage import quantize_model, sample_windows

    jax.config.update("jax_default_matmul_precision", args.precision)
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    device = f"{dev.platform}:{getattr(dev, 'device_kind', '')}"
    ddir = data_dir(args.data_dir)
    loaded = load_model("smollm2", progress=False)
    model, tok = loaded.model, loaded.tokenizer
    cache = os.path.join("/tmp", "shrinkjax-ptq-cache")
    with open(os.path.join(ddir, "wikitext-2-raw", "test.txt"), encoding="utf-8") as f:
        test_ids = tokenize(f.read(), tok, cache_dir=cache, progress=True)
    with open(os.path.join(ddir, "wikitext-2-tokenized", "valid.txt"), encoding="utf-8") as f:
        calib_ids = tokenize(f.read(), tok, cache_dir=cache, progress=True)
    etoks, escored = windows(test_ids, args.seqlen, max_windows=args.eval_windows)
    calib = sample_windows(calib_ids, args.calib_windows, args.calib_seqlen, seed=0)
    doc = {
        "model": loaded.name,
        "device": device,
        "jax": jax.__version__,
        "matmul_precision": args.precision,
        "protocol": {
            "eval": "wikitext-2-raw test",
            "seqlen": args.seqlen,
            "eval_windows": int(len(etoks)),
            "calib": "wikitext-2-tokenized valid",
            "calib_windows": args.calib_windows,
            "calib_seqlen": args.calib_seqlen,
            "quick": args.quick,
        },
        "fp_ppl": None,
        "qwix": {"requested": bool(args.qwix)},
        "rows": [],
    }

    def ppl_of(m):
        return perplexity(m, etoks, escored, args.batch_size, progress=True)["ppl"]

    prev = load_previous(args.out, doc) if args.append else None
    t0 = time.perf_counter()
    if prev and prev.get("fp_ppl"):
        doc["fp_ppl"], doc["fp_eval_seconds"] = prev["fp_ppl"], prev.get("fp_eval_seconds")
        doc["qwix"] = prev.get("qwix", doc["qwix"]) if not args.qwix else doc["qwix"]
    else:
        doc["fp_ppl"] = ppl_of(model)
        doc["fp_eval_seconds"] = time.perf_counter() - t0
    fp_bytes = sum(
        int(np.prod(v.shape)) * v.dtype.itemsize
        for v in jax.tree.leaves(nnx.state(model, nnx.Param))
    )
    doc["fp_model_bytes"] = fp_bytes
    fp_row = {
        "method": "fp",
        "format": "f32",
        "ppl": doc["fp_ppl"],
        "bits_per_weight": 32.0,
        "model_bytes": fp_bytes,
        "eval_seconds": doc["fp_eval_seconds"],
        "device": device,
    }
    rows = selected_rows(args.rows)
    if prev:
        doc["rows"] = list(prev.get("rows", []))
    write(args.out, doc)

    def add_row(row):
        doc["rows"] = [r for r in doc["rows"] if row_key(r) != row_key(row)] + [row]
        write(args.out, doc)

    for method, fmt, group, extra in tqdm(rows, desc="ptq rows", unit="row"):
        row = {
            "method": method,
            "format": fmt,
            "group": group or None,
            "act": extra.get("activations", "none"),
            **({"act_order": True} if extra.get("gptq.act_order") else {}),
            **({"mse_grid": extra["gptq.mse_grid"]} if extra.get("gptq.mse_grid") else {}),
            "device": device,
        }
        elapsed = time.perf_counter() - t_start
        est = ROW_SECONDS.get(method, 25.0)
        if args.budget_s and elapsed + est > args.budget_s:
            row["skipped"] = f"time budget ({elapsed:.0f}s + ~{est:.0f}s > {args.budget_s:.0f}s)"
            if not any(row_key(r) == row_key(row) and "ppl" in r for r in doc["rows"]):
                add_row(row)  # never replace a measured row by a skipped one
            continue
        try:
            q = nnx.clone(model)
            qc = quantize_cfg(method, fmt, group, extra, args.calib_batch_size)
            t0 = time.perf_counter()
            res = quantize_model(q, qc, tokens=calib, progress=True)
            jax.block_until_ready(jax.tree.leaves(nnx.state(q, nnx.Param)))
            row["seconds"] = time.perf_counter() - t0
            row.update(
                spec=res["spec"],
                bits_per_weight=res["bits_per_weight"],
                model_bytes=res["model_bytes"],
                formats_used=group_note(q, res),
            )
            t0 = time.perf_counter()
            weight_only = row["act"] == "none" and method != "llm_int8"
            em = q if (args.eval_packed or not weight_only) else dense_copy(q)
            row["ppl"] = ppl_of(em)
            row["eval"] = "packed" if em is q else "dequantized"
            row["eval_seconds"] = time.perf_counter() - t0
            row["ppl_increase"] = row["ppl"] - doc["fp_ppl"]
            del q, em
        except Exception as e:  # keep going: one broken row must not lose the table
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        add_row(row)
    if args.warm_repeat:
        warm_repeat(args, model, calib, doc, device, t_start, add_row)
    cols = [
        "method",
        "format",
        "group",
        "act",
        "ppl",
        "ppl_increase",
        "bits_per_weight",
        "model_bytes",
        "seconds",
        "eval_seconds",
        "device",
    ]
    shown = []
    for r in [fp_row, *doc["rows"]]:
        s = {c: r.get(c, "") for c in cols}
        s["method"] = label(r) if r is not fp_row else "fp"
        for c in ("group", "act"):
            s[c] = "" if s[c] in (None, "none") else s[c]
        if "error" in r or "skipped" in r:
            s["ppl"] = r.get("error", r.get("skipped", ""))[:60]
        shown.append(s)
    print(
        table(
            shown,
            cols,
            title=f"\nPTQ quality: {doc['model']} WikiText-2 test ppl "
            f"(seqlen {args.seqlen}, {doc['protocol']['eval_windows']} windows; "
            f"calib {args.calib_windows}×{args.calib_seqlen})",
        )
    )
    write(args.out, doc)
    print("targets:", json.dumps(doc["targets"]), flush=True)
    if args.qwix:
        qx = doc["qwix"]
        elapsed = time.perf_counter() - t_start
        try:
            if args.budget_s and elapsed + QWIX_MIN_SECONDS > args.budget_s:
                raise TimeoutError(f"time budget ({elapsed:.0f}s elapsed of {args.budget_s:.0f}s)")
            import_qwix(args.qwix_wheel)
            import qwix

            qx["version"] = getattr(qwix, "__version__", "?")
            qx["what"] = (
                "GPTQ solver side by side on real layers (same Hessians from the same "
                "calibration windows), symmetric int4, g128 (g96 where K=576): mean squared "
                "layer-output error and seconds; qwix runs eagerly (its Python loop), "
                "shrinkjax jitted (first call includes compilation). The grids differ: qwix's "
                "symmetric int4 uses all 16 levels (scale = absmax / 7.5), shrinkjax's 15 "
                "(absmax / 7), so compare each library's GPTQ error to its own RTN error"
            )
            qx["layers"] = layers = []
            budget = args.qwix_budget_s
            if args.budget_s:
                budget = min(budget, args.budget_s - elapsed - QWIX_MIN_SECONDS / 2)
            for r in qwix_layers(nnx.clone(model), calib, args.calib_batch_size, budget, True):
                layers.append(r)
            done = [r for r in layers if "qwix_error" in r]
            if done:
                qx["mean_error_ratio_qwix_over_shrinkjax"] = float(
                    np.mean([r["qwix_error"] / r["shrinkjax_error"] for r in done])
                )
                qx["mean_gptq_over_rtn_shrinkjax"] = float(
                    np.mean([r["shrinkjax_error"] / r["rtn_error"] for r in done])
                )
                qx["mean_gptq_over_rtn_qwix"] = float(
                    np.mean([r["qwix_error"] / r["qwix_rtn_error"] for r in done])
                )
        except Exception as e:
            qx["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        write(args.out, doc)
    qx = doc["qwix"]
    if qx.get("layers"):
        qcols = [
            "linear",
            "group",
            "rtn_error",
            "shrinkjax_error",
            "qwix_rtn_error",
            "qwix_error",
            "shrinkjax_seconds",
            "shrinkjax_seconds_first",
            "qwix_seconds",
            "skipped",
        ]
        print(table(qx["layers"], qcols, title="\nqwix side by side (symmetric int4 GPTQ)"))
    if args.qwix and "error" in qx:
        print(f"qwix: {qx['error']}")
    doc["total_seconds"] = time.perf_counter() - t_start
    write(args.out, doc)
    print(f"total {doc['total_seconds']:.0f}s; wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
