"""The one dispatch point for linear layers: ``linear(x, w)`` for any weight type.

Dense weights are plain arrays [in, out]. Compressed weight types (quantized, N:M sparse)
register an implementation with :func:`register`; the implementation chooses a Pallas kernel
when one applies and falls back to a pure-jnp reference otherwise. The model calls only this.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_IMPLS: dict[type, Callable] = {}


def register(weight_type: type):
    """Decorator: ``@register(QuantizedArray) def _(x, w): ...``."""

    def deco(fn):
        _IMPLS[weight_type] = fn
        return fn

    return deco


def linear(x_MxK, w_KxN):
    """y[..., N] = x[..., K] @ W[K, N] in x's dtype (f32 accumulation)."""
    if isinstance(w_KxN, jax.Array | np.ndarray):
        w = jnp.asarray(w_KxN).astype(x_MxK.dtype)
        return jnp.matmul(x_MxK, w, preferred_element_type=jnp.float32).astype(x_MxK.dtype)
    for t in type(w_KxN).__mro__:
        if t in _IMPLS:
            return _IMPLS[t](x_MxK, w_KxN)
    raise TypeError(
        f"no linear implementation registered for weight type {type(w_KxN).__name__}; "
        f"known: {sorted(t.__name__ for t in _IMPLS)}"
    )
