"""The ``prune`` stage: magnitude / Wanda / SparseGPT (one-shot), Minitron (structural) and
gradual (masks + schedule hook for the ``distill`` stage's training loop).

Reads ``config.prune`` (defaults: :func:`default_config`), prunes ``ctx.state["model"]`` and
puts the result back there (the original stays ``ctx.state["teacher"]`` for a later ``distill``
or ``evaluate`` comparison). Wanda and SparseGPT run through the block-by-block calibration
engine (:func:`shrinkjax.calibrate.calibrate`) as :class:`WandaMethod` / :class:`SparseGPTMethod`;
magnitude needs no data; ``minitron`` ranks heads / MLP channels / embedding channels / layers
on the calibration windows, swaps in a smaller dense model and saves it to
``<workdir>/pruned_model`` (a later ``distill`` with ``student.init="load"`` and an empty
``student.spec`` is pointed there, so it heals the pruned model); ``gradual`` prunes nothing
itself but puts ``masks`` / ``mask_update`` / ``mask_hooks`` in ``ctx.state`` (see
:mod:`shrinkjax.sparse.schedule`). One-shot methods prune a copy of the model, so the teacher
stays dense.

Results: ``method``, ``pattern``, the achieved ``sparsity`` of the pruned linears, ``params`` and
stored ``bytes`` before/after, ``seconds``; with ``prune.evaluate`` also ``ppl`` of the pruned
model on ``config.data`` (what Minitron-then-heal configs report as the pre-healing number).
"""

from __future__ import annotations

import functools
import os
import re
import time

import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from shrinkjax.calibrate import calibrate, sub_module
from shrinkjax.sparse import magnitude, sparsegpt, wanda
from shrinkjax.sparse.array import compress, stored_nbytes
from shrinkjax.sparse.masks import Pattern, parse_pattern
from shrinkjax.stages import RunContext, register

METHODS = ("magnitude", "wanda", "sparsegpt", "minitron", "gradual")
DEFAULT_INCLUDE = r"^layers\.\d+\.(attn|mlp)\.\w+_proj$"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CALIB = os.path.normpath(
    os.path.join(
        os.environ.get("SHRINKJAX_DATA", os.path.join(_ROOT, "..", "shared", "data")),
        "wikitext-2-tokenized",
        "valid.txt",
    )
)


def default_config() -> ConfigDict:
    """The ``prune`` config section with every field a stage reads."""
    return ConfigDict(
        dict(
            method="wanda",  # magnitude | wanda | sparsegpt | minitron | gradual
            pattern="50%",  # unstructured "50%" / "0.5", or N:M "2:4", "4:8"
            scope="",  # ranking group: magnitude layer|output|global, wanda output|layer
            include=DEFAULT_INCLUDE,  # regex over linear paths such as layers.3.attn.q_proj
            compress=True,  # store N:M kernels as NMSparseArray (kept values + indices)
            quant="",  # sparsegpt joint quantization format ('' = none), e.g. int4
            quant_group_size=128,
            quant_symmetric=False,
            blocksize=128,  # sparsegpt lazy-update block (rows of K)
            damp=0.01,  # sparsegpt dampening, fraction of mean(diag H)
            evaluate=False,  # perplexity of the pruned model on config.data, in the results
            save=False,  # one-shot methods: save the pruned model (checkpoint) to save_dir
            save_dir="",  # default: <workdir>/pruned_model (minitron always saves there)
            calib=ConfigDict(
                dict(
                    source="file",
                    path=DEFAULT_CALIB,
                    seqlen=2048,
                    max_windows=128,
                    sample="random",  # random windows (seed) | first (non-overlapping)
                    seed=0,
                    batch_size=8,
                    cache_dir="",
                )
            ),
            minitron=ConfigDict(  # target sizes; 0 = keep
                dict(n_layers=0, dim=0, hidden_dim=0, n_heads=0, n_kv_heads=0)
            ),
            # method=gradual: masks + hook for the distill stage's loop (see sparse.schedule)
            schedule=ConfigDict(
                dict(
                    initial_sparsity=0.0,
                    final_sparsity=0.5,
                    begin_step=0,
                    end_step=1000,
                    frequency=100,
                    include=r"layers\.\d+\.(attn|mlp)\.\w+_proj\.kernel$",
                )
            ),
        )
    )


# ---------------------------------------------------------------------------------------------
# Storing a pruned kernel


