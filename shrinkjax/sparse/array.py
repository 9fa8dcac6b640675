"""N:M semi-structured sparse kernels as a JAX pytree: :class:`NMSparseArray`.

A kernel ``w_KxN`` (``[in, out]``) with at most ``n`` nonzeros in every group of ``m``
consecutive input rows of each column is stored as

==========  ============================  ===================================================
field       dtype / shape                 meaning
==========  ============================  ===================================================
values      [K*n/m, N] float, or a        the kept weights, group by group along K, in
            ``QuantizedArray`` of that    ascending row order within each group
            logical shape
index       uint8 [K*n/m*b/8, N]          position (0..m-1) of each kept weight inside its
                                          group, b-bit codes packed along K with
                                          ``shrinkjax.quant.array.pack`` (b = 2 for m <= 4,
                                          3 for m <= 8, 4 for m <= 16)
==========  ============================  ===================================================

with static metadata ``n``, ``m``, the logical shape ``(K, N)`` and the dense dtype. For 2:4
this is NVIDIA's compressed layout (half the values plus 2 bits of metadata per kept value).
``values`` may itself be quantized — e.g. 2:4 with int4 groups: int4 g128 on the dense K
axis is int4 g64 on the compressed axis, and the per-group scales carry over unchanged
(:func:`compress` with ``quant=``). :attr:`NMSparseArray.nbytes` counts exactly the stored
leaves, so checkpoints (which save the leaves) and memory reports see the real size.

``shrinkjax.kernels.dispatch.linear`` takes these kernels through a reference path (expand to
dense, then matmul); a fused 2:4 kernel can register for the type later.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from shrinkjax.io.checkpoint import register_weight_type
from shrinkjax.kernels import dispatch
from shrinkjax.quant.array import (
    PACK_UNIT,
    QuantizedArray,
    StoredWeight,
    leaf_nbytes,
    pack,
    unpack,
)
from shrinkjax.sparse.masks import nm_mask

__all__ = ["NMSparseArray", "compress", "index_bits", "stored_nbytes"]


def index_bits(m: int, rows: int | None = None) -> int:
    """Bits per stored position for groups of ``m`` (the narrowest packable width; with
    ``rows`` the compressed row count must be a multiple of the width's packing unit)."""
    need = max(1, math.ceil(math.log2(m)))
    for b in sorted(PACK_UNIT):
        if b >= need and (rows is None or rows % PACK_UNIT[b] == 0):
            return b
    raise ValueError(f"no index width for m={m} with {rows} compressed rows")


@register_weight_type
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "index"],
    meta_fields=["n", "m", "shape", "dtype"],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class NMSparseArray(StoredWeight):
    """An N:M sparse ``[K, N]`` kernel (see the module docstring); a pytree of stored arrays.
    ``nbytes``: the values (packed codes and scales when quantized) plus the packed position
    metadata."""

    STORED = ("values", "index")

    values: jax.Array | QuantizedArray
    index: jax.Array
    n: int
    m: int
    shape: tuple[int, int]
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if len(self.shape) != 2 or self.shape[0] % self.m or not 0 < self.n < self.m:
            raise ValueError(f"NMSparseArray: bad shape {self.shape} for {self.n}:{self.m}")

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def kept_rows(self) -> int:
        return self.shape[0] // self.m * self.n

    def positions(self) -> jax.Array:
        """Positions (0..m-1) of the kept values, ``[K/m, n, N]`` int32."""
        return _positions(self.index, self.n, self.m, self.shape)

    def kept_values(self, dtype=jnp.float32) -> jax.Array:
        v = self.values
        v = v.dequantize(jnp.float32) if isinstance(v, QuantizedArray) else jnp.asarray(v)
        return v.astype(dtype)

    def mask(self) -> jax.Array:
        """Keep-mask ``[K, N]`` (bool)."""
        return _mask(self.index, self.n, self.m, self.shape)

    def to_dense(self, dtype=None) -> jax.Array:
        """The dense ``[K, N]`` kernel (zeros where pruned)."""
        dense = _expand(self.kept_values(jnp.float32), self.index, self.n, self.m, self.shape)
        return dense.astype(dtype or self.dtype)

    def __repr__(self) -> str:
        inner = (
            self.values.spec.describe() if isinstance(self.values, QuantizedArray) else self.dtype
        )
        return (
            f"NMSparseArray({self.pattern}, {inner}, shape={self.shape}, "
            f"{self.bits_per_weight:.3f} bits/weight)"
        )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _positions(index, n: int, m: int, shape):
    k, cols = shape
    rows = k // m * n
    idx = unpack(index, index_bits(m, rows), rows).astype(jnp.int32)
    return idx.reshape(k // m, n, cols)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _mask(index, n: int, m: int, shape):
    onehot = jax.nn.one_hot(_positions(index, n, m, shape), m, axis=2, dtype=jnp.bool_)
    return jnp.any(onehot, axis=1).reshape(shape)  # [K/m, n, m, N] -> [K/m, m, N]


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _expand(values, index, n: int, m: int, shape):
    k, cols = shape
    vals = values.reshape(k // m, n, cols)
    onehot = jax.nn.one_hot(_positions(index, n, m, shape), m, axis=2, dtype=jnp.float32)
    dense = jnp.einsum("gjn,gjmn->gmn", vals, onehot, precision=jax.lax.Precision.HIGHEST)
    return dense.reshape(k, cols)


def compress(w_KxN, n: int, m: int, mask=None, *, quant=None, qparams=None) -> NMSparseArray:
    """Store ``w_KxN`` as N:M sparse.

    ``mask`` (keep, ``[K, N]``) must have exactly ``n`` kept per group; without it the ``n``
    largest ``|w|`` of each group are kept (for a weight already pruned to N:M this keeps its
    nonzeros). ``quant`` (a ``shrinkjax.quant.formats`` Format for the *dense* K axis, e.g.
    int4 g128) quantizes the kept values: with ``qparams`` (stacked per-group qparams fitted on
    the dense groups, as SparseGPT's joint quantization returns them) the values are encoded on
    exactly that grid, otherwise round-to-nearest.
    """
    w = jnp.asarray(w_KxN)
    k, cols = w.shape
    if k % m:
        raise ValueError(f"N:M {n}:{m} needs the input dim K={k} to be a multiple of {m}")
    if mask is None:
        mask = nm_mask(jnp.abs(w.astype(jnp.float32)), n, m)
    mask = jnp.asarray(mask, bool)
    vals, index, lo, hi = _compress(w, mask, n, m)
    if not (int(lo) == n == int(hi)):
        raise ValueError(f"mask is not {n}:{m}: group keep-counts range over {int(lo)}..{int(hi)}")
    values = vals
    if quant is not None:
        values = _quantize_values(vals, quant, n, m, k, qparams)
    return NMSparseArray(values=values, index=index, n=n, m=m, shape=(k, cols), dtype=str(w.dtype))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _compress(w, mask, n: int, m: int):
    k, cols = w.shape
    g = mask.reshape(k // m, m, cols)
    counts = jnp.sum(g, axis=1)
    # kept positions first, ascending (stable sort of "not kept")
    pos = jnp.argsort(~g, axis=1, stable=True)[:, :n]  # [K/m, n, N]
    vals = jnp.take_along_axis(w.reshape(k // m, m, cols), pos, axis=1).reshape(-1, cols)
    rows = k // m * n
    index = pack(pos.reshape(rows, cols).astype(jnp.uint8), index_bits(m, rows))
    return vals, index, jnp.min(counts), jnp.max(counts)


def _quantize_values(vals, quant, n: int, m: int, k: int, qparams):
    from shrinkjax.quant import formats

    spec = quant.spec
    g = quant.group_rows(k)
    if g % m:
        raise ValueError(f"quantization groups of {g} rows do not hold whole {n}:{m} groups")
    if spec.granularity == "group":
        # dense groups of g rows (the last one possibly shorter, ragged int-k) are groups of
        # g*n/m compressed rows: K % m == 0 and g % m == 0, so a short last dense group of r rows
        # is a short last compressed group of r*n/m rows and the group count is unchanged
        try:
            inner = formats.make(spec.replace(group_size=g // m * n))
            inner.check_shape(tuple(vals.shape))
        except ValueError as e:
            raise ValueError(
                f"{spec.describe()} on K={k} cannot be stored on the {n}:{m} compressed axis "
                f"({vals.shape[0]} rows, groups of {g // m * n}): {e}"
            ) from e
        if inner.n_groups(vals.shape[0]) != quant.n_groups(k):
            raise ValueError(
                f"{n}:{m} compression of {spec.describe()}: {quant.n_groups(k)} groups on K={k} "
                f"but {inner.n_groups(vals.shape[0])} on the {vals.shape[0]} compressed rows"
            )
    else:
        inner = quant
    if qparams is None:
        return inner.quantize(vals)
    qparams = quant.stack(qparams)
    rows = jnp.shape(qparams["scales"])[0]
    if rows != quant.n_groups(k):
        raise ValueError(
            f"qparams hold {rows} groups; {spec.describe()} on K={k} has {quant.n_groups(k)} "
            f"(fit them on the dense K axis, as SparseGPT's joint quantization does)"
        )
    return inner.from_groups(vals, qparams)


@dispatch.register(NMSparseArray)
def _linear_reference(x_MxK, w: NMSparseArray):
    """Reference path: expand to the dense kernel (f32), then the dense matmul."""
    return dispatch.linear(x_MxK, w.to_dense(jnp.float32))


def stored_nbytes(tree) -> int:
    """Bytes really stored by a pytree of (possibly compressed) kernels: every leaf's buffer."""
    return int(sum(leaf_nbytes(x) for x in jax.tree.leaves(tree)))
