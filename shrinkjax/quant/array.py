"""Quantized weights as a JAX pytree: :class:`QuantSpec`, :class:`QuantizedArray`, bit packing.

A linear kernel ``w_KxN`` (K = input features, N = output features, stored ``[in, out]`` like
every kernel in shrinkjax) is replaced by a :class:`QuantizedArray` whose array children are

==========  =====================  ==========================================================
field       dtype / shape          meaning (per format; see ``shrinkjax.quant.formats.*``)
==========  =====================  ==========================================================
codes       uint8 [K*b/8, N]       b-bit element codes packed along K (layout below)
scales      [g, N] or [g, 1]       one scale per group of G input rows and output column,
                                   g = ceil(K/G) (G = K for per-channel, [1, 1] per-tensor;
                                   int-k allow a shorter last group when G does not divide K)
zeros       uint8 [g, N] | None    integer zero points (asymmetric int-k only)
scales2     f32 | None             second-level scales (NF4 double quant, NVFP4 tensor scale)
zeros2      f32 | None             second-level offsets (NF4 double quant)
==========  =====================  ==========================================================

and whose static metadata is the resolved :class:`QuantSpec`, the logical shape ``(K, N)`` and
the dtype of the float weight it replaces. Memory is exactly ``b * K * N / 8`` bytes of codes
plus the bytes of the scale-side arrays (:attr:`QuantizedArray.nbytes`).

Packing (along K, little-endian within a packing unit; unit = ``lcm(b, 8) / b`` codes of one
output column n in consecutive rows):

* b = 8: ``byte[k, n] = code[k, n]``.
* b = 4: ``byte[j, n] = code[2j, n] | code[2j+1, n] << 4`` -- the *low nibble is the first
  (even) row*; codes ``[1, 2]`` pack to ``0x21``.
* b = 2: ``byte[j, n] = sum_i code[4j+i, n] << 2i`` (first row in the lowest two bits).
* b = 3: dense, 8 codes in 3 bytes: ``v = sum_i code[8j+i, n] << 3i`` (a 24-bit integer),
  ``byte[3j+t, n] = (v >> 8t) & 0xFF`` -- codes 0..7 pack to ``88 C6 FA``.

K must be a multiple of the packing unit (2, 4, 8, 1 for b = 4, 2, 3, 8).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from shrinkjax.io.checkpoint import register_weight_type
from shrinkjax.kernels import dispatch

GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = ("float32", "float16", "bfloat16")
# Codes per packing unit along K for each supported code width.
PACK_UNIT = {2: 4, 3: 8, 4: 2, 8: 1}


@register_weight_type  # nested static metadata of a checkpointed QuantizedArray
@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What to quantize a weight to (hashable; the static metadata of a QuantizedArray).

    Attributes:
      format: registered format name: int2, int3, int4, int8, fp8_e4m3, fp8_e5m2, nf4, mxfp4,
        nvfp4 (see ``shrinkjax.quant.formats.names()``).
      group_size: input rows (along K) sharing one scale when ``granularity == "group"``;
        ``None`` = the format's default (int-k 128, nf4 64, mxfp4 32, nvfp4 16).
      granularity: ``"tensor"`` (one scale), ``"channel"`` (one per output column),
        ``"group"`` (one per ``group_size`` input rows per output column); ``None`` = default.
      symmetric: int-k only: absmax (True) or min-max with an integer zero point (False).
      double_quant: nf4 only: quantize the absmax scales to FP8 in blocks of 256 (QLoRA).
      scale_dtype: storage dtype of float scales (float32, float16, bfloat16); ``None`` =
        the format's default. Scales are rounded *up* into it so no element clips.
    """

    format: str
    group_size: int | None = None
    granularity: str | None = None
    symmetric: bool = True
    double_quant: bool = False
    scale_dtype: str | None = None

    def __post_init__(self):
        if not isinstance(self.format, str) or not self.format:
            raise ValueError(f"QuantSpec.format must be a format name, got {self.format!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int | np.integer)
            or self.group_size <= 0
        ):
            raise ValueError(
                f"QuantSpec.group_size must be a positive int, got {self.group_size!r}"
            )
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"QuantSpec.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}"
            )

    def replace(self, **kw) -> QuantSpec:
        return dataclasses.replace(self, **kw)

    def describe(self) -> str:
        """Short human label, e.g. ``int4 g128 asym``."""
        parts = [self.format]
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        elif self.granularity:
            parts.append(f"per-{self.granularity}")
        if self.format.startswith("int"):
            parts.append("sym" if self.symmetric else "asym")
        if self.double_quant:
            parts.append("dq")
        return " ".join(parts)


def _check_pack(shape, bits: int, what: str = "codes"):
    if bits not in PACK_UNIT:
        raise ValueError(f"unsupported code width {bits} bits (supported: {sorted(PACK_UNIT)})")
    if len(shape) != 2:
        raise ValueError(f"{what} must be 2-D [K, N], got shape {tuple(shape)}")


