"""The ``quantize`` stage: post-training quantization of ``ctx.state['model']``.

Reads ``ctx.config.quantize`` (:func:`default_config` has every field)::

    method       rtn | gptq | awq | smoothquant | llm_int8
    format ...   the weight QuantSpec (format, group_size, granularity, symmetric, ...)
    activations  none | int8 | fp8_e4m3   (W8A8: also quantize activations at matmul time)
    act_scales   dynamic (per token) | static (per tensor, calibrated)
    rules        ordered (regex, format | None | {QuantSpec fields}) over parameter paths;
                 empty: embeddings/LM head float, every other kernel gets the spec
    calib        calibration text (source, path), windows × seqlen, batch_size, seed
    gptq / awq / smoothquant / llm_int8   per-method knobs
    save, save_dir

The float model stays in ``ctx.state['teacher']`` (set if absent); the quantized copy becomes
``ctx.state['model']``. Nothing is written unless ``save=True`` (a shrinkjax checkpoint).
"""

from __future__ import annotations

import time

import numpy as np
from absl import logging

from shrinkjax.stages import RunContext, register

METHODS = ("rtn", "gptq", "awq", "smoothquant", "llm_int8")
ACTIVATIONS = ("none", "int8", "fp8_e4m3")


def default_config():
    """The ``quantize`` config section with every field the stage reads (int4 g128
    asymmetric RTN; ``calib.path`` must be set for the calibrated methods)."""
    from ml_collections import ConfigDict

    return ConfigDict(
        dict(
            method="rtn",  # rtn | gptq | awq | smoothquant | llm_int8
            format="int4",  # int2 int3 int4 int8 fp8_e4m3 fp8_e5m2 nf4 mxfp4 nvfp4
            group_size=128,  # 0 = the format's default
            granularity="",  # "" = format default | tensor | channel | group
            symmetric=False,  # int-k: min-max with zero point (GPTQ/AWQ checkpoints)
            double_quant=False,  # nf4 only
            scale_dtype="",  # "" = format default
            activations="none",  # none | int8 | fp8_e4m3 (W8A8)
            act_scales="dynamic",  # dynamic (per token) | static (per tensor, calibrated)
            # ordered (regex, format | None | dict of QuantSpec fields); () = embed/lm_head
            # float and every other kernel gets the spec above
            rules=(),
            calib=ConfigDict(
                dict(source="file", path="", windows=128, seqlen=2048, batch_size=8, seed=0)
            ),
            gptq=ConfigDict(
                dict(
                    block_size=128,
                    percdamp=0.01,
                    act_order=False,
                    static_groups=False,
                    mse_grid=0,  # > 0: clipping grid search per group (reference: 100)
                    max_shrink=0.8,
                    mse_norm=2.4,
                )
            ),
            awq=ConfigDict(dict(n_grid=20, clip=True, max_tokens=4096, mlp_loss=True)),
            smoothquant=ConfigDict(dict(alpha=0.5)),
            llm_int8=ConfigDict(dict(threshold=6.0, keep_fp16=False)),
            save=False,
            save_dir="",
        )
    )


def spec_from_config(qc):
    from shrinkjax.quant.array import QuantSpec

    return QuantSpec(
        format=qc.format,
        group_size=int(qc.group_size) or None,
        granularity=qc.get("granularity") or None,
        symmetric=bool(qc.symmetric),
        double_quant=bool(qc.get("double_quant", False)),
        scale_dtype=qc.get("scale_dtype") or None,
    )


def rules_from_config(qc, spec):
    """The ordered rules: ``qc.rules`` entries are (regex, None | format name | dict of
    QuantSpec fields, merged over the default spec)."""
    from shrinkjax.quant.rules import default_rules

    rules = list(qc.get("rules") or ())
    if not rules:
        return default_rules(spec)
    out = []
    for i, r in enumerate(rules):
        if not isinstance(r, tuple | list) or len(r) != 2:
            raise ValueError(f"quantize.rules[{i}] must be (regex, spec), got {r!r}")
        pat, s = r
        if s is None or s == "none" or s == "float":
            out.append((pat, None))
        elif isinstance(s, str):
            out.append((pat, spec.replace(format=s)))
        else:
            out.append((pat, spec.replace(**dict(s))))
    return out


