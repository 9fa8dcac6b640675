"""Pruning quality on SmolLM2-135M-Instruct: WikiText-2 perplexity after one-shot pruning, and a
Minitron-style structurally pruned ~90M model before and after healing by distillation.

Protocol (Wanda / SparseGPT papers): WikiText-2 raw test tokenized whole, non-overlapping
windows of ``--seqlen`` (2048), ppl = exp(mean NLL); calibration: ``--calib-windows`` (128)
random windows of 2048 tokens of WikiText-2 valid (word-tokenized form, seed 0; the same
windows as ``ptq_quality.py``). Every linear of every block is pruned (q/k/v/o/gate/up/down,
210 kernels; embeddings and the tied head are not), block by block through the calibration
engine with the compressed earlier groups feeding the later ones.

Rows: magnitude (per layer) / Wanda (per output) / SparseGPT (blocks of 128, 1% dampening) at
50% unstructured, 2:4 and 4:8; SparseGPT 2:4 with joint int4 quantization (asymmetric, groups
of 128 input rows; SmolLM2's K = 576 kernels get 4 x 128 + 64 rows, the int-k formats' ragged
last group, as in the PTQ benchmark). Each row records perplexity, pruning wall time
(calibration and compilation included), the achieved sparsity and the stored model bytes (N:M
kernels are ``NMSparseArray``: kept values + 2/3-bit positions; int4 values packed). Perplexity is
measured on the dense expansion of the pruned kernels (bit-identical weights, one compiled
forward for every row).

Minitron: importance of heads / MLP channels / embedding channels / layers on the calibration
windows, cut to ``--minitron-dim`` x ``--minitron-hidden`` (default 512 x 896, heads and layers
kept: 90.1M parameters), then healed with the ``distill`` stage (logit KD from the dense
teacher, forward KL) for ``--heal-steps x --heal-batch x --heal-seqlen`` tokens of WikiText-2
valid; healing is reported as not run when the distill stage is unavailable.

The JSON (``--out``) is rewritten after every row, so a timeout keeps the finished rows.

    # GPU (one H100): all rows + Minitron with 200 x 16 x 2048 = 6.6M healing tokens
    python benchmarks/prune_quality.py --out benchmarks/results/prune_quality.json
    # CPU smoke (tiny numbers):
    python benchmarks/prune_quality.py --quick --out /tmp/prune_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import protocol  # noqa: E402
from benchmarks.protocol import data_dir, dense_copy  # noqa: E402

ROWS = [
    ("magnitude", "50%"),
    ("wanda", "50%"),
    ("sparsegpt", "50%"),
    ("magnitude", "2:4"),
    ("wanda", "2:4"),
    ("sparsegpt", "2:4"),
    ("magnitude", "4:8"),
    ("wanda", "4:8"),
    ("sparsegpt", "4:8"),
    ("sparsegpt", "2:4+int4"),
]
MD_BEGIN, MD_END = "<!-- prune_quality:begin -->", "<!-- prune_quality:end -->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", "prune_quality.json")
    )
    protocol.add_protocol_args(p)
    p.add_argument(
        "--rows",
        default="",
        help="comma list of method:pattern (e.g. "
        "'wanda:2:4,sparsegpt:2:4+int4'); default: the standard table",
    )
    p.add_argument("--skip-minitron", action="store_true")
    p.add_argument("--minitron-dim", type=int, default=512)
    p.add_argument("--minitron-hidden", type=int, default=896)
    p.add_argument("--minitron-layers", type=int, default=0, help="0 = keep all 30")
    p.add_argument("--heal-steps", type=int, default=None, help="default 200 (quick: 2)")
    p.add_argument("--heal-batch", type=int, default=None, help="default 16 (quick: 2)")
    p.add_argument("--heal-seqlen", type=int, default=None, help="default 2048 (quick: 64)")
    p.add_argument("--heal-lr", type=float, default=2e-4)
    p.add_argument("--workdir", default="", help="distillation workdir (default: a new temp dir)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="skip rows starting after this many seconds (0 = no budget)",
    )
    p.add_argument(
        "--results-md",
        default=None,
        help="RESULTS.md whose section to replace "
        "(default benchmarks/RESULTS.md; none with --quick)",
    )
    a = p.parse_args(argv)
    protocol.fill_defaults(
        a,
        full=dict(heal_steps=200, heal_batch=16, heal_seqlen=2048),
        quick=dict(heal_steps=2, heal_batch=2, heal_seqlen=64),
    )
    if a.results_md is None and not a.quick:
        a.results_md = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    return a


def selected_rows(spec: str):
    if not spec:
        return ROWS
    out = []
    for item in spec.split(","):
        method, _, pattern = item.strip().partition(":")
        if method not in ("magnitude", "wanda", "sparsegpt") or not pattern:
            raise ValueError(f"--rows: bad item {item!r} (method:pattern)")
        out.append((method, pattern))
    return out


def prune_section(method: str, pattern: str, calib_batch: int):
    from shrinkjax.sparse.stage import default_config

    c = default_config()
    c.method = method
    c.pattern = pattern.split("+")[0]
    c.calib.batch_size = calib_batch
    if pattern.endswith("+int4"):
        c.quant, c.quant_group_size, c.quant_symmetric = "int4", 128, False
    return c


def targets(doc: dict) -> dict:
    ppl = {(r["method"], r["pattern"]): r["ppl"] for r in doc["rows"] if "ppl" in r}
    out = {}
    for pat in ("50%", "2:4", "4:8"):
        m, w, s = (ppl.get((x, pat)) for x in ("magnitude", "wanda", "sparsegpt"))
        if m and w and s:
            out[f"sparsegpt_and_wanda_below_magnitude_{pat}"] = s < m and w < m
            out[f"sparsegpt_le_wanda_{pat}"] = s <= w
    return out


def write(path: str, doc: dict) -> None:
    doc["targets"] = targets(doc)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def heal(doc, args, ddir, teacher, student, tok, on_gpu: bool):
    """Logit KD of ``student`` from ``teacher`` through the distill stage; (model, info)."""
    from shrinkjax import stages
    from shrinkjax.io.checkpoint import save_checkpoint

    try:
        distill = stages.get("distill")
        from configs.prune import minitron as minitron_cfg
    except (KeyError, ImportError) as e:
        return None, {"heal": f"not run: distill stage unavailable ({e})"}
    workdir = args.workdir or tempfile.mkdtemp(prefix="prune-heal-")
    spec = os.path.join(workdir, "pruned_model")
    save_checkpoint(spec, student, tok, meta={"stage": "prune_quality minitron"})
    c = minitron_cfg.get_config()
    c.progress = True
    c.student.init, c.student.spec = "load", spec
    c.data.path = os.path.join(ddir, "wikitext-2-raw", "test.txt")
    c.data.cache_dir = os.path.join(workdir, "cache")
    c.distill.data.path = os.path.join(ddir, "wikitext-2-tokenized", "valid.txt")
    c.train.update(
        steps=args.heal_steps,
        batch_size=args.heal_batch,
        seqlen=args.heal_seqlen,
        lr=args.heal_lr,
        warmup_steps=max(1, args.heal_steps // 10),
        eval_windows=0,
        eval_every=0,
        checkpoint_every=0,
        tensorboard=False,
    )
    if not on_gpu:
        c.train.update(compute_dtype="float32", attention_impl="einsum")
    ctx = stages.RunContext(config=c, workdir=workdir)
    ctx.state.update(teacher=teacher, tokenizer=tok, model=student)
    t0 = time.perf_counter()
    res = distill(ctx)
    tokens = int(res.get("tokens_trained") or args.heal_steps * args.heal_batch * args.heal_seqlen)
    info = {
        "heal": f"logit KD (forward KL, tau 1) from the dense teacher, {c.train.compute_dtype}",
        "tokens": tokens,
        "heal_data": "wikitext-2-tokenized valid",
        "heal_steps": args.heal_steps,
        "heal_batch": args.heal_batch,
        "heal_seqlen": args.heal_seqlen,
        "heal_lr": args.heal_lr,
        "heal_seconds": time.perf_counter() - t0,
        "heal_final_loss": res.get("final_loss"),
    }
    return ctx.state["model"], info


def markdown(doc: dict) -> str:
    p = doc["protocol"]
    lines = [
        MD_BEGIN,
        "## Pruning: SmolLM2-135M-Instruct on WikiText-2 (issue: pruning and sparsity)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {doc['device']} (jax {doc['jax']}, matmul precision "
        f"`{p['precision']}`).",
        "",
        "```bash",
        "python benchmarks/prune_quality.py --out benchmarks/results/prune_quality.json",
        "```",
        "",
        f"Perplexity on {p['eval']} ({p['eval_windows']} windows of {p['seqlen']}); calibration "
        f"{p['calib_windows']} x {p['calib_seqlen']} random windows of {p['calib']} (seed 0). "
        f"Dense: **{doc['dense_ppl']:.2f}**. All 210 block linears pruned; seconds = pruning "
        "wall time (calibration and compilation included); bytes = stored model bytes.",
        "",
        "| method | pattern | perplexity | sparsity | model MB | seconds | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if "ppl" not in r:
            lines.append(f"| {r['method']} | {r['pattern']} | — | | | | {r.get('error', '')} |")
            continue
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['sparsity']:.3f} | "
            f"{r['bytes'] / 1e6:.1f} | {r['seconds']:.1f} | {r.get('note', '')} |"
        )
    mt = doc.get("minitron")
    if mt:
        healed = mt.get("healed_ppl")
        lines += [
            "",
            f"Minitron-style width pruning to {mt.get('config')}: **{mt['params']:,}** parameters "
            f"(dense {doc['dense_params']:,}); perplexity {mt.get('pruned_ppl', float('nan')):.2f}"
            " before healing, "
            + (
                f"**{healed:.2f}** after {mt['tokens']:,} tokens of {mt['heal']} on "
                f"{mt['heal_data']} ({mt['heal_seconds']:.0f} s)."
                if healed
                else f"healing {mt.get('heal', 'not run')}."
            ),
        ]
    if doc.get("targets"):
        lines += ["", f"Targets: {doc['targets']}"]
    lines += ["", "JSON: `benchmarks/results/prune_quality.json`.", MD_END]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    jax.config.update("jax_default_matmul_precision", args.precision)

    from shrinkjax.data.windows import tokenize, windows
    from shrinkjax.eval.perplexity import perplexity
    from shrinkjax.eval.report import table
    from shrinkjax.io.load import load_model
    from shrinkjax.models.params import flat_params, model_from_params, param_count
    from shrinkjax.sparse import stage as sp
    from shrinkjax.sparse import structural
    from shrinkjax.sparse.array import stored_nbytes
    from shrinkjax.sparse.stage import sample_windows  # the PTQ sampler: same seed, same windows

    t_start = time.perf_counter()
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    device = f"{dev.platform}:{getattr(dev, 'device_kind', '')}"
    ddir = data_dir(args.data_dir)
    loaded = load_model("smollm2", progress=False)
    teacher, tok = loaded.model, loaded.tokenizer
    dense = flat_params(teacher)
    cache = os.path.join(tempfile.gettempdir(), "shrinkjax-prune-cache")
    with open(os.path.join(ddir, "wikitext-2-raw", "test.txt"), encoding="utf-8") as f:
        test_ids = tokenize(f.read(), tok, cache_dir=cache)
    with open(os.path.join(ddir, "wikitext-2-tokenized", "valid.txt"), encoding="utf-8") as f:
        calib_ids = tokenize(f.read(), tok, cache_dir=cache)
    etoks, escored = windows(test_ids, args.seqlen, max_windows=args.eval_windows)
    calib = sample_windows(calib_ids, args.calib_windows, args.calib_seqlen, seed=0)

    def ppl_of(m, desc="perplexity"):
        return perplexity(m, etoks, escored, args.batch_size, desc=desc)["ppl"]

    doc = {
        "model": loaded.name,
        "device": device,
        "jax": jax.__version__,
        "protocol": {
            "eval": "wikitext-2-raw test",
            "seqlen": args.seqlen,
            "eval_windows": int(len(etoks)),
            "calib": "wikitext-2-tokenized valid",
            "calib_windows": args.calib_windows,
            "calib_seqlen": args.calib_seqlen,
            "precision": args.precision,
            "quick": args.quick,
        },
        "dense_params": param_count(teacher),
        "dense_bytes": stored_nbytes(dense),
        "dense_ppl": None,
        "rows": [],
    }
    doc["dense_ppl"] = ppl_of(teacher, "dense ppl")
    write(args.out, doc)
    for method, pattern in selected_rows(args.rows):
        row = {"method": method, "pattern": pattern}
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            doc["rows"].append({**row, "error": "skipped: time budget"})
            continue
        print(f"\n== {method} {pattern}", flush=True)
        try:
            model = model_from_params(teacher.cfg, dense, source="dense copy")
            pc = prune_section(method, pattern, args.calib_batch_size)
            t0 = time.perf_counter()
            reports = sp.prune_model(model, pc, None if method == "magnitude" else calib)
            jax.block_until_ready(jax.tree.leaves(flat_params(model)))
            row["seconds"] = time.perf_counter() - t0
            summ = sp.summarize(model, reports)
            row.update(sparsity=summ["sparsity"], bytes=summ["bytes"])
            if "mean_rel_out_err" in summ:
                row["mean_rel_out_err"] = summ["mean_rel_out_err"]
                row["max_damp"] = summ["max_damp"]
            if pattern.endswith("+int4"):
                groups = sorted({r["quant_group"] for r in reports.values()})
                row["note"] = "int4 asym, groups of " + "/".join(map(str, groups)) + " rows"
                row["note"] += " (ragged last group where K % 128)"
            row["ppl"] = ppl_of(dense_copy(model), f"{method} {pattern}")
        except Exception as e:  # keep the other rows
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
        doc["rows"].append(row)
        write(args.out, doc)
        model = None
    if not args.skip_minitron:
        print("\n== minitron", flush=True)
        mt: dict = {}
        try:
            t0 = time.perf_counter()
            small, plan, _ = structural.prune_structure(
                teacher,
                calib,
                n_layers=args.minitron_layers,
                dim=args.minitron_dim,
                hidden_dim=args.minitron_hidden,
                batch_size=args.calib_batch_size,
            )
            mt.update(
                params=param_count(small),
                config_params=small.cfg.param_count(),
                config={
                    k: getattr(small.cfg, k)
                    for k in ("n_layers", "dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim")
                },
                prune_seconds=time.perf_counter() - t0,
            )
            mt["pruned_ppl"] = ppl_of(small, "minitron pruned")
            doc["minitron"] = mt
            write(args.out, doc)
            healed, info = heal(doc, args, ddir, teacher, small, tok, on_gpu)
            mt.update(info)
            mt["healed_ppl"] = ppl_of(healed, "minitron healed") if healed is not None else None
        except Exception as e:
            traceback.print_exc()
            mt["error"] = f"{type(e).__name__}: {e}"
        mt.setdefault("tokens", 0)
        doc["minitron"] = mt
    doc["total_seconds"] = time.perf_counter() - t_start
    write(args.out, doc)
    if args.results_md:
        protocol.update_section(args.results_md, markdown(doc), MD_BEGIN, MD_END)
    rows = [
        {
            "method": "dense",
            "pattern": "-",
            "ppl": doc["dense_ppl"],
            "sparsity": 0.0,
            "MB": doc["dense_bytes"] / 1e6,
        }
    ]
    for r in doc["rows"]:
        rows.append(
            {
                "method": r["method"],
                "pattern": r["pattern"],
                "ppl": r.get("ppl", "-"),
                "sparsity": r.get("sparsity", "-"),
                "MB": r["bytes"] / 1e6 if "bytes" in r else "-",
                "seconds": r.get("seconds", "-"),
                "note": r.get("note", r.get("error", "")),
            }
        )
    mt = doc.get("minitron") or {}
    if mt:
        rows.append(
            {
                "method": "minitron",
                "pattern": f"{mt.get('params', 0):,} params",
                "ppl": mt.get("pruned_ppl", "-"),
                "note": "before healing",
            }
        )
        rows.append(
            {
                "method": "minitron",
                "pattern": "healed",
                "ppl": mt["healed_ppl"] if mt.get("healed_ppl") else "-",
                "note": f"{mt.get('tokens', 0):,} KD tokens"
                if mt.get("healed_ppl")
                else mt.get("heal", mt.get("error", "not run")),
            }
        )
    print(table(rows, title=f"\nprune quality ({device}, {doc['total_seconds']:.0f} s)"))
    print(f"targets: {doc['targets']}\nJSON: {args.out}")
    return doc


if __name__ == "__main__":
    main()
