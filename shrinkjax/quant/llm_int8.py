"""LLM.int8(): vector-wise int8 matmul with a 16-bit decomposition for outlier features.

Dettmers, Lewis, Belkada, Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale", NeurIPS 2022 (arXiv:2208.07339), §3.

For ``Y = X W`` (X ``[T, K]`` tokens × input features, W ``[K, N]``):

* *vector-wise quantization* (§3.1): each token row of X gets its own absmax scale ``c_x``,
  each output column of W its own ``c_w``; ``Y ≈ (1 / (c_x ⊗ c_w)) · (X_i8 W_i8)`` with int32
  accumulation;
* *mixed-precision decomposition* (§3.2): input feature dimensions ``O = {k : max_t |X_tk| ≥ α}``
  (α = 6.0) are outliers, decided **at run time** from the actual activations of each call;
  they are multiplied in 16-bit and the rest in int8::

      Y = X[:, O] W[O, :]  (fp16)  +  dequant(X_i8[:, ¬O] W_i8[¬O, :])  (int8)

The weight is stored int8 with per-column scales (bitsandbytes' inference layout). By default
the 16-bit outlier rows ``W[O, :]`` are the dequantized int8 rows, as bitsandbytes does when
the fp16 weights are not kept (``has_fp16_weights=False``); ``keep_fp16=True`` also stores the
fp16 weight and uses its exact rows, the paper's formulation (2× the memory).
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
DEFAULT_THRESHOLD = 6.0


@register_weight_type
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["qweight", "w_scale", "fp16_weight"],
    meta_fields=["threshold", "shape", "dtype"],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8OutlierArray(StoredWeight):
    """LLM.int8() kernel ``[K, N]``: int8 ``qweight``, f32 ``w_scale [1, N]`` (absmax / 127 of
    each output column), optional fp16 copy, and the outlier threshold α."""

    qweight: jax.Array
    w_scale: jax.Array
    fp16_weight: jax.Array | None = None
    threshold: float = DEFAULT_THRESHOLD
    shape: tuple[int, int] = (0, 0)
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "threshold", float(self.threshold))

    STORED = ("qweight", "w_scale", "fp16_weight")

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.qweight.astype(jnp.float32) * self.w_scale).astype(dtype)

    def __repr__(self) -> str:
        return f"Int8OutlierArray(threshold={self.threshold}, shape={self.shape})"


@jax.jit
def _quantize_columns(w):
    amax = jnp.max(jnp.abs(w), axis=0, keepdims=True)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    return jnp.clip(jnp.round(w / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def quantize_llm_int8(
    w_KxN, threshold: float = DEFAULT_THRESHOLD, keep_fp16: bool = False
) -> Int8OutlierArray:
    """Vector-wise int8 weight (per output column absmax) for the LLM.int8() matmul."""
    w = jnp.asarray(w_KxN)
    if w.ndim != 2:
        raise ValueError(f"LLM.int8: weight must be 2-D [K, N], got {w.shape}")
    q, s = _quantize_columns(w.astype(jnp.float32))
    return Int8OutlierArray(
        qweight=q,
        w_scale=s,
        fp16_weight=w.astype(jnp.float16) if keep_fp16 else None,
        threshold=threshold,
        shape=w.shape,
        dtype=str(w.dtype),
    )


def outlier_columns(x_MxK, threshold: float):
    """Input features with any |x| ≥ threshold in this call (bool [K])."""
    return jnp.max(jnp.abs(x_MxK.astype(jnp.float32)), axis=0) >= threshold


def int8_matmul_decomposed(x_MxK, w: Int8OutlierArray):
    """The LLM.int8() product ``x @ W`` (f32 [M, N])."""
    xf = x_MxK.astype(jnp.float32)
    out = outlier_columns(xf, w.threshold)  # [K]
    x_reg = jnp.where(out, 0.0, xf)
    x_out = jnp.where(out, xf, 0.0)
    # int8 part: per-token absmax over the regular features only
    amax = jnp.max(jnp.abs(x_reg), axis=1, keepdims=True)
    sx = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    xq = jnp.clip(jnp.round(x_reg / sx), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    acc = jax.lax.dot_general(
        xq, w.qweight, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
    )
    y = acc.astype(jnp.float32) * sx * w.w_scale
    # 16-bit part: outlier features with their weight rows in fp16
    w16 = w.fp16_weight if w.fp16_weight is not None else w.dequantize(jnp.float16)
    y16 = jnp.matmul(x_out.astype(jnp.float16), w16, preferred_element_type=jnp.float32)
    return y + y16


@dispatch.register(Int8OutlierArray)
def _llm_int8_linear(x_MxK, w: Int8OutlierArray):
    lead = x_MxK.shape[:-1]
    y = int8_matmul_decomposed(x_MxK.reshape(-1, x_MxK.shape[-1]), w)
    return y.reshape(*lead, -1).astype(x_MxK.dtype)


__all__ = [
    "DEFAULT_THRESHOLD",
    "Int8OutlierArray",
    "int8_matmul_decomposed",
    "outlier_columns",
    "quantize_llm_int8",
]
