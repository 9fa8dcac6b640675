"""Evaluate a model (GGUF file, HF directory, shrinkjax checkpoint, or `smollm2`) on corpora.

    python scripts/evaluate.py --model=smollm2 \
        --corpus=../shared/data/wikitext-2-raw/test.txt --seqlen=2048 --out=/tmp/eval.json

Metrics: perplexity (GPTQ protocol: non-overlapping windows), sliding_perplexity, compare
(KL and top-1 agreement against --reference), samples (greedy continuations of --prompts).
Prints a table; --out writes JSON (one corpus: the row itself; several: {"rows": [...]}).
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2", "smollm2 | path.gguf | HF dir | shrinkjax checkpoint dir")
flags.DEFINE_list("corpus", ["pydoc"], "Text files (or 'pydoc'), comma-separated.")
flags.DEFINE_integer("seqlen", 2048, "Window length in tokens.")
flags.DEFINE_integer("batch_size", 4, "Windows per batch.")
flags.DEFINE_integer("max_windows", 0, "Evaluate at most this many windows (0 = all).")
flags.DEFINE_list("metrics", ["perplexity"], "perplexity,sliding_perplexity,compare,samples")
flags.DEFINE_integer("stride", 0, "Sliding-window stride (0 = seqlen // 2).")
flags.DEFINE_string("reference", "", "Reference model spec for the compare metric.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_enum(
    "precision",
    "highest",
    ["default", "high", "highest"],
    "jax_default_matmul_precision (highest = true f32 on GPUs, no TF32).",
)
flags.DEFINE_list("prompts", ["The capital of France is"], "Prompts for the samples metric.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens generated per prompt (samples).")
flags.DEFINE_bool(
    "fuse_projections",
    False,
    "Run q/k/v and gate/up as one matmul each (shrinkjax.models.fuse; same outputs).",
)
flags.DEFINE_bool(
    "kernels",
    False,
    "Pack compressed linears into the Pallas kernels' layouts (shrinkjax.kernels.convert): "
    "on a GPU they run through the kernels, elsewhere through the same reference math.",
)
flags.DEFINE_enum(
    "attention",
    "",
    ["", "einsum", "cudnn", "pallas_decode", "pallas_decode_fused"],
    "Override the model's attention_impl (the pallas_decode paths run decode steps only, on a "
    "GPU; empty: as loaded).",
)
flags.DEFINE_bool(
    "deferred_norm",
    False,
    "Apply each RMSNorm's 1/rms after the next linears (LlamaConfig.deferred_norm, FlashNorm).",
)
flags.DEFINE_string("out", "", "Write results JSON here.")
flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    jax.config.update("jax_default_matmul_precision", FLAGS.precision)
    from shrinkjax.data.sources import load_text
    from shrinkjax.data.windows import tokenize, windows
    from shrinkjax.eval.perplexity import perplexity
    from shrinkjax.eval.report import table
    from shrinkjax.io.files import write_json
    from shrinkjax.io.load import load_model

    unknown = set(FLAGS.metrics) - {"perplexity", "sliding_perplexity", "compare", "samples"}
    if unknown:
        raise app.UsageError(f"--metrics: unknown {sorted(unknown)}")
    loaded = load_model(FLAGS.model, dtype=FLAGS.dtype, progress=FLAGS.progress)
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise app.UsageError(f"{loaded.source}: no tokenizer.json beside the model")
    changes = {"deferred_norm": True} if FLAGS.deferred_norm else {}
    if FLAGS.attention:
        changes["attention_impl"] = FLAGS.attention
    if changes:
        from shrinkjax.models.params import flat_params, model_from_params

        model = model_from_params(model.cfg.replace(**changes), flat_params(model))
    if FLAGS.fuse_projections:
        from shrinkjax.models.fuse import fuse_projections

        model = fuse_projections(model)
    packed = None
    if FLAGS.kernels:
        from shrinkjax.kernels.convert import pack_model_for_kernels

        packed = pack_model_for_kernels(model)
        kept = sorted(set(packed["kept"].values()))
        print(f"kernels: {len(packed['converted'])} linears packed; kept as they are: {kept}")
    if FLAGS.seqlen > model.cfg.max_seq_len:
        raise app.UsageError(
            f"--seqlen={FLAGS.seqlen} exceeds the model's context length {model.cfg.max_seq_len}"
        )
    ref = None
    if "compare" in FLAGS.metrics:
        if not FLAGS.reference:
            raise app.UsageError("--metrics=compare needs --reference")
        ref = load_model(FLAGS.reference, dtype=FLAGS.dtype, progress=FLAGS.progress).model
    rows = []
    for corpus in FLAGS.corpus:
        text = load_text("pydoc") if corpus == "pydoc" else load_text("file", corpus)
        ids = tokenize(text, tok, progress=FLAGS.progress)
        row = {
            "model": loaded.name,
            "corpus": corpus,
            "seqlen": FLAGS.seqlen,
            "dtype": FLAGS.dtype,
            "device": jax.devices()[0].device_kind,
            "fused_projections": FLAGS.fuse_projections,
            "attention": model.cfg.attention_impl,
            "deferred_norm": model.cfg.deferred_norm,
            "kernels": None if packed is None else len(packed["converted"]),
        }
        try:
            toks, scored = windows(ids, FLAGS.seqlen, max_windows=FLAGS.max_windows)
        except ValueError as e:
            raise app.UsageError(f"{corpus}: {e}") from None
        t0 = time.perf_counter()
        if "perplexity" in FLAGS.metrics:
            r = perplexity(model, toks, scored, FLAGS.batch_size, progress=FLAGS.progress)
            row.update(windows=r["windows"], tokens=r["tokens"], ppl=r["ppl"], nll=r["nll"])
        if "sliding_perplexity" in FLAGS.metrics:
            stride = FLAGS.stride or FLAGS.seqlen // 2
            st, ss = windows(ids, FLAGS.seqlen, stride=stride, max_windows=FLAGS.max_windows)
            r = perplexity(
                model, st, ss, FLAGS.batch_size, progress=FLAGS.progress, desc="sliding ppl"
            )
            row.update(sliding_ppl=r["ppl"], sliding_stride=stride)
        if ref is not None:
            from shrinkjax.eval.compare import compare

            c = compare(ref, model, toks, FLAGS.batch_size, progress=FLAGS.progress)
            row.update(kl=c["kl"], top1_agree=c["top1_agree"])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    print(table(rows, [c for c in rows[0] if c not in ("nll",)], title="\nevaluation"))
    if "samples" in FLAGS.metrics:
        from shrinkjax.models.generate import generate, left_pad

        pt, pm = left_pad([tok.encode(p) for p in FLAGS.prompts], tok.pad_id or 0)
        out = generate(model, pt, FLAGS.max_new_tokens, prompt_mask_BxP=pm)
        samples = [{"prompt": p, "completion": tok.decode(o)} for p, o in zip(FLAGS.prompts, out)]
        for s in samples:
            print(f"{s['prompt']!r} →{s['completion']!r}")
        rows[0]["samples"] = samples
    if FLAGS.out:
        write_json(FLAGS.out, rows[0] if len(rows) == 1 else {"rows": rows})
    return 0


if __name__ == "__main__":
    app.run(main)
