"""The one dispatch point for linear layers: ``linear(x, w)`` for any weight type.

Dense weights are plain arrays [in, out]. Compressed weight types (quantized, N:M sparse)
register an implementation with :func:`register`; the implementation chooses a Pallas kernel
when one applies and falls back to a pure-jnp reference otherwise. The model calls only this.

Packed kernel layouts (``shrinkjax.kernels.layouts``) have two GPU paths, picked per call by
:func:`choose_path` from the number of rows ``M`` of ``x`` (all leading dims flattened):

* ``"fused"`` (decode, ``M < PREFILL_MIN_M``): one Pallas kernel streams the packed weight and
  dequantizes it tile by tile in registers. Memory-bound; the packed weight is read once.
* ``"dequant_dot"`` (prefill, ``M >= PREFILL_MIN_M``): a bandwidth-bound Pallas kernel writes the
  bf16 ``W[K, N]`` to HBM, then XLA's cuBLAS GEMM (tensor cores, f32 accumulation) multiplies.
  At large M the GEMM is compute-bound and cuBLAS beats a Triton kernel that must also decode
  in its inner loop; the extra pass costs ``~(packed + 2 K N) bytes / bandwidth`` (about 60 µs
  for 8192 x 8192 int4 on an H100 against a ~0.8 ms GEMM at M = 4096).

``linear(x, w, path=...)`` forwards ``path`` ("auto" | "fused" | "dequant_dot") to the packed
kernels so benchmarks can compare both; the model uses the default "auto".
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_IMPLS: dict[type, Callable] = {}

# M >= this: dequantize-then-cuBLAS ("dequant_dot"), else the fused kernel. H100, 2026-11-27
# (benchmarks/RESULTS.md): at M = 256 dequant_dot beat the fused kernels for every format and
# shape (int4 8192²: 97 vs 141 µs); at M <= 16 the fused kernels are 2–4× faster.
PREFILL_MIN_M = 256
PATHS = ("auto", "fused", "dequant_dot")


def choose_path(path: str, m: int) -> str:
    """``"fused"`` or ``"dequant_dot"`` for ``m`` rows of x (``"auto"`` compares with
    :data:`PREFILL_MIN_M`, read at call time so it can be changed for experiments)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        return "dequant_dot" if m >= PREFILL_MIN_M else "fused"
    return path


LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_LOW_PRECISION_BACKWARD = [False]  # set by low_precision_backward(), read at trace time
_OPAQUE_INPUT = [False]  # set by opaque_input(), read at trace time


@contextlib.contextmanager
def _trace_flag(cell: list, on: bool):
    """Set ``cell[0]`` to ``on`` while the context is open (flags read at trace time)."""
    old = cell[0]
    cell[0] = bool(on)
    try:
        yield
    finally:
        cell[0] = old


def low_precision_backward(on: bool = True):
    """Dense low-precision linears traced inside this context use :func:`mixed_matmul`
    (backward GEMMs in bf16/f16 instead of f32, as PyTorch autocast). The train step enters it
    when ``StepConfig.low_precision_backward`` is set (on in ``configs/distill``): on an H100 the
    8 x 2048 logit-KD step ran 1.40x faster with it, at the same distilled quality
    (``benchmarks/RESULTS.md``)."""
    return _trace_flag(_LOW_PRECISION_BACKWARD, on)


def opaque_input(on: bool = True):
    """Trace-time hint for the linears called inside: their x comes from a kernel XLA cannot
    fuse into (a Pallas attention kernel, a custom call), so a reduction of x that a format
    needs (int4's ``sum_k x`` per group) would run as an XLA kernel of its own. Kernels that
    can do it themselves then do (:data:`shrinkjax.kernels.int4_tc.OPAQUE_XSUM`). The Llama
    attention enters it around ``o_proj``."""
    return _trace_flag(_OPAQUE_INPUT, on)


def input_is_opaque() -> bool:
    """True inside :func:`opaque_input` (at trace time)."""
    return _OPAQUE_INPUT[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_matmul(x_MxK, w_KxN, out_dtype):
    """``x @ w`` for low-precision (bf16/f16) operands of one dtype, f32 accumulation, the
    result in ``out_dtype``; the backward pass is two GEMMs in the operands' dtype (f32
    accumulation) on the cotangent rounded to that dtype — the usual mixed-precision rule.

    Why: autodiff of ``matmul(x, w, preferred_element_type=f32)`` feeds the f32 cotangent to
    the transposed dots, which XLA then runs as f32 (TF32) GEMMs: on an H100 they took ~10 ms
    of a 100 ms SmolLM2 logit-KD step (``scripts/trace_summary.py`` of
    ``benchmarks/distill_speed.py --profile``, 2026-11-27); with this rule the step went from
    101 to 72 ms (``benchmarks/RESULTS.md``). The forward is unchanged."""
    return jnp.matmul(x_MxK, w_KxN, preferred_element_type=jnp.float32).astype(out_dtype)


def _mixed_fwd(x, w, out_dtype):
    return mixed_matmul(x, w, out_dtype), (x, w)


def _mixed_bwd(out_dtype, res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.matmul(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    k, n = w.shape
    dw = jnp.matmul(
        x.reshape(-1, k).T, g.reshape(-1, n), preferred_element_type=jnp.float32
    ).astype(w.dtype)
    return dx, dw


mixed_matmul.defvjp(_mixed_fwd, _mixed_bwd)


def dense_matmul(x_MxK, w_KxN, out_dtype=None):
    """``x @ w`` (f32 accumulation) in ``out_dtype`` (default x's dtype), w cast to x's dtype;
    inside :func:`low_precision_backward`, low-precision x goes through :func:`mixed_matmul`
    (low-precision backward GEMMs)."""
    out_dtype = jnp.dtype(out_dtype or x_MxK.dtype)
    w = jnp.asarray(w_KxN).astype(x_MxK.dtype)
    if x_MxK.dtype in LOW_PRECISION and _LOW_PRECISION_BACKWARD[0]:
        return mixed_matmul(x_MxK, w, out_dtype)
    return jnp.matmul(x_MxK, w, preferred_element_type=jnp.float32).astype(out_dtype)


def register(weight_type: type):
    """Decorator: ``@register(QuantizedArray) def _(x, w): ...``."""

    def deco(fn):
        _IMPLS[weight_type] = fn
        return fn

    return deco


def linear(x_MxK, w_KxN, **kw):
    """y[..., N] = x[..., K] @ W[K, N] in x's dtype (f32 accumulation).

    ``kw`` (e.g. ``path="dequant_dot"``) is passed to the registered implementation."""
    if isinstance(w_KxN, jax.Array | np.ndarray):
        return dense_matmul(x_MxK, w_KxN)
    for t in type(w_KxN).__mro__:
        if t in _IMPLS:
            return _IMPLS[t](x_MxK, w_KxN, **kw)
    raise TypeError(
        f"no linear implementation registered for weight type {type(w_KxN).__name__}; "
        f"known: {sorted(t.__name__ for t in _IMPLS)}"
    )