def quant_spec(name: str, group_size: int = 128, symmetric: bool = False):
    """The ``QuantSpec`` for joint quantization (None for ``name=""``)."""
    if not name:
        return None
    from shrinkjax.quant.array import QuantSpec

    return QuantSpec(name, group_size=group_size, symmetric=symmetric)


def kernel_format(spec, shape):
    """The quantization Format for one ``[K, N]`` kernel, resolved as the PTQ methods do
    (``quant.methods.resolve_spec``: int-k keeps the group size with a short last group when it
    does not divide K; other formats fall back to a divisor of K)."""
    from shrinkjax.quant import formats
    from shrinkjax.quant.methods import resolve_spec

    return formats.make(resolve_spec(spec, tuple(shape)))


def store(w_orig, w_new, mask, pat: Pattern, *, compressed: bool = True, quant=None, qparams=None):
    """The kernel to put in the model: N:M → :class:`NMSparseArray` (values quantized when
    ``quant``), unstructured + ``quant`` → ``QuantizedArray`` on the fitted grid, else dense."""
    dtype = jnp.asarray(w_orig).dtype
    if pat.is_nm and compressed:
        vals = w_new if quant is not None else jnp.asarray(w_new).astype(dtype)
        return compress(vals, pat.n, pat.m, mask, quant=quant, qparams=qparams)
    if quant is not None:
        return quant.from_groups(jnp.asarray(w_new, jnp.float32), qparams)
    return jnp.where(mask, w_new, 0.0).astype(dtype)


def _report(mask, **extra) -> dict:
    return {"sparsity": float(1.0 - jnp.mean(mask.astype(jnp.float32))), **extra}


# ---------------------------------------------------------------------------------------------
# Calibration-engine methods


class _Base:
    def __init__(self, pattern, include: str = DEFAULT_INCLUDE, compressed: bool = True):
        self.pattern = parse_pattern(pattern)
        self.include = re.compile(include)
        self.compressed = compressed

    def wants(self, path: str) -> bool:
        return bool(self.include.search(path))


class WandaMethod(_Base):
    """:class:`shrinkjax.calibrate.LayerMethod` for Wanda (|W|·||X||, per output)."""

    def __init__(self, pattern, include=DEFAULT_INCLUDE, per: str = "output", compressed=True):
        super().__init__(pattern, include, compressed)
        self.per = per

    def init_stats(self, path, w_KxN):
        return wanda.init_stats(w_KxN.shape[0])

    def update_stats(self, stats, x_TxK):
        return wanda.update_stats(stats, x_TxK)

    def apply_group(self, block, layer, names, stats):
        reps = {}
        for nm in names:
            var = sub_module(block, nm).kernel
            w = var.get_value()
            new, mask = wanda.prune(w, stats[nm]["sumsq"], self.pattern, per=self.per)
            var.set_value(store(w, new, mask, self.pattern, compressed=self.compressed))
            reps[nm] = _report(mask)
        return reps


class SparseGPTMethod(_Base):
    """:class:`shrinkjax.calibrate.LayerMethod` for SparseGPT (optionally with joint
    quantization: ``quant`` is a ``shrinkjax.quant.array.QuantSpec``, resolved per kernel by
    :func:`kernel_format`)."""

    def __init__(
        self,
        pattern,
        include=DEFAULT_INCLUDE,
        *,
        blocksize: int = 128,
        damp: float = 0.01,
        quant=None,
        compressed: bool = True,
    ):
        super().__init__(pattern, include, compressed)
        self.blocksize, self.damp, self.quant = blocksize, damp, quant

    def init_stats(self, path, w_KxN):
        return sparsegpt.init_stats(w_KxN.shape[0])

    def update_stats(self, stats, x_TxK):
        return sparsegpt.update_stats(stats, x_TxK)

    def apply_group(self, block, layer, names, stats):
        # every linear of a group reads the same input, so one Hessian factor serves them all
        st = stats[names[0]]
        name = f"layers.{layer}.{'/'.join(names)}"
        upper, dead, used = sparsegpt.inverse_cholesky(sparsegpt.hessian(st), self.damp, name=name)
        reps = {}
        for nm in names:
            var = sub_module(block, nm).kernel
            w = var.get_value()
            fmt = None if self.quant is None else kernel_format(self.quant, w.shape)
            res = sparsegpt.reconstruct(
                w, upper, dead, self.pattern, blocksize=self.blocksize, quant=fmt
            )
            err = sparsegpt.output_error(w, res.weight, stats[nm]["xtx"])
            kernel = store(
                w,
                res.weight,
                res.mask,
                self.pattern,
                compressed=self.compressed,
                quant=fmt,
                qparams=res.qparams,
            )
            var.set_value(kernel)
            reps[nm] = _report(res.mask, damp=used, loss=res.loss, rel_out_err=err)
            if fmt is not None:
                reps[nm]["quant_group"] = fmt.group_rows(w.shape[0])
        return reps