def calibration_tokens(ctx: RunContext, cc, tokenizer) -> np.ndarray:
    """``cc.windows`` random windows of ``cc.seqlen`` tokens (GPTQ's sampling: uniform
    random starts, seeded)."""
    from shrinkjax.data.sources import load_text
    from shrinkjax.data.windows import tokenize

    text = load_text(cc.source, cc.path)
    ids = tokenize(text, tokenizer, cache_dir=ctx.path("cache", ""), progress=ctx.progress)
    return sample_windows(ids, int(cc.windows), int(cc.seqlen), int(cc.get("seed", 0)))


def sample_windows(ids: np.ndarray, n: int, seqlen: int, seed: int = 0) -> np.ndarray:
    if len(ids) <= seqlen:
        raise ValueError(f"calibration text has {len(ids)} tokens; need more than seqlen={seqlen}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seqlen, size=n)
    return np.stack([ids[s : s + seqlen] for s in starts]).astype(np.int32)


def _to_w8a8(model, assigned, kind: str) -> None:
    from shrinkjax.quant import methods as M
    from shrinkjax.quant.array import QuantizedArray
    from shrinkjax.quant.smoothquant import w8a8_from_quantized

    for path, spec in assigned.items():
        v = M.get_param(model, path) if spec is not None else None
        if isinstance(v, QuantizedArray):
            M.set_param(model, path, w8a8_from_quantized(v, kind))


def quantize_model(model, qc, *, tokens=None, progress: bool = True) -> dict:
    """Quantize ``model`` in place as ``qc`` (a quantize config section) says.

    ``tokens [n, L]`` are the calibration windows (needed by gptq, awq, smoothquant and static
    activation scales). Returns the results dict (no per-layer details under "layers")."""
    import jax.numpy as jnp

    from shrinkjax.calibrate import calibrate
    from shrinkjax.models.params import flat_params
    from shrinkjax.quant import gptq as gptq_lib
    from shrinkjax.quant import methods as M
    from shrinkjax.quant.rules import match

    method = qc.method
    if method not in METHODS:
        raise ValueError(f"quantize.method must be one of {METHODS}, got {method!r}")
    act = qc.get("activations", "none") or "none"
    if act not in ACTIVATIONS:
        raise ValueError(f"quantize.activations must be one of {ACTIVATIONS}, got {act!r}")
    static = (qc.get("act_scales", "dynamic") or "dynamic") == "static"
    spec = spec_from_config(qc)
    assigned, report = match(rules_from_config(qc, spec), flat_params(model))
    if not assigned:
        raise ValueError("quantize: the rules assign no parameter")
    before = M.model_bytes(model)
    t0 = time.perf_counter()
    layers: dict = {}

    def run(lm):
        if tokens is None:
            raise ValueError(f"quantize.method={method} needs calibration tokens")
        bs = int(qc.calib.get("batch_size", 8))
        return calibrate(model, jnp.asarray(tokens), lm, batch_size=bs, progress=progress)

    if method == "gptq":
        g = qc.gptq
        cfg = gptq_lib.GPTQConfig(
            block_size=int(g.block_size),
            percdamp=float(g.percdamp),
            act_order=bool(g.act_order),
            static_groups=bool(g.get("static_groups", False)),
            mse_grid=int(g.get("mse_grid", 0)),
            max_shrink=float(g.get("max_shrink", 0.8)),
            mse_norm=float(g.get("mse_norm", 2.4)),
        )
        layers = run(M.GPTQMethod(assigned, cfg))
        if act != "none":  # GPTQ-rounded 8-bit weights, dynamic per-token 8-bit activations
            if static:
                raise ValueError("quantize.method=gptq with activations supports dynamic scales")
            _to_w8a8(model, assigned, act)
    elif method == "awq":
        a = qc.awq
        cfg = M.AWQConfig(
            n_grid=int(a.n_grid),
            clip=bool(a.clip),
            max_tokens=int(a.max_tokens),
            mlp_loss=bool(a.get("mlp_loss", True)),
        )
        bs = int(qc.calib.get("batch_size", 8))
        n_updates = -(-len(tokens) // bs) if tokens is not None else 16
        layers = run(
            M.AWQMethod(assigned, model.cfg, cfg, per_update=max(1, cfg.max_tokens // n_updates))
        )
    elif method == "smoothquant":
        kind = act if act != "none" else "int8"
        layers = run(
            M.W8A8Method(assigned, kind=kind, alpha=float(qc.smoothquant.alpha), static_act=static)
        )
    elif method == "llm_int8":
        li = qc.llm_int8
        layers = M.convert(
            model,
            assigned,
            M.llm_int8_fn(float(li.threshold), bool(li.get("keep_fp16", False))),
            progress=progress,
        )
    elif act != "none":  # rtn W8A8
        if spec.format not in ("int8", "fp8_e4m3") or spec.format != act:
            raise ValueError(
                f"W8A8 needs format == activations in (int8, fp8_e4m3); got "
                f"format={spec.format}, activations={act}"
            )
        if static:
            layers = run(M.W8A8Method(assigned, kind=act, alpha=None, static_act=True))
        else:
            layers = M.convert(model, assigned, M.w8a8_fn(act), progress=progress)
    else:
        layers = M.convert(model, assigned, M.rtn_fn, progress=progress)
    # kernels no block calibration reached (e.g. an untied lm_head) fall back to RTN
    if (method in ("gptq", "awq") or method == "rtn") and act == "none":
        rest_fn = M.rtn_fn
    elif method == "llm_int8":
        rest_fn = M.llm_int8_fn(float(qc.llm_int8.threshold))
    else:
        rest_fn = M.w8a8_fn(act if act != "none" else "int8")
    rest = M.convert(model, assigned, rest_fn)
    if rest and method in ("gptq", "awq", "smoothquant"):
        logging.info(
            "quantize: %d kernels outside the blocks used RTN: %s", len(rest), sorted(rest)[:4]
        )
    seconds = time.perf_counter() - t0
    paths = sorted(assigned)
    return {
        "method": method,
        "spec": M.formats.make(spec).spec.describe(),
        "activations": act + (f" ({'static' if static else 'per-token'})" if act != "none" else ""),
        "quantized": len(paths),
        "kept_float": len(report.skipped) + len(report.unmatched),
        "bits_per_weight": M.quantized_bits_per_weight(model, paths),
        "model_bytes_before": before,
        "model_bytes": M.model_bytes(model),
        "quantize_seconds": seconds,
        "layers": layers,
    }


@register("quantize")
def quantize_stage(ctx: RunContext) -> dict:
    from flax import nnx

    qc = ctx.config.quantize
    model = ctx.state["model"]
    ctx.state.setdefault("teacher", model)
    qmodel = nnx.clone(model)
    needs_calib = qc.method in ("gptq", "awq", "smoothquant") or (
        (qc.get("act_scales", "dynamic") == "static") and qc.get("activations", "none") != "none"
    )
    tokens = None
    if needs_calib:
        tokens = calibration_tokens(ctx, qc.calib, ctx.state["tokenizer"])
    res = quantize_model(qmodel, qc, tokens=tokens, progress=ctx.progress)
    if tokens is not None:
        res.update(calib_windows=int(tokens.shape[0]), calib_seqlen=int(tokens.shape[1]))
    ctx.state["model"] = qmodel
    if qc.get("save", False):
        try:
            from shrinkjax.io.checkpoint import save_checkpoint
        except ImportError:  # pragma: no cover - the checkpoint module ships with shrinkjax
            logging.warning("quantize.save=True but shrinkjax.io.checkpoint is unavailable")
        else:
            out = qc.get("save_dir") or ctx.path("quantized_model")
            save_checkpoint(
                out,
                qmodel,
                ctx.state.get("tokenizer"),
                meta={"quantize": {k: v for k, v in res.items() if k != "layers"}},
            )
            res["saved_to"] = out
    return res