@functools.partial(jax.jit, static_argnums=1)
def pack(codes_KxN, bits: int) -> jax.Array:
    """Pack b-bit codes (uint8 values < 2**b) along K into uint8 ``[K * b / 8, N]``."""
    _check_pack(codes_KxN.shape, bits)
    k, n = codes_KxN.shape
    unit = PACK_UNIT[bits]
    if k % unit:
        raise ValueError(
            f"cannot pack {bits}-bit codes of shape {(k, n)}: K={k} is not a multiple of {unit}"
        )
    c = jnp.asarray(codes_KxN).astype(jnp.uint32)
    if bits == 8:
        return c.astype(jnp.uint8)
    c = c.reshape(k // unit, unit, n)
    v = functools.reduce(
        jnp.bitwise_or, [c[:, i] << jnp.uint32(bits * i) for i in range(unit)]
    )  # [K/unit, N], unit*bits <= 24 bits
    nbytes = unit * bits // 8
    out = jnp.stack([(v >> jnp.uint32(8 * t)) & jnp.uint32(0xFF) for t in range(nbytes)], axis=1)
    return out.reshape(k // unit * nbytes, n).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=(1, 2))
def unpack(packed, bits: int, k: int) -> jax.Array:
    """Inverse of :func:`pack`: uint8 ``[K * b / 8, N]`` -> uint8 codes ``[K, N]``."""
    _check_pack(packed.shape, bits, "packed codes")
    unit = PACK_UNIT[bits]
    nbytes = unit * bits // 8
    rows, n = packed.shape
    if k % unit or rows != k // unit * nbytes:
        raise ValueError(
            f"packed {bits}-bit codes of shape {(rows, n)} do not hold K={k} rows "
            f"(expected {k * bits // 8} rows, K a multiple of {unit})"
        )
    p = jnp.asarray(packed).astype(jnp.uint32)
    if bits == 8:
        return p.astype(jnp.uint8)
    p = p.reshape(k // unit, nbytes, n)
    v = functools.reduce(jnp.bitwise_or, [p[:, t] << jnp.uint32(8 * t) for t in range(nbytes)])
    mask = jnp.uint32((1 << bits) - 1)
    out = jnp.stack([(v >> jnp.uint32(bits * i)) & mask for i in range(unit)], axis=1)
    return out.reshape(k, n).astype(jnp.uint8)


def leaf_nbytes(x) -> int:
    if x is None:
        return 0
    if isinstance(x, StoredWeight):  # a compressed field (e.g. quantized N:M values)
        return x.nbytes
    return int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


class StoredWeight:
    """Size accounting shared by compressed ``[K, N]`` weight types: a subclass names the
    fields it stores in ``STORED`` (arrays, or compressed weights counted by their own
    ``nbytes``); ``shape`` is the logical float weight's."""

    STORED: tuple[str, ...] = ()

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (packed codes, scales, zero points, ...)."""
        return sum(leaf_nbytes(getattr(self, f)) for f in self.STORED)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.size


@register_weight_type
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "zeros", "scales2", "zeros2"],
    meta_fields=["spec", "shape", "dtype"],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedArray(StoredWeight):
    """A quantized ``[K, N]`` kernel; a pytree whose leaves are the stored arrays.

    Build one with ``shrinkjax.quant.formats.make(spec).quantize(w_KxN)`` (or ``from_groups``).
    ``shape``/``ndim``/``size`` describe the *logical* float weight, ``nbytes`` the real storage.
    """

    STORED = ("codes", "scales", "zeros", "scales2", "zeros2")

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array | None = None
    scales2: jax.Array | None = None
    zeros2: jax.Array | None = None
    spec: QuantSpec
    shape: tuple[int, int]
    dtype: str = "float32"  # dtype of the float weight this replaces

    def __post_init__(self):
        # Leaves are not validated: JAX rebuilds pytrees with tracers or placeholders.
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if len(self.shape) != 2:
            raise ValueError(f"QuantizedArray shape must be (K, N), got {self.shape}")
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"QuantizedArray.spec must be a QuantSpec, got {type(self.spec)}")

    @property
    def format(self) -> str:
        return self.spec.format

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight ``[K, N]`` (computed in f32, cast to ``dtype``)."""
        from shrinkjax.quant import formats  # formats imports this module

        return formats.make(self.spec).dequantize(self, dtype)

    def __repr__(self) -> str:
        return (
            f"QuantizedArray({self.spec.describe()}, shape={self.shape}, "
            f"{self.bits_per_weight:.3f} bits/weight)"
        )


@dispatch.register(QuantizedArray)
def _linear_reference(x_MxK, w: QuantizedArray):
    """Reference path: dequantize to f32, then the dense matmul (x's dtype, f32 accumulate)."""
    return dispatch.linear(x_MxK, w.dequantize(jnp.float32))