# ---------------------------------------------------------------------------------------------
# Whole-model entry points (also used by benchmarks/prune_quality.py)


def linear_paths(model, include: str = DEFAULT_INCLUDE) -> list[str]:
    from shrinkjax.models.llama import LINEAR_INPUTS

    rx = re.compile(include)
    paths = [f"layers.{i}.{nm}" for i in range(len(model.layers)) for nm in LINEAR_INPUTS]
    return [p for p in paths if rx.search(p)]


def _linear(model, path: str):
    _, i, rest = path.split(".", 2)
    return sub_module(model.layers[int(i)], rest)


def magnitude_prune(
    model, pattern, *, scope: str = "layer", include=DEFAULT_INCLUDE, compressed: bool = True
) -> dict:
    """Magnitude pruning of the model's linears in place; returns {path: report}."""
    pat = parse_pattern(pattern)
    paths = linear_paths(model, include)
    if scope == "global":
        weights = {p: _linear(model, p).kernel.get_value() for p in paths}
        new, masks = magnitude.global_prune(weights, pat)
    else:
        if scope not in ("layer", "output"):
            raise ValueError(f"magnitude scope must be layer, output or global, got {scope!r}")
        new, masks = {}, {}
        for p in paths:
            new[p], masks[p] = magnitude.prune(_linear(model, p).kernel.get_value(), pat, per=scope)
    reps = {}
    for p in paths:
        var = _linear(model, p).kernel
        var.set_value(store(var.get_value(), new[p], masks[p], pat, compressed=compressed))
        reps[p] = _report(masks[p])
    return reps


def make_method(pcfg, pattern=None):
    """The LayerMethod for ``pcfg.method`` (wanda | sparsegpt)."""
    pattern = pattern if pattern is not None else pcfg.pattern
    if pcfg.method == "wanda":
        return WandaMethod(
            pattern, pcfg.include, per=pcfg.scope or "output", compressed=pcfg.compress
        )
    if pcfg.method == "sparsegpt":
        q = quant_spec(pcfg.quant, pcfg.quant_group_size, pcfg.quant_symmetric)
        return SparseGPTMethod(
            pattern,
            pcfg.include,
            blocksize=pcfg.blocksize,
            damp=pcfg.damp,
            quant=q,
            compressed=pcfg.compress,
        )
    raise ValueError(f"prune.method {pcfg.method!r} has no calibration method")


def prune_model(model, pcfg, tokens_NxL=None, *, progress: bool = True) -> dict:
    """One-shot pruning of ``model`` in place by ``pcfg`` (a prune section); {path: report}."""
    if pcfg.method == "magnitude":
        return magnitude_prune(
            model,
            pcfg.pattern,
            scope=pcfg.scope or "layer",
            include=pcfg.include,
            compressed=pcfg.compress,
        )
    if tokens_NxL is None:
        raise ValueError(f"prune.method={pcfg.method} needs calibration tokens")
    return calibrate(
        model,
        jnp.asarray(tokens_NxL),
        make_method(pcfg),
        batch_size=pcfg.calib.batch_size,
        progress=progress,
    )


def summarize(model, reports: dict) -> dict:
    """Achieved sparsity over the pruned linears (weighted by size) and stored bytes."""
    from shrinkjax.models.params import flat_params, param_count

    total = kept = 0.0
    for p, r in reports.items():
        size = int(np.prod(_linear(model, p).kernel.get_value().shape))
        total += size
        kept += size * (1.0 - r.get("sparsity", 0.0))
    out = {
        "sparsity": 1.0 - kept / max(total, 1.0),
        "pruned_linears": len(reports),
        "params": param_count(model),
        "bytes": stored_nbytes(flat_params(model)),
    }
    errs = [r["rel_out_err"] for r in reports.values() if "rel_out_err" in r]
    if errs:
        out["mean_rel_out_err"] = float(np.mean(errs))
        out["max_damp"] = max(r["damp"] for r in reports.values())
    return out


