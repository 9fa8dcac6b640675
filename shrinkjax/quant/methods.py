"""Post-training quantization methods as :class:`shrinkjax.calibrate.LayerMethod` adapters,
plus the data-free conversions (RTN, LLM.int8(), dynamic FP8 W8A8).

Every method is built from ``assigned``: ``{param path: QuantSpec}`` for the kernels to
quantize (what ``shrinkjax.quant.rules.match`` returns); a linear is processed iff its
``<path>.kernel`` is assigned. The calibration engine (``shrinkjax.calibrate.calibrate``)
drives the calibrated ones block by block:

===============  ====================================  ==========================================
method           statistics per linear input           rewrite of the block
===============  ====================================  ==========================================
GPTQMethod       XᵀX (f32) and token count             GPTQ per linear (shared-input linears in
                                                       one joint solve) -> QuantizedArray
AWQMethod        mean |x|, a token subsample           scale search + fold per group, clipping
                                                       search, RTN at the block's end
W8A8Method       max |x| per channel                   SmoothQuant fold (α) and/or static scale,
                                                       -> W8A8Array (int8 or FP8 E4M3)
===============  ====================================  ==========================================

Linears that share one input (q/k/v, gate/up) share one statistics accumulator: the others get
an empty placeholder, so XᵀX is computed once per input.

Group sizes: int-k formats take any group size, with a shorter last group when it does not
divide K (SmolLM2's K = 576 at g128: 4 x 128 + 64, as AutoGPTQ / AWQ). For the other formats
with a free group size (NF4, FP8 per group) :func:`resolve_spec` keeps the requested size when
it divides K and otherwise falls back (with a warning) to the largest divisor of K below it
that the packing allows; fixed blocks (MXFP4 32, NVFP4 16) raise.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from shrinkjax.calibrate import sub_module
from shrinkjax.models.llama import LINEAR_GROUPS, LINEAR_INPUTS
from shrinkjax.quant import awq as awq_lib
from shrinkjax.quant import formats
from shrinkjax.quant import gptq as gptq_lib
from shrinkjax.quant.array import PACK_UNIT, QuantSpec
from shrinkjax.quant.llm_int8 import quantize_llm_int8
from shrinkjax.quant.smoothquant import fold_into_norm, quantize_w8a8, smoothing_scales

# --------------------------------------------------------------------------------------------
# Specs and parameter plumbing.

_warned: set = set()


def resolve_spec(spec: QuantSpec, shape) -> QuantSpec:
    """``spec`` made valid for a ``[K, N]`` kernel (group-size fallback, see module doc).

    Int-k specs come back unchanged (ragged last group); a K the packing cannot take raises."""
    fmt = formats.make(spec)
    k = int(shape[0])
    try:
        fmt.check_shape(tuple(shape))
        return spec
    except ValueError:
        if fmt.spec.granularity != "group" or fmt.fixed_group_size or fmt.ragged_groups:
            raise
    g = fmt.spec.group_size
    unit = PACK_UNIT[fmt.bits]
    for cand in range(min(g, k), 0, -1):
        if k % cand == 0 and cand % unit == 0:
            key = (spec, k)
            if key not in _warned:
                _warned.add(key)
                logging.warning(
                    "%s: K=%d is not a multiple of group_size=%d; using %d for these kernels",
                    spec.format,
                    k,
                    g,
                    cand,
                )
            return spec.replace(group_size=cand)
    raise ValueError(f"{spec}: no group size <= {g} divides K={k}")


def get_param(model, path: str):
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m.value


def set_param(model, path: str, value) -> None:
    *parents, leaf = path.split(".")
    m = model
    for part in parents:
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    getattr(m, leaf).value = value


def _layer_name(path: str) -> tuple[int, str]:
    """``layers.3.attn.q_proj`` -> (3, ``attn.q_proj``)."""
    parts = path.split(".")
    return int(parts[1]), ".".join(parts[2:])


def _group_of(name: str) -> tuple[str, ...]:
    for g in LINEAR_GROUPS:
        if name in g:
            return g
    raise KeyError(name)


def storage_bytes(v) -> int:
    if hasattr(v, "nbytes") and not isinstance(v, jax.Array | np.ndarray):
        return int(v.nbytes)
    return int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize


def model_bytes(model) -> int:
    """Stored bytes of every parameter (compressed weights count their real storage)."""
    from shrinkjax.models.params import flat_params

    return sum(storage_bytes(v) for v in flat_params(model).values())


def quantized_bits_per_weight(model, paths) -> float:
    """Average stored bits per weight over the given (quantized) parameters."""
    from shrinkjax.models.params import flat_params

    fp = flat_params(model)
    b = sum(storage_bytes(fp[p]) for p in paths)
    n = sum(int(np.prod(fp[p].shape)) for p in paths)
    return 8.0 * b / n if n else 0.0


class _Assigned:
    """Shared bookkeeping: which linears are processed, and with which (resolved) spec."""

    def __init__(self, assigned: Mapping[str, QuantSpec | None]):
        self.assigned = {k: v for k, v in assigned.items() if v is not None}

    def wants(self, path: str) -> bool:
        return f"{path}.kernel" in self.assigned

    def fmt(self, block, layer: int, name: str):
        spec = self.assigned[f"layers.{layer}.{name}.kernel"]
        w = sub_module(block, name).kernel.value
        return formats.make(resolve_spec(spec, w.shape))

    def _shares_input(self, path: str) -> bool:
        """An earlier wanted linear of the same group already accumulates this input."""
        layer, name = _layer_name(path)
        group = _group_of(name)
        return any(self.wants(f"layers.{layer}.{nm}") for nm in group[: group.index(name)])

    def _later_groups_wanted(self, layer: int, names) -> bool:
        gi = next(i for i, g in enumerate(LINEAR_GROUPS) if names[0] in g)
        return any(self.wants(f"layers.{layer}.{nm}") for g in LINEAR_GROUPS[gi + 1 :] for nm in g)


# --------------------------------------------------------------------------------------------
# GPTQ


def _joint_ok(fmt) -> bool:
    """Whether kernels can be GPTQ-solved side by side (qparams strictly per output column)."""
    return fmt.spec.granularity != "tensor" and set(fmt.qparam_keys) <= {"scales", "zeros"}


class GPTQMethod(_Assigned):
    """GPTQ (:mod:`shrinkjax.quant.gptq`) for every assigned linear of the blocks."""

    def __init__(self, assigned, cfg: gptq_lib.GPTQConfig | None = None):
        super().__init__(assigned)
        self.cfg = cfg or gptq_lib.GPTQConfig()

    def init_stats(self, path, w_KxN):
        if self._shares_input(path):
            return {"xtx": jnp.zeros((0, 0), jnp.float32), "n": jnp.zeros((), jnp.float32)}
        return gptq_lib.hessian_init(w_KxN.shape[0])

    def update_stats(self, stats, x_TxK):
        if stats["xtx"].shape[0] == 0:  # placeholder (static shape: decided at trace time)
            return stats
        return gptq_lib.hessian_update(stats, x_TxK)

    def apply_group(self, block, layer, names, stats):
        h = gptq_lib.hessian(stats[names[0]])
        buckets: dict[Any, list[str]] = {}
        for nm in names:
            fmt = self.fmt(block, layer, nm)
            key = fmt if _joint_ok(fmt) else (fmt, nm)
            buckets.setdefault(key, []).append(nm)
        reports = {}
        for key, nms in buckets.items():
            fmt = key[0] if isinstance(key, tuple) else key
            ws = [sub_module(block, nm).kernel.value for nm in nms]
            res = gptq_lib.gptq_quantize(jnp.concatenate(ws, axis=1), h, fmt, self.cfg)
            if len(nms) == 1:
                parts = [res.qarray]
            else:
                parts = _split_columns(fmt, res, [w.shape[1] for w in ws], [w.dtype for w in ws])
            for nm, qa in zip(nms, parts, strict=True):
                sub_module(block, nm).kernel.value = qa
                reports[nm] = {**res.report(), "format": fmt.spec.describe(), "joint": len(nms)}
        return reports


def _split_columns(fmt, res: gptq_lib.GPTQResult, widths, dtypes):
    """Cut a joint GPTQ result back into per-kernel QuantizedArrays (exact: per-column)."""
    qp = {key: getattr(res.qarray, key) for key in fmt.qparam_keys}
    out, c = [], 0
    for wd, dt in zip(widths, dtypes, strict=True):
        w = res.w_hat[:, c : c + wd]
        part = {key: v[:, c : c + wd] if v.shape[1] > 1 else v for key, v in qp.items()}
        out.append(fmt.from_groups(w.astype(dt), part))
        c += wd
    return out


# --------------------------------------------------------------------------------------------
# AWQ


def sample_init(k: int, max_rows: int) -> dict:
    return {
        "sum_abs": jnp.zeros((k,), jnp.float32),
        "n": jnp.zeros((), jnp.float32),
        "rows": jnp.zeros((max_rows, k), jnp.float32),
        "filled": jnp.zeros((), jnp.int32),
    }


def sample_update(stats: dict, x_TxK, per_update: int) -> dict:
    """mean|x| over every token; up to ``per_update`` evenly spaced rows into a ring buffer."""
    x = x_TxK.reshape(-1, x_TxK.shape[-1]).astype(jnp.float32)
    t = x.shape[0]
    m = min(per_update, t, stats["rows"].shape[0])
    idx = np.linspace(0, t - 1, m).round().astype(np.int32)
    cap = stats["rows"].shape[0]
    pos = stats["filled"] % cap
    pos = jnp.minimum(pos, cap - m)
    rows = jax.lax.dynamic_update_slice_in_dim(stats["rows"], x[idx], pos, 0)
    return {
        "sum_abs": stats["sum_abs"] + jnp.sum(jnp.abs(x), axis=0),
        "n": stats["n"] + t,
        "rows": rows,
        "filled": stats["filled"] + m,
    }


def sample_rows(stats: dict):
    n = int(min(int(stats["filled"]), stats["rows"].shape[0]))
    return stats["rows"][:n]


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20  # α grid for the scale search
    clip: bool = True  # clipping search after scaling (skipped for q/k, as the reference)
    clip_grid: int = 20
    max_shrink: float = 0.5
    max_tokens: int = 4096  # token rows kept per input for the searches
    clip_tokens: int = 512  # rows used by the clipping search (reference: 512)
    mlp_loss: bool = True  # gate/up scored on the MLP output (float down_proj) like module2inspect
    quantize: bool = True  # False: only search and fold the scales (the function must not change)


class AWQMethod(_Assigned):
    """AWQ: per-group scale search folded into the producer of the input, clipping search,
    then round-to-nearest; the block's quantization happens after its last group is scaled
    (scales of later groups rewrite earlier linears: down -> up_proj, o -> v_proj).

    Folds: q/k/v <- ``attn_norm.scale``; gate/up <- ``mlp_norm.scale``; down <- up_proj's
    output columns (the SwiGLU product is linear in up); o <- v_proj's output columns. The
    reference applies the o fold only when v_proj and o_proj have equal shapes (MHA); under
    GQA an o_proj input channel ``(query head n, h)`` is v channel ``(n // G, h)`` mixed by
    attention, so here the statistics (and hence the scale) are pooled over the G query heads
    of each KV head (:func:`awq.tie_heads`) and the shared scale is folded exactly (softmax
    weights do not depend on v). Scale search loss: the group's linear outputs (q/k/v
    concatenated; o; down) and, for gate/up, the SwiGLU MLP output through the float
    down_proj (the reference's ``module2inspect``; for q/k/v the reference scores the whole
    attention output, we score q/k/v themselves). Clipping is skipped for q/k as in the
    reference."""

    def __init__(self, assigned, model_cfg, cfg: AWQConfig | None = None, per_update: int = 0):
        super().__init__(assigned)
        self.cfg = cfg = cfg or AWQConfig()
        self.mcfg = model_cfg
        self.per_update = per_update or max(1, cfg.max_tokens // 16)
        self._pending: dict[str, Any] = {}
        self._layer = -1

    def init_stats(self, path, w_KxN):
        if self._shares_input(path):
            return {"sum_abs": jnp.zeros((0,), jnp.float32)}
        return sample_init(w_KxN.shape[0], self.cfg.max_tokens)

    def update_stats(self, stats, x_TxK):
        if stats["sum_abs"].shape[0] == 0:
            return stats
        return sample_update(stats, x_TxK, self.per_update)

    def apply_group(self, block, layer, names, stats):
        t0 = time.perf_counter()
        if layer != self._layer:
            self._pending, self._layer = {}, layer
        st = stats[names[0]]
        x = sample_rows(st)
        x_mean = st["sum_abs"] / jnp.maximum(st["n"], 1.0)
        tap = LINEAR_INPUTS[names[0]]
        group = _group_of(names[0])
        fmts = [self.fmt(block, layer, nm) for nm in names]
        ws = [sub_module(block, nm).kernel.value for nm in names]
        mode, extra = "linear", None
        if (
            tap == "mlp_in"
            and self.cfg.mlp_loss
            and tuple(names) == ("mlp.gate_proj", "mlp.up_proj")
        ):
            mode, extra = "mlp", jnp.asarray(block.mlp.down_proj.kernel.value, jnp.float32)
            if not isinstance(block.mlp.down_proj.kernel.value, jax.Array):
                mode, extra = "linear", None
        c = self.mcfg
        if tap == "o_in":  # the scale must be shared by the query heads of one KV head
            _, x_mean = awq_lib.tie_heads(x_mean, c.n_heads, c.n_kv_heads, c.head_width)
        s, alpha, losses = awq_lib.search_scale(
            x, ws, fmts, x_mean, n_grid=self.cfg.n_grid, mode=mode, extra=extra
        )
        # fold: producer /= s, every consumer kernel (wanted or not) *= s
        if tap == "attn_in":
            _scale_vector(block.attn_norm.scale, 1.0 / s)
        elif tap == "mlp_in":
            _scale_vector(block.mlp_norm.scale, 1.0 / s)
        elif tap == "o_in":
            s_v = s.reshape(c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_width)[:, 0]
            _scale_columns(block.attn.v_proj, 1.0 / s_v.reshape(-1))
        elif tap == "down_in":
            _scale_columns(block.mlp.up_proj, 1.0 / s)
        for nm in group:
            k = sub_module(block, nm).kernel
            k.value = (jnp.asarray(k.value, jnp.float32) * s[:, None]).astype(k.value.dtype)
        xs = x / s[None, :]
        for nm, fmt in zip(names, fmts, strict=True):
            self._pending[nm] = (fmt, xs)
        rep = {
            "alpha": alpha,
            "loss_rtn": float(losses[0]),
            "loss_awq": float(jnp.min(losses)),
            "seconds": time.perf_counter() - t0,
        }
        reports = {nm: dict(rep) for nm in names}
        if self.cfg.quantize and not self._later_groups_wanted(layer, names):
            for nm, r in self._finish_block(block).items():
                reports.setdefault(nm, {}).update(r)
        return reports

    def _finish_block(self, block) -> dict:
        reports = {}
        for nm, (fmt, xs) in self._pending.items():
            k = sub_module(block, nm).kernel
            w = jnp.asarray(k.value)
            r = {}
            if self.cfg.clip and nm not in ("attn.q_proj", "attn.k_proj"):
                xc = xs[:: max(1, xs.shape[0] // self.cfg.clip_tokens)][: self.cfg.clip_tokens]
                wc, ratio = awq_lib.search_clip(
                    xc,
                    w.astype(jnp.float32),
                    fmt=fmt,
                    n_grid=self.cfg.clip_grid,
                    max_shrink=self.cfg.max_shrink,
                )
                w = wc.astype(w.dtype)
                r["clip_mean_ratio"] = float(jnp.mean(ratio))
            k.value = fmt.quantize(w)
            r["format"] = fmt.spec.describe()
            reports[nm] = r
        self._pending = {}
        return reports


def _scale_vector(param, factor):
    param.value = (jnp.asarray(param.value, jnp.float32) * factor).astype(param.value.dtype)


def _scale_columns(linear, factor_N):
    k = linear.kernel
    if not isinstance(k.value, jax.Array | np.ndarray):
        raise TypeError(
            f"cannot fold an AWQ scale into an already compressed kernel ({type(k.value).__name__})"
        )
    k.value = (jnp.asarray(k.value, jnp.float32) * factor_N[None, :]).astype(k.value.dtype)
    if linear.bias is not None:
        b = linear.bias
        b.value = (b.value * factor_N).astype(b.value.dtype)


# --------------------------------------------------------------------------------------------
# W8A8: SmoothQuant (int8) and static-scale FP8


class W8A8Method(_Assigned):
    """SmoothQuant (``alpha`` set: fold ``s`` into attn_norm / mlp_norm for q/k/v and gate/up)
    then W8A8 (``kind`` int8 or fp8_e4m3) with dynamic per-token or static per-tensor
    activation scales. ``quantize=False`` only folds (the float function must not change)."""

    def __init__(
        self,
        assigned,
        kind: str = "int8",
        alpha: float | None = 0.5,
        static_act: bool = False,
        quantize: bool = True,
    ):
        super().__init__(assigned)
        self.kind, self.alpha, self.static_act, self.quantize = kind, alpha, static_act, quantize

    def init_stats(self, path, w_KxN):
        if self._shares_input(path):
            return {"amax": jnp.zeros((0,), jnp.float32)}
        return {"amax": jnp.zeros((w_KxN.shape[0],), jnp.float32)}

    def update_stats(self, stats, x_TxK):
        if stats["amax"].shape[0] == 0:
            return stats
        x = x_TxK.reshape(-1, x_TxK.shape[-1]).astype(jnp.float32)
        return {"amax": jnp.maximum(stats["amax"], jnp.max(jnp.abs(x), axis=0))}

    def apply_group(self, block, layer, names, stats):
        amax = stats[names[0]]["amax"]
        tap = LINEAR_INPUTS[names[0]]
        group = _group_of(names[0])
        rep: dict = {}
        if self.alpha is not None and tap in ("attn_in", "mlp_in"):
            norm = block.attn_norm if tap == "attn_in" else block.mlp_norm
            kernels = [sub_module(block, nm).kernel for nm in group]
            if not all(isinstance(k.value, jax.Array | np.ndarray) for k in kernels):
                raise TypeError("SmoothQuant: the group's kernels are already compressed")
            s = smoothing_scales(amax, [k.value for k in kernels], self.alpha)
            new_norm, new_ws = fold_into_norm(norm.scale.value, [k.value for k in kernels], s)
            norm.scale.value = new_norm
            for k, w in zip(kernels, new_ws, strict=True):
                k.value = w
            amax = amax / s
            rep["smooth_max_ratio"] = float(jnp.max(s) / jnp.min(s))
        if self.quantize:
            act = float(jnp.max(amax)) if self.static_act else None
            for nm in names:
                k = sub_module(block, nm).kernel
                k.value = quantize_w8a8(k.value, self.kind, act)
        return {nm: dict(rep, kind=self.kind) for nm in names}


# --------------------------------------------------------------------------------------------
# Data-free conversions


def convert(
    model,
    assigned: Mapping[str, QuantSpec | None],
    fn: Callable[[str, Any, Any], Any],
    progress: bool = False,
) -> dict:
    """Apply ``fn(path, w, spec) -> new weight`` to every assigned kernel in place."""
    from tqdm.auto import tqdm

    out = {}
    for path, spec in tqdm(sorted(assigned.items()), desc="quantize", disable=not progress):
        if spec is None:
            continue
        w = get_param(model, path)
        if not isinstance(w, jax.Array | np.ndarray):
            continue  # already compressed (e.g. by a calibrated method)
        new = fn(path, w, spec)
        set_param(model, path, new)
        out[path] = {"format": new.spec.describe()} if hasattr(new, "spec") else {}
    return out


def rtn_fn(path, w, spec):
    return formats.make(resolve_spec(spec, w.shape)).quantize(w)


def llm_int8_fn(threshold: float = 6.0, keep_fp16: bool = False):
    return lambda path, w, spec: quantize_llm_int8(w, threshold, keep_fp16)


def w8a8_fn(kind: str):
    return lambda path, w, spec: quantize_w8a8(w, kind, None)


__all__ = [
    "AWQConfig",
    "AWQMethod",
    "GPTQMethod",
    "W8A8Method",
    "convert",
    "get_param",
    "llm_int8_fn",
    "model_bytes",
    "quantized_bits_per_weight",
    "resolve_spec",
    "rtn_fn",
    "set_param",
    "storage_bytes",
    "w8a8_fn",
]
