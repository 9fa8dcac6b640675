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
        w = jnp.asarray(w_KxN).astype(x_MxK.dtype)
        return jnp.matmul(x_MxK, w, preferred_element_type=jnp.float32).astype(x_MxK.dtype)
    for t in type(w_KxN).__mro__:
        if t in _IMPLS:
            return _IMPLS[t](x_MxK, w_KxN, **kw)
    raise TypeError(
        f"no linear implementation registered for weight type {type(w_KxN).__name__}; "
        f"known: {sorted(t.__name__ for t in _IMPLS)}"
    )
