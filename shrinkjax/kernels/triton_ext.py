"""One primitive Pallas' Triton lowering lacks: a dot that accumulates into a given tensor.

``jnp.dot`` inside a Pallas (Triton) kernel lowers to ``tt.dot(a, b, zeros)`` followed by an
``arith.addf`` into the running sum. On Hopper that is one ``wgmma`` plus a wait *and* an FADD
per accumulator register for every dot: in :mod:`shrinkjax.kernels.int4_tc` (eight K=16 dots per
128-row chunk) the FADDs alone were one instruction per weight (``scripts/triton_sass.py``).
:func:`dot_acc` lowers to ``tt.dot(a, b, acc)`` so consecutive dots chain on the tensor core.

Outside a Triton lowering (interpret mode, CPU, any XLA backend) it is ``acc + a @ b`` with f32
accumulation. The Triton rule uses jax internals (``jax._src.pallas.triton.lowering``,
``jax._src.lib.triton``); where they are missing :data:`HAS_TRITON_RULE` is False and kernels
fall back to ``acc + jnp.dot(...)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src.interpreters import mlir

dot_acc_p = jax_core.Primitive("shrinkjax_dot_acc")


def _check(a, b, acc):
    if a.ndim != 2 or b.ndim != 2 or acc.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"dot_acc shapes: a {a.shape} @ b {b.shape} into acc {acc.shape}")
    if a.dtype != b.dtype:
        raise ValueError(f"dot_acc needs equal operand dtypes, got {a.dtype} and {b.dtype}")


def _impl(a, b, acc):
    return acc + jnp.dot(a, b, preferred_element_type=jnp.float32).astype(acc.dtype)


@dot_acc_p.def_abstract_eval
def _abstract(a, b, acc):
    _check(a, b, acc)
    return jax_core.ShapedArray(acc.shape, acc.dtype)


dot_acc_p.def_impl(_impl)
mlir.register_lowering(dot_acc_p, mlir.lower_fun(_impl, multiple_results=False))

try:
    from jax._src.lib.triton import dialect as _tt
    from jax._src.pallas.triton import lowering as _tl

    @_tl.register_lowering(dot_acc_p)
    def _triton_rule(ctx, a, b, acc):
        del ctx
        return _tt.dot(a, b, acc)

    HAS_TRITON_RULE = True
except (ImportError, AttributeError):  # pragma: no cover - jax without the Triton lowering
    HAS_TRITON_RULE = False


def dot_acc(a, b, acc):
    """``acc + a @ b`` (f32 ``acc [M, N]``; ``a [M, K]``, ``b [K, N]`` of one dtype)."""
    _check(a, b, acc)
    if not HAS_TRITON_RULE:  # pragma: no cover
        return _impl(a, b, acc)
    return dot_acc_p.bind(a, b, acc)


__all__ = ["HAS_TRITON_RULE", "dot_acc", "dot_acc_p"]
del jax