def sample_windows(ids: np.ndarray, n: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """``n`` windows of ``seqlen`` tokens at random starts (GPTQ / SparseGPT / Wanda sample
    their calibration segments at random; the same sampler and seed as the PTQ stage)."""
    if len(ids) <= seqlen:
        raise ValueError(f"calibration text has {len(ids)} tokens; need more than seqlen={seqlen}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen, size=n)
    return np.stack([ids[s : s + seqlen] for s in starts]).astype(np.int32)


def calib_windows(ctx: RunContext, pcfg, tokenizer, model_cfg) -> np.ndarray:
    """Calibration windows ``[n, seqlen]``: ``calib.sample="random"`` (default) draws
    ``max_windows`` random windows (seed ``calib.seed``), ``"first"`` takes the first
    non-overlapping ones."""
    from shrinkjax.data.sources import load_text
    from shrinkjax.data.windows import tokenize
    from shrinkjax.stages_core import load_text_windows

    c = pcfg.calib
    where = c.path or c.source
    if c.seqlen > model_cfg.max_seq_len:
        raise ValueError(
            f"prune.calib.seqlen={c.seqlen} exceeds the context {model_cfg.max_seq_len}"
        )
    if c.sample == "first":
        toks, _ = load_text_windows(ctx, c, tokenizer, model_cfg)
        if c.max_windows and len(toks) < c.max_windows:
            raise ValueError(
                f"prune.calib: {where} gives only {len(toks)} windows of {c.seqlen} tokens, "
                f"fewer than max_windows={c.max_windows}"
            )
        return toks
    if c.sample != "random":
        raise ValueError(f"prune.calib.sample must be random or first, got {c.sample!r}")
    if not c.max_windows:
        raise ValueError("prune.calib.max_windows must be > 0 with sample='random'")
    ids = tokenize(
        load_text(c.source, c.path),
        tokenizer,
        cache_dir=c.get("cache_dir") or ctx.path("cache", ""),
        progress=ctx.progress,
    )
    try:
        return sample_windows(ids, c.max_windows, c.seqlen, seed=c.seed)
    except ValueError as e:
        raise ValueError(f"prune.calib: {where}: {e}") from None


def _with_defaults(section) -> ConfigDict:
    """``default_config()`` updated by the given section (so configs may omit fields)."""
    cfg = default_config()
    for key, value in section.items():
        if key not in cfg:
            raise ValueError(f"prune.{key}: unknown field; known: {sorted(cfg)}")
        if isinstance(value, ConfigDict):
            for k2, v2 in value.items():
                if k2 not in cfg[key]:
                    raise ValueError(f"prune.{key}.{k2}: unknown field; known: {sorted(cfg[key])}")
                cfg[key][k2] = v2
        else:
            cfg[key] = value
    return cfg


@register("prune")
def prune_stage(ctx: RunContext) -> dict:
    from shrinkjax.models.params import flat_params, model_from_params, param_count

    if "prune" not in ctx.config:
        raise ValueError("the prune stage needs a `prune` config section (see configs/prune/)")
    pcfg = _with_defaults(ctx.config.prune)
    if pcfg.method not in METHODS:
        raise ValueError(f"prune.method {pcfg.method!r}; known: {', '.join(METHODS)}")
    model, tok = ctx.state["model"], ctx.state["tokenizer"]
    res: dict = {
        "method": pcfg.method,
        "params_before": param_count(model),
        "bytes_before": stored_nbytes(flat_params(model)),
    }
    if pcfg.method == "gradual":
        if pcfg.save:
            raise ValueError(
                "prune.save: gradual pruning happens in the distill stage; save its model "
                "through distill's checkpoints, or use a one-shot method"
            )
        return _gradual(ctx, pcfg, res)
    tokens = None
    if pcfg.method != "magnitude":
        tokens = calib_windows(ctx, pcfg, tok, model.cfg)
        res["calib_windows"], res["calib_seqlen"] = int(tokens.shape[0]), int(tokens.shape[1])
    t0 = time.perf_counter()
    if pcfg.method == "minitron":
        from shrinkjax.sparse import structural

        mt = pcfg.minitron
        new, plan, _ = structural.prune_structure(
            model,
            tokens,
            n_layers=mt.n_layers,
            dim=mt.dim,
            hidden_dim=mt.hidden_dim,
            n_heads=mt.n_heads,
            n_kv_heads=mt.n_kv_heads,
            batch_size=pcfg.calib.batch_size,
            progress=ctx.progress,
        )
        ctx.state["model"] = new
        res.update(
            params=param_count(new),
            config_params=new.cfg.param_count(),
            bytes=stored_nbytes(flat_params(new)),
            config={
                k: getattr(new.cfg, k)
                for k in ("n_layers", "dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim")
            },
            kept_layers=plan.layers,
        )
        res.update(_hand_to_distill(ctx, _save_pruned(ctx, pcfg, new, tok, res)))
    else:
        res["pattern"] = str(parse_pattern(pcfg.pattern))
        if pcfg.quant:
            res["quant"] = f"{pcfg.quant} g{pcfg.quant_group_size}"
        # prune a copy: the loaded model is also ctx.state["teacher"] (arrays are shared, and
        # replacing a kernel never touches the original's)
        model = model_from_params(model.cfg, flat_params(model), source="prune")
        reports = prune_model(model, pcfg, tokens, progress=ctx.progress)
        ctx.state["model"] = model
        ctx.state["model_name"] = f"{ctx.state.get('model_name', 'model')} ({pcfg.method})"
        res.update(summarize(model, reports))
        res["layers"] = reports
        if pcfg.save:  # e.g. for scripts/evaluate.py --kernels (the 2:4 kernels)
            res["saved_to"] = _save_pruned(ctx, pcfg, model, tok, res)
    res["seconds"] = time.perf_counter() - t0
    if pcfg.evaluate:
        from shrinkjax.eval.perplexity import perplexity
        from shrinkjax.stages_core import load_text_windows

        m = ctx.state["model"]
        toks, scored = load_text_windows(ctx, ctx.config.data, tok, m.cfg)
        r = perplexity(m, toks, scored, ctx.config.data.batch_size, progress=ctx.progress)
        res.update(ppl=r["ppl"], ppl_windows=r["windows"])
    return res


def _save_pruned(ctx: RunContext, pcfg, model, tokenizer, res: dict) -> str:
    """Save the pruned model as a checkpoint (``prune.save_dir`` or ``<workdir>/pruned_model``),
    the stage's results so far in its metadata; returns the directory."""
    from shrinkjax.io.checkpoint import save_checkpoint

    path = pcfg.save_dir or ctx.path("pruned_model")
    meta = {k: v for k, v in res.items() if k != "layers"}
    save_checkpoint(path, model, tokenizer, meta={"prune": meta})
    return path


def _hand_to_distill(ctx: RunContext, path: str) -> dict:
    """When a later ``distill`` stage loads its student (``student.init="load"``) with no
    ``student.spec``, point it at the saved pruned model ``path``."""
    out = {"checkpoint": path}
    student = ctx.config.get("student")
    if student is not None and student.get("init") == "load" and not student.get("spec"):
        student.spec = path
        out["student_spec"] = path
    return out


def _gradual(ctx: RunContext, pcfg, res: dict) -> dict:
    """Gradual pruning happens inside training: hand the masks and the update hook to the
    ``distill`` stage (``ctx.state['masks']``, ``ctx.state['mask_update']``), and the factory
    ``ctx.state['mask_hooks'](student_params) -> (masks, hook)`` for a student whose parameter
    names differ from the loaded model's."""
    from shrinkjax.models.params import flat_params
    from shrinkjax.sparse import schedule

    sc = pcfg.schedule
    schedule.sparsity_at(sc.end_step, sc)  # validates the schedule
    pattern = None if pcfg.pattern in ("", None) else parse_pattern(pcfg.pattern)
    pattern = pattern if pattern is not None and pattern.is_nm else None
    masks, hook = schedule.gradual_hooks(sc, flat_params(ctx.state["model"]), pattern)
    ctx.state.update(
        masks=masks,
        mask_update=hook,
        mask_hooks=functools.partial(schedule.gradual_hooks, sc, pattern=pattern),
    )
    res.update(
        masked_kernels=len(masks),
        final_sparsity=float(sc.final_sparsity) if pattern is None else pattern.sparsity,
        schedule={k: sc[k] for k in sc},
    )
    return res
