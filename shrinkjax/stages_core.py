"""The foundation stages: ``load`` (teacher/model from any source) and ``evaluate``."""

from __future__ import annotations

import time

import numpy as np

from shrinkjax.stages import RunContext, register


def load_text_windows(ctx: RunContext, data_cfg, tokenizer, model_cfg, stride: int | None = None):
    """Tokens/scored windows for a data config section (source, path, seqlen, max_windows)."""
    from shrinkjax.data.sources import load_text
    from shrinkjax.data.windows import tokenize, windows

    if data_cfg.seqlen > model_cfg.max_seq_len:
        raise ValueError(
            f"data.seqlen={data_cfg.seqlen} exceeds the model's context length "
            f"{model_cfg.max_seq_len}"
        )
    text = load_text(data_cfg.source, data_cfg.path)
    cache = data_cfg.get("cache_dir") or ctx.path("cache", "")
    ids = tokenize(text, tokenizer, cache_dir=cache, progress=ctx.progress)
    try:
        return windows(ids, data_cfg.seqlen, stride=stride, max_windows=data_cfg.max_windows)
    except ValueError as e:
        where = data_cfg.path or data_cfg.source
        raise ValueError(f"{where}: {e}") from None


@register("load")
def load_stage(ctx: RunContext) -> dict:
    from shrinkjax.io.load import load_model
    from shrinkjax.models.params import param_count

    cfg = ctx.config.model
    t0 = time.perf_counter()
    loaded = load_model(cfg.teacher, dtype=cfg.dtype, progress=ctx.progress)
    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.source}: the model has no tokenizer (tokenizer.json)")
    ctx.state.update(model=loaded.model, tokenizer=loaded.tokenizer, model_name=loaded.name)
    ctx.state.setdefault("teacher", loaded.model)
    mc = loaded.model.cfg
    return {
        "model": loaded.name,
        "source": loaded.source,
        "params": param_count(loaded.model),
        "layers": mc.n_layers,
        "dim": mc.dim,
        "dtype": mc.dtype,
        "seconds": time.perf_counter() - t0,
    }


@register("evaluate")
def evaluate_stage(ctx: RunContext) -> dict:
    from shrinkjax.eval.perplexity import perplexity

    model, tok = ctx.state["model"], ctx.state["tokenizer"]
    ecfg, dcfg = ctx.config.evaluate, ctx.config.data
    res: dict = {
        "model": ctx.state.get("model_name", ""),
        "corpus": dcfg.path or dcfg.source,
        "seqlen": dcfg.seqlen,
    }
    toks, scored = load_text_windows(ctx, dcfg, tok, model.cfg)
    known = {"perplexity", "sliding_perplexity", "compare", "samples"}
    unknown = set(ecfg.metrics) - known
    if unknown:
        raise ValueError(f"evaluate.metrics: unknown {sorted(unknown)}; known {sorted(known)}")
    if "perplexity" in ecfg.metrics:
        r = perplexity(model, toks, scored, dcfg.batch_size, progress=ctx.progress)
        res.update(ppl=r["ppl"], nll=r["nll"], windows=r["windows"], tokens=r["tokens"])
    if "sliding_perplexity" in ecfg.metrics:
        st, ss = load_text_windows(
            ctx, dcfg, tok, model.cfg, stride=ecfg.stride or dcfg.seqlen // 2
        )
        r = perplexity(model, st, ss, dcfg.batch_size, progress=ctx.progress, desc="sliding ppl")
        res.update(sliding_ppl=r["ppl"], sliding_stride=ecfg.stride or dcfg.seqlen // 2)
    if "compare" in ecfg.metrics:
        ref = ctx.state.get("teacher")
        if ref is None or ref is model:
            res["compare"] = "skipped: no reference model distinct from the evaluated one"
        else:
            from shrinkjax.eval.compare import compare

            res.update(compare(ref, model, toks, dcfg.batch_size, progress=ctx.progress))
    if "samples" in ecfg.metrics:
        from shrinkjax.models.generate import Sampling, generate, left_pad

        prompts = [tok.encode(p) for p in ecfg.prompts]
        pt, pm = left_pad(prompts, tok.pad_id or 0)
        s = Sampling(ecfg.temperature, ecfg.top_k, ecfg.top_p)
        out = generate(
            model, pt, ecfg.max_new_tokens, prompt_mask_BxP=pm, sampling=s, seed=ctx.config.seed
        )
        res["samples"] = [
            {"prompt": p, "completion": tok.decode(o)}
            for p, o in zip(ecfg.prompts, np.asarray(out))
        ]
    return res
