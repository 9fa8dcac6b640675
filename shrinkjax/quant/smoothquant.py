"""SmoothQuant W8A8 and the W8A8 weight type (int8 or FP8 E4M3 weights *and* activations).

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023 (arXiv:2211.10438).

Activation outliers live in a few input channels; SmoothQuant migrates them into the weights
with a per-input-channel scale (paper eq. 4)::

    s_j = max|X_j|^α / max|W_j|^(1-α)        (α = 0.5; max over calibration tokens / outputs)
    Y = (X diag(s)⁻¹) (diag(s) W)

and folds ``diag(s)⁻¹`` into the preceding RMSNorm scale, so the float function is unchanged
(q/k/v share ``attn_norm``, gate/up share ``mlp_norm``; ``max|W_j|`` is taken over all the
linears that share the input, as the reference ``smooth_ln_fcs`` does; o_proj and down_proj
are not smoothed, like the reference's Llama recipe). Then every linear becomes W8A8:

* weights: int8 per output channel, symmetric (``s_w = max|W_:,n| / 127``);
* activations: int8 *per token*, dynamic (``s_x = max|x_t| / 127`` computed at matmul time),
  or static per-tensor (a calibrated scale);
* ``y = (x_q ·int32 W_q) · s_x · s_w``: a true int8 × int8 → int32 matmul.

:class:`W8A8Array` also carries FP8 E4M3 W8A8 (``kind="fp8_e4m3"``: E4M3 weights per output
channel, E4M3 activations per token or with a static per-tensor scale, f32 accumulation), the
recipe of FP8 inference engines.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from shrinkjax.io.checkpoint import register_weight_type
from shrinkjax.kernels import dispatch
from shrinkjax.quant.array import StoredWeight

INT8_MAX = 127.0
E4M3_MAX = 448.0
KINDS = ("int8", "fp8_e4m3")
HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Smoothing math.


def smoothing_scales(act_absmax_K, weights_KxN: list, alpha: float = 0.5, eps: float = 1e-5):
    """Per-input-channel SmoothQuant scales ``s [K]`` for linears sharing one input.

    ``act_absmax_K``: max |x_k| over calibration tokens; ``weights_KxN``: the kernels
    ``[K, N_i]`` fed by that input (their max |W_k,:| is taken jointly)."""
    a = jnp.maximum(jnp.asarray(act_absmax_K, jnp.float32), eps)
    wmax = jnp.max(
        jnp.stack([jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=1) for w in weights_KxN]),
        axis=0,
    )
    wmax = jnp.maximum(wmax, eps)
    s = a**alpha / wmax ** (1.0 - alpha)
    return jnp.maximum(s, eps)


def fold_into_norm(norm_scale_K, kernels_KxN: list, s_K):
    """(norm scale / s, [diag(s) W for W in kernels]): the float function is unchanged."""
    s = jnp.asarray(s_K, jnp.float32)
    new_norm = (jnp.asarray(norm_scale_K, jnp.float32) / s).astype(jnp.asarray(norm_scale_K).dtype)
    new_ws = [
        (jnp.asarray(w, jnp.float32) * s[:, None]).astype(jnp.asarray(w).dtype) for w in kernels_KxN
    ]
    return new_norm, new_ws


# --------------------------------------------------------------------------------------------
# The W8A8 weight type.


@register_weight_type
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["qweight", "w_scale", "act_scale"],
    meta_fields=["kind", "shape", "dtype"],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class W8A8Array(StoredWeight):
    """A ``[K, N]`` kernel quantized for 8-bit weights *and* 8-bit activations.

    ``qweight``: int8 values (``kind="int8"``) or E4M3 bit patterns as uint8
    (``kind="fp8_e4m3"``), ``[K, N]``; ``w_scale``: f32 ``[1, N]`` per output channel;
    ``act_scale``: f32 scalar static activation scale, or None for dynamic per-token scales.
    """

    qweight: jax.Array
    w_scale: jax.Array
    act_scale: jax.Array | None = None
    kind: str = "int8"
    shape: tuple[int, int] = (0, 0)
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.kind not in KINDS:
            raise ValueError(f"W8A8Array.kind must be one of {KINDS}, got {self.kind!r}")

    STORED = ("qweight", "w_scale", "act_scale")

    def weight_values(self) -> jax.Array:
        """The 8-bit weight values as f32 (integers, or E4M3 values), ``[K, N]``."""
        if self.kind == "int8":
            return self.qweight.astype(jnp.float32)
        return jax.lax.bitcast_convert_type(self.qweight, jnp.float8_e4m3fn).astype(jnp.float32)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.weight_values() * self.w_scale).astype(dtype)

    def __repr__(self) -> str:
        act = "static" if self.act_scale is not None else "per-token"
        return f"W8A8Array({self.kind}, {act} activations, shape={self.shape})"


def quantize_w8a8(w_KxN, kind: str = "int8", act_absmax=None) -> W8A8Array:
    """W8A8 kernel: per-output-channel weight scales; static activation scale from the
    calibrated ``act_absmax`` (a scalar max |x|) or dynamic per-token when None."""
    if kind not in KINDS:
        raise ValueError(f"W8A8 kind must be one of {KINDS}, got {kind!r}")
    w = jnp.asarray(w_KxN)
    if w.ndim != 2:
        raise ValueError(f"W8A8: weight must be 2-D [K, N], got {w.shape}")
    qmax = INT8_MAX if kind == "int8" else E4M3_MAX
    qw, scale = _quantize_weight(w.astype(jnp.float32), kind)
    act = None
    if act_absmax is not None:
        act = jnp.maximum(jnp.asarray(act_absmax, jnp.float32), 1e-8) / qmax
    return W8A8Array(
        qweight=qw, w_scale=scale, act_scale=act, kind=kind, shape=w.shape, dtype=str(w.dtype)
    )


def w8a8_from_quantized(qa, kind: str) -> W8A8Array:
    """A per-output-channel 8-bit :class:`~shrinkjax.quant.array.QuantizedArray` (e.g. from
    GPTQ on the ``fp8_e4m3`` or symmetric ``int8`` grid) as a W8A8 kernel with dynamic
    per-token activations: same weight values, bit for bit."""
    spec = qa.spec
    want = {"fp8_e4m3": "fp8_e4m3", "int8": "int8"}.get(kind)
    if (
        spec.format != want
        or spec.granularity != "channel"
        or (kind == "int8" and not spec.symmetric)
        or qa.zeros is not None
    ):
        raise ValueError(
            f"W8A8 ({kind}) needs a per-channel symmetric {kind} weight, got {spec.describe()}"
        )
    codes = qa.codes  # 8-bit codes are stored unpacked, [K, N]
    if kind == "int8":  # offset binary (q + 128) -> two's complement int8
        qw = (codes.astype(jnp.int32) - 128).astype(jnp.int8)
    else:
        qw = codes
    return W8A8Array(
        qweight=qw,
        w_scale=qa.scales.astype(jnp.float32).reshape(1, -1),
        act_scale=None,
        kind=kind,
        shape=tuple(qa.shape),
        dtype=str(qa.dtype),
    )


@functools.partial(jax.jit, static_argnames=("kind",))
def _quantize_weight(w, kind):
    amax = jnp.max(jnp.abs(w), axis=0, keepdims=True)
    qmax = INT8_MAX if kind == "int8" else E4M3_MAX
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    v = w / scale
    if kind == "int8":
        return jnp.clip(jnp.round(v), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale
    q = jnp.clip(v, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return jax.lax.bitcast_convert_type(q, jnp.uint8), scale


def quantize_activations(x_MxK, kind: str, act_scale=None):
    """(8-bit x, scale [M, 1] or scalar): per-token absmax when ``act_scale`` is None."""
    xf = x_MxK.astype(jnp.float32)
    qmax = INT8_MAX if kind == "int8" else E4M3_MAX
    if act_scale is None:
        amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
        s = jnp.where(amax > 0, amax / qmax, 1.0)
    else:
        s = act_scale.astype(jnp.float32)
    v = jnp.clip(xf / s, -qmax, qmax)
    if kind == "int8":
        return jnp.round(v).astype(jnp.int8), s
    return v.astype(jnp.float8_e4m3fn), s


@dispatch.register(W8A8Array)
def _w8a8_linear(x_MxK, w: W8A8Array):
    """Quantize x at matmul time, 8-bit matmul with wide accumulation, rescale."""
    lead = x_MxK.shape[:-1]
    x2 = x_MxK.reshape(-1, x_MxK.shape[-1])
    xq, sx = quantize_activations(x2, w.kind, w.act_scale)
    if w.kind == "int8":
        acc = jax.lax.dot_general(
            xq, w.qweight, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        ).astype(jnp.float32)
    else:  # E4M3 values are exact in bf16; products accumulate in f32
        wq = jax.lax.bitcast_convert_type(w.qweight, jnp.float8_e4m3fn)
        acc = jnp.matmul(
            xq.astype(jnp.bfloat16), wq.astype(jnp.bfloat16), preferred_element_type=jnp.float32
        )
    y = acc * sx * w.w_scale
    return y.reshape(*lead, -1).astype(x_MxK.dtype)


__all__ = [
    "W8A8Array",
    "fold_into_norm",
    "quantize_activations",
    "quantize_w8a8",
    "w8a8_from_quantized",
    "smoothing_scales",
]
