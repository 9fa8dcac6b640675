"""Packed weight layouts read by the Pallas kernels and the ``pack_*`` functions that build them
from plain arrays (the Pallas driver shared by every kernel is :mod:`shrinkjax.kernels.driver`).

Every layout describes a weight ``W[K, N]`` used as ``y = x @ W`` (``x[M, K]`` bf16). All arrays
are row-major with the output dimension ``N`` last, padded to ``Np = round_up(N, 128)`` columns
(padding columns are zero and sliced off). ``K`` is padded to ``Kp`` (a multiple of the layout's
K chunk; padding rows dequantize to exactly 0 and meet zero-padded ``x`` columns).

Math (from plain arrays; ``g`` = group size along K, per output column ``n``)
--------------------------------------------------------------------------
* int (bits 4 or 8):  ``W[k,n] = (code[k,n] - zero[k//g, n]) * scale[k//g, n]`` with
  ``code`` in ``[0, 2**bits)``, integer ``zero`` in ``[0, 2**bits)``; symmetric = ``zeros=None``
  = zero fixed at ``2**(bits-1)``. Scales are stored as bf16 (rounded once at pack time).
* MXFP4:  ``W[k,n] = e2m1(code[k,n]) * 2**(e8m0[k//32, n] - 127)``.
* NVFP4:  ``W[k,n] = e2m1(code[k,n]) * e4m3(s[k//16, n]) * tensor_scale``.
* 2:4 (along K): in each group of 4 consecutive rows ``k = 4j..4j+3`` of a column at most 2
  entries are non-zero; stored as 2 values (ascending position) + two 2-bit positions. Values are
  bf16, or int4 codes dequantized with ``(code - zero[k//g, n]) * scale[k//g, n]`` (``k`` = the
  original dense row).

``e2m1`` codes (OCP MX FP4): bit 3 = sign, bits 2..1 = exponent (bias 1), bit 0 = mantissa:
``0, 0.5, 1, 1.5, 2, 3, 4, 6`` for codes 0..7 and their negatives for 8..15.
``e8m0``: unsigned byte ``e`` meaning ``2**(e - 127)`` (255 = NaN is rejected; values above 240,
i.e. scales >= 2**114, are rejected because the kernel folds a ``2**14`` factor into the scale).
``e4m3``: float8_e4m3fn bits (sign, 4 exponent bits bias 7, 3 mantissa bits), stored as uint8.

Bit layouts
-----------
**4-bit codes, "split-half" nibble pairing** (int4 ``qweight``, MXFP4/NVFP4 ``codes``). ``K`` is
cut into chunks of ``2*D`` consecutive rows (``D`` = ``pair``: int4 = largest of 64/32/16 that
divides ``g``; MXFP4 = 32; NVFP4 = 16). Packed byte row ``r`` (``0 <= r < D``) of chunk ``c``::

    packed[c*D + r, n] = code[c*2D + r, n]  |  code[c*2D + D + r, n] << 4
                         (low nibble: first half)  (high nibble: second half)

so ``packed`` is ``uint8[Kp/2, Np]``. Example, ``D = 2`` (rows k0..k3 of one column):
``byte0 = k0 | k2 << 4``, ``byte1 = k1 | k3 << 4``. The kernel unpacks one ``[D, bn]`` byte tile
into two ``[D, bn]`` code tiles with ``& 0xF`` and ``>> 4`` and multiplies each against a
contiguous ``x`` slice: no in-kernel interleave/reshape is needed.

**8-bit codes**: ``uint8[Kp, Np]``, one code per byte, no pairing.

**Scales / zeros**: int: ``scales`` bf16 ``[Kp/g, Np]``, ``zeros`` uint8 ``[Kp/g, Np]`` or None.
MXFP4: ``scales`` uint8 e8m0 ``[Kp/32, Np]``. NVFP4: ``scales`` uint8 e4m3 bits ``[Kp/16, Np]`` and
``tensor_scale`` f32 scalar.

**2:4 along K** (``Kq = Kp/4`` groups; ``Kp`` a multiple of ``8*Dg``, ``Dg`` = ``pair`` = 32 for
bf16 values; for int4 values 32 if ``g`` is a multiple of 128 else 16, so that each half chunk
of ``4*Dg`` rows lies in one scale group):

* ``values`` bf16 ``[2, Kq, Np]``: ``values[t, j, n]`` = kept value ``t`` (t=0: smaller position)
  of group ``j``. For int4: ``codes`` uint8 ``[Kq, Np]`` = ``code_t0 | code_t1 << 4``.
* ``meta`` uint8 ``[Kq/2, Np]``: per group one nibble ``i0 | i1 << 2`` (``i0 < i1`` the 2-bit
  positions inside the group of 4), nibble-paired with the same split-half rule as above with
  ``D = Dg`` groups: ``meta[c*Dg + r] = nib(group c*2Dg + r) | nib(group c*2Dg + Dg + r) << 4``.
  Example: group with non-zeros at rows 1 and 3 -> ``i0=1, i1=3`` -> nibble ``0b1101 = 13``.
  Groups with fewer than 2 non-zeros use the lowest unused positions with value 0 (int4: the
  code equal to the zero point).

The kernel reads ``x`` for 2:4 as ``x4[p, m, j] = x[m, 4j + p]`` (a cheap XLA transpose) and does
4 dots per half-chunk, one per in-group position ``p``, each with the dense tile
``where(i0 == p, v0, where(i1 == p, v1, 0))``.

Converting another representation is a one-time host-side call on plain arrays, e.g. for a
grouped int4 weight ``pack_int(codes_KxN, scales_GxN, zeros_GxN_or_None, bits=4, group=g)``
(codes/zeros unsigned; a signed code ``c`` in [-8, 8) is ``c + 8`` with symmetric zeros),
``pack_mxfp4(codes, e8m0)``, ``pack_nvfp4(codes, e4m3, tensor_scale)``, ``pack_24(dense)``,
``pack_24_int4(codes, scales, zeros, group=g, keep_KxN=mask)``. Packed objects are pytrees
(arrays = leaves, sizes = static metadata), usable under ``jax.jit`` and by
``shrinkjax.kernels.dispatch.linear`` once the kernel module is imported.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

N_ALIGN = 128
E2M1_VALUES = np.array(
    [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32
)
MXFP4_BLOCK = 32
NVFP4_BLOCK = 16
MXFP4_PAIR = 32
NVFP4_PAIR = 16
SPARSE24_PAIR = 32
MAX_E8M0 = 240


def round_up(a: int, b: int) -> int:
    return -(-a // b) * b


# --------------------------------------------------------------------------------------------
# Packed containers (pytrees: arrays are leaves, shapes/metadata are static)
# --------------------------------------------------------------------------------------------


def _pytree(data, meta):
    def deco(cls):
        return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)

    return deco


@_pytree(["qweight", "scales", "zeros"], ["k", "n", "bits", "group", "pair"])
@dataclasses.dataclass(frozen=True)
class PackedInt:
    """int4 / int8 weight with per-(group, column) scales and optional integer zero points."""

    qweight: jax.Array  # uint8 [Kp/2, Np] (bits=4, split-half pairs) or [Kp, Np] (bits=8)
    scales: jax.Array  # bf16 [Kp/g, Np]
    zeros: jax.Array | None  # uint8 [Kp/g, Np]; None = symmetric (2**(bits-1))
    k: int
    n: int
    bits: int
    group: int
    pair: int  # bits=4: pairing distance D (chunk = 2D); bits=8: chunk rows C

    @property
    def kp(self) -> int:
        return self.scales.shape[0] * self.group

    @property
    def np_(self) -> int:
        return self.scales.shape[1]

    @property
    def chunk(self) -> int:
        return 2 * self.pair if self.bits == 4 else self.pair

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)


class _FP4Geometry:
    """Shared geometry of the FP4 layouts (4-bit codes, split-half pairs along K)."""

    @property
    def kp(self) -> int:
        return self.codes.shape[0] * 2

    @property
    def np_(self) -> int:
        return self.codes.shape[1]

    @property
    def chunk(self) -> int:
        return 2 * self.pair

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)


@_pytree(["codes", "scales"], ["k", "n"])
@dataclasses.dataclass(frozen=True)
class PackedMXFP4(_FP4Geometry):
    codes: jax.Array  # uint8 [Kp/2, Np], split-half pairs with D = 32
    scales: jax.Array  # uint8 e8m0 [Kp/32, Np]
    k: int
    n: int
    pair = MXFP4_PAIR
    block = MXFP4_BLOCK


@_pytree(["codes", "scales", "tensor_scale"], ["k", "n"])
@dataclasses.dataclass(frozen=True)
class PackedNVFP4(_FP4Geometry):
    codes: jax.Array  # uint8 [Kp/2, Np], split-half pairs with D = 16
    scales: jax.Array  # uint8 e4m3fn bits [Kp/16, Np]
    tensor_scale: jax.Array  # f32 scalar
    k: int
    n: int
    pair = NVFP4_PAIR
    block = NVFP4_BLOCK


@_pytree(["values", "meta", "scales", "zeros"], ["k", "n", "group", "pair"])
@dataclasses.dataclass(frozen=True)
class Packed24:
    """2:4 sparse (along K) weight: bf16 values, or int4 codes with group scales/zeros."""

    values: jax.Array  # bf16 [2, Kq, Np]  or  uint8 [Kq, Np] (int4: slot0 | slot1 << 4)
    meta: jax.Array  # uint8 [Kq/2, Np], split-half nibble pairs with D = pair groups
    scales: jax.Array | None  # int4 only: bf16 [Kp/g, Np]
    zeros: jax.Array | None  # int4 only: uint8 [Kp/g, Np] or None (symmetric 8)
    k: int
    n: int
    group: int  # 0 for bf16 values
    pair: int  # Dg: groups of 4 per half chunk (chunk = 8 * Dg rows of K)

    @property
    def is_int4(self) -> bool:
        return self.scales is not None

    @property
    def kp(self) -> int:
        return self.meta.shape[0] * 8

    @property
    def np_(self) -> int:
        return self.meta.shape[1]

    @property
    def chunk(self) -> int:
        return 8 * self.pair

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)


def packed_nbytes(p) -> int:
    """Bytes the kernel streams for the weight (all array leaves)."""
    return int(sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(p)))


# --------------------------------------------------------------------------------------------
# Packing helpers (host-side numpy, one-time)
# --------------------------------------------------------------------------------------------


def _np(a) -> np.ndarray:
    return np.asarray(jax.device_get(a)) if isinstance(a, jax.Array) else np.asarray(a)


def _pad2(a: np.ndarray, rows: int, cols: int, value=0) -> np.ndarray:
    r, c = a.shape
    if (r, c) == (rows, cols):
        return a
    return np.pad(a, ((0, rows - r), (0, cols - c)), constant_values=value)


def pack_nibbles_split_half(codes: np.ndarray, pair: int) -> np.ndarray:
    """uint8 codes [Kp, Np] in [0,16) -> uint8 [Kp/2, Np] (see module docstring)."""
    kp, np_ = codes.shape
    assert kp % (2 * pair) == 0, (kp, pair)
    c = codes.astype(np.uint8).reshape(kp // (2 * pair), 2, pair, np_)
    return (c[:, 0] | (c[:, 1] << 4)).reshape(kp // 2, np_)


def unpack_nibbles_split_half(packed: np.ndarray, pair: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles_split_half` (numpy, for tests and debugging)."""
    half, np_ = packed.shape
    p = np.asarray(packed).reshape(half // pair, 1, pair, np_)
    return np.concatenate([p & 15, p >> 4], axis=1).reshape(2 * half, np_).astype(np.uint8)


def _check_codes(codes: np.ndarray, bits: int, what: str = "codes") -> np.ndarray:
    if codes.ndim != 2:
        raise ValueError(f"{what} must be 2-D [K, N], got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{what} must be an integer array, got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(
            f"{what} must lie in [0, {2**bits}) for bits={bits}; got range "
            f"[{codes.min()}, {codes.max()}]"
        )
    return codes.astype(np.uint8)


def _int_pair(group: int, bits: int) -> int:
    cands = (64, 32, 16) if bits == 4 else (128, 64, 32, 16)
    for d in cands:
        if group % d == 0:
            return d
    raise ValueError(
        f"group size {group} is not supported by the int{bits} kernel: it must be a multiple of 16"
    )


def _group_params(scales, zeros, groups: int, n: int, bits: int, group: int, kp: int, np_: int):
    s = _np(scales).astype(np.float32)
    if s.shape != (groups, n):
        raise ValueError(f"scales must have shape [ceil(K/g), N] = {(groups, n)}, got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scales must be finite")
    s_p = _pad2(s, kp // group, np_)
    z_p = None
    if zeros is not None:
        z = _np(zeros)
        if z.shape != (groups, n):
            raise ValueError(f"zeros must have shape [ceil(K/g), N] = {(groups, n)}, got {z.shape}")
        if np.any(z != np.round(z)) or z.min() < 0 or z.max() >= 2**bits:
            raise ValueError(f"zeros must be integers in [0, {2**bits}) for bits={bits}")
        z_p = _pad2(z.astype(np.uint8), kp // group, np_)
    return jnp.asarray(s_p, jnp.bfloat16), (None if z_p is None else jnp.asarray(z_p))


def pack_int(codes_KxN, scales, zeros=None, *, bits: int = 4, group: int = 128) -> PackedInt:
    """Pack ``W[k,n] = (codes[k,n] - zeros[k//g,n]) * scales[k//g,n]`` for the int kernels.

    codes: integer [K, N] in [0, 2**bits); scales: float [ceil(K/g), N]; zeros: integer
    [ceil(K/g), N] in [0, 2**bits) or None (symmetric: zero = 2**(bits-1)). When ``group`` does
    not divide K the last group is short (int-k "ragged" groups): its rows past K are filled
    with the zero-point code, so they dequantize to exactly 0.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    codes = _check_codes(_np(codes_KxN), bits)
    k, n = codes.shape
    if group <= 0:
        raise ValueError(f"group size must be positive, got {group}")
    groups = -(-k // group)
    pair = _int_pair(group, bits)
    chunk = 2 * pair if bits == 4 else pair
    kp = round_up(k, math.lcm(chunk, group))
    np_ = round_up(n, N_ALIGN)
    s, z = _group_params(scales, zeros, groups, n, bits, group, kp, np_)
    if groups * group > k:  # short last group: pad it with zero-point codes
        zp = np.full((1, n), 2 ** (bits - 1)) if zeros is None else _np(zeros)[-1:]
        fill = np.broadcast_to(zp.astype(codes.dtype), (groups * group - k, n))
        codes = np.concatenate([codes, fill])
    c = _pad2(codes, kp, np_)
    q = pack_nibbles_split_half(c, pair) if bits == 4 else c
    return PackedInt(jnp.asarray(q), s, z, k=k, n=n, bits=bits, group=group, pair=pair)


def _e8m0_bytes(scales) -> np.ndarray:
    s = _np(scales)
    if s.dtype != np.uint8:
        if s.dtype.name == "float8_e8m0fnu":
            s = s.view(np.uint8)
        else:
            raise ValueError(
                f"MXFP4 scales must be uint8 biased exponents (e8m0), got dtype {s.dtype}"
            )
    if s.size and s.max() > MAX_E8M0:
        raise ValueError(
            f"e8m0 scale byte {int(s.max())} unsupported: 255 is NaN and bytes > {MAX_E8M0} "
            "(scales >= 2**114) overflow the kernel's bf16 scale"
        )
    return s


def pack_mxfp4(codes_KxN, scales_e8m0) -> PackedMXFP4:
    """Pack MXFP4: codes uint [K, N] in [0,16) (e2m1), scales uint8 e8m0 [K/32, N]."""
    codes = _check_codes(_np(codes_KxN), 4)
    k, n = codes.shape
    if k % MXFP4_BLOCK:
        raise ValueError(
            f"MXFP4 needs K to be a multiple of {MXFP4_BLOCK}; weight shape is {codes.shape}"
        )
    s = _e8m0_bytes(scales_e8m0)
    if s.shape != (k // MXFP4_BLOCK, n):
        raise ValueError(f"MXFP4 scales must have shape {(k // MXFP4_BLOCK, n)}, got {s.shape}")
    kp = round_up(k, 2 * MXFP4_PAIR)
    np_ = round_up(n, N_ALIGN)
    q = pack_nibbles_split_half(_pad2(codes, kp, np_), MXFP4_PAIR)
    s_p = _pad2(s, kp // MXFP4_BLOCK, np_, value=127)
    return PackedMXFP4(jnp.asarray(q), jnp.asarray(s_p), k=k, n=n)


def _e4m3_bytes(scales) -> np.ndarray:
    s = _np(scales)
    if s.dtype == np.uint8:
        b = s
    elif s.dtype.name == "float8_e4m3fn":
        b = s.view(np.uint8)
    elif np.issubdtype(s.dtype, np.floating) or s.dtype.name in ("bfloat16",):
        import ml_dtypes

        b = s.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    else:
        raise ValueError(f"NVFP4 scales must be e4m3 (uint8 bits or float8), got {s.dtype}")
    if b.size and np.any((b & 0x7F) == 0x7F):
        raise ValueError("NVFP4 e4m3 scales contain NaN")
    return b


def pack_nvfp4(codes_KxN, scales_e4m3, tensor_scale=1.0) -> PackedNVFP4:
    """Pack NVFP4: codes [K, N] in [0,16) (e2m1), scales e4m3 [K/16, N], f32 tensor scale.

    ``scales_e4m3`` may be uint8 bit patterns, a float8_e4m3fn array, or floats (rounded to
    e4m3).
    """
    codes = _check_codes(_np(codes_KxN), 4)
    k, n = codes.shape
    if k % NVFP4_BLOCK:
        raise ValueError(
            f"NVFP4 needs K to be a multiple of {NVFP4_BLOCK}; weight shape is {codes.shape}"
        )
    s = _e4m3_bytes(scales_e4m3)
    if s.shape != (k // NVFP4_BLOCK, n):
        raise ValueError(f"NVFP4 scales must have shape {(k // NVFP4_BLOCK, n)}, got {s.shape}")
    kp = round_up(k, 2 * NVFP4_PAIR)
    np_ = round_up(n, N_ALIGN)
    q = pack_nibbles_split_half(_pad2(codes, kp, np_), NVFP4_PAIR)
    s_p = _pad2(s, kp // NVFP4_BLOCK, np_)
    ts = jnp.asarray(np.float32(tensor_scale))
    return PackedNVFP4(jnp.asarray(q), jnp.asarray(s_p), ts, k=k, n=n)


def _lut_24() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each 4-bit keep mask: (i0, i1, count). Kept rows first, then the lowest free rows."""
    i0 = np.zeros(16, np.uint8)
    i1 = np.zeros(16, np.uint8)
    cnt = np.zeros(16, np.int64)
    for bits in range(16):
        kept = [p for p in range(4) if bits >> p & 1]
        cnt[bits] = len(kept)
        pos = sorted((kept + [p for p in range(4) if p not in kept])[:2])
        i0[bits], i1[bits] = pos
    return i0, i1, cnt


_LUT0, _LUT1, _LUTC = _lut_24()


def _positions_24(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """keep bool [Kp, Np] -> (i0, i1) uint8 [Kq, Np]; unused slots take the lowest free rows."""
    kp, np_ = keep.shape
    g = keep.reshape(kp // 4, 4, np_).astype(np.uint8)
    bits = g[:, 0] | (g[:, 1] << 1) | (g[:, 2] << 2) | (g[:, 3] << 3)
    cnt = _LUTC[bits]
    if cnt.max(initial=0) > 2:
        j, col = np.argwhere(cnt > 2)[0]
        raise ValueError(
            f"weight is not 2:4 sparse along K: rows {4 * j}..{4 * j + 3} of column {col} "
            f"have {int(cnt[j, col])} non-zeros"
        )
    return _LUT0[bits], _LUT1[bits]


def _pack_meta(i0: np.ndarray, i1: np.ndarray, pair: int) -> np.ndarray:
    nib = (i0 | (i1 << 2)).astype(np.uint8)
    return pack_nibbles_split_half(nib, pair)


def _sparse_geometry(k: int, n: int, pair: int) -> tuple[int, int]:
    return round_up(k, 8 * pair), round_up(n, N_ALIGN)


def random_mask_24(rng: np.random.Generator, k: int, n: int, min_keep: int = 2) -> np.ndarray:
    """bool [K, N]: a random 2:4 pattern along K (for tests and benchmarks): each group of 4
    rows keeps between ``min_keep`` and 2 of them (K need not be a multiple of 4)."""
    kq = -(-k // 4)
    cnt = rng.integers(min_keep, 3, (kq, 1, n))
    order = np.argsort(rng.random((kq, 4, n)), axis=1)
    keep = np.zeros((kq, 4, n), bool)
    np.put_along_axis(keep, order[:, :2, :], True, axis=1)
    rank = np.argsort(order, axis=1)
    keep &= rank < cnt
    return keep.reshape(kq * 4, n)[:k]


def pack_24(dense_KxN) -> Packed24:
    """Pack a dense [K, N] weight with a 2:4 pattern along K into bf16 values + 2-bit metadata.

    Values are stored as bf16 (rounded if the input is wider). K need not be a multiple of 4.
    """
    w = _np(dense_KxN)
    if w.ndim != 2:
        raise ValueError(f"dense weight must be 2-D [K, N], got shape {w.shape}")
    w = w.astype(np.float32)
    k, n = w.shape
    pair = SPARSE24_PAIR
    kp, np_ = _sparse_geometry(k, n, pair)
    wp = _pad2(w, kp, np_)
    i0, i1 = _positions_24(wp != 0)
    g = wp.reshape(kp // 4, 4, np_)
    v0 = np.take_along_axis(g, i0[:, None, :].astype(np.int64), axis=1)[:, 0]
    v1 = np.take_along_axis(g, i1[:, None, :].astype(np.int64), axis=1)[:, 0]
    values = jnp.asarray(np.stack([v0, v1]), jnp.bfloat16)
    meta = jnp.asarray(_pack_meta(i0, i1, pair))
    return Packed24(values, meta, None, None, k=k, n=n, group=0, pair=pair)


def pack_24_int4(codes_KxN, scales, zeros=None, *, group: int = 128, keep_KxN=None) -> Packed24:
    """Pack a 2:4-sparse int4 weight: ``W = (codes - zeros[k//g]) * scales[k//g]`` where kept.

    ``keep_KxN`` (bool) marks kept entries (at most 2 per group of 4 rows); default: entries
    whose dequantized value is non-zero. Entries not kept are 0 regardless of their code.
    scales / zeros: ``[ceil(K/g), N]``; when ``group`` does not divide K the last group is short
    (as in :func:`pack_int`): its padding rows are not kept, so they dequantize to exactly 0.
    """
    codes = _check_codes(_np(codes_KxN), 4)
    k, n = codes.shape
    if k % 4:
        raise ValueError(f"K={k} (weight shape {codes.shape}) is not a multiple of 4 (2:4 groups)")
    if group <= 0 or group % 64:
        raise ValueError(
            f"2:4 int4 kernel needs the group size to be a multiple of 64, got {group}"
        )
    pair = SPARSE24_PAIR if group % (4 * SPARSE24_PAIR) == 0 else SPARSE24_PAIR // 2
    np_ = round_up(n, N_ALIGN)
    kp = round_up(k, math.lcm(8 * pair, group))
    s, z = _group_params(scales, zeros, -(-k // group), n, 4, group, kp, np_)
    zf = np.full((kp // group, np_), 8, np.uint8) if z is None else _np(z)
    zrow = np.repeat(zf, group, axis=0)  # [Kp, Np]
    c = _pad2(codes, kp, np_)
    if keep_KxN is None:
        keep = (c != zrow) & (np.repeat(_np(s.astype(jnp.float32)), group, axis=0) != 0)
    else:
        keep = _pad2(_np(keep_KxN).astype(bool), kp, np_)
        if keep.shape != (kp, np_):
            raise ValueError(f"keep_KxN must have shape {(k, n)}")
    i0, i1 = _positions_24(keep)
    # Codes at unused slots are set to the zero point so that they dequantize to exactly 0.
    c = np.where(keep, c, zrow).astype(np.uint8)
    g = c.reshape(kp // 4, 4, np_)
    c0 = np.take_along_axis(g, i0[:, None, :].astype(np.int64), axis=1)[:, 0]
    c1 = np.take_along_axis(g, i1[:, None, :].astype(np.int64), axis=1)[:, 0]
    values = jnp.asarray((c0 | (c1 << 4)).astype(np.uint8))
    meta = jnp.asarray(_pack_meta(i0, i1, pair))
    return Packed24(values, meta, s, z, k=k, n=n, group=group, pair=pair)


_MOVED_TO_DRIVER = frozenset(
    "TileConfig FMA_MAX_M choose_config config_for kernel_kind run_packed run_tiled_matmul "
    "resolve_interpret use_kernel_backend prepare_x finish flatten_x idiv as_bf16_bits".split()
)


def __getattr__(name):  # the driver used to live here; keep ``layouts.<name>`` working
    if name in _MOVED_TO_DRIVER:
        from shrinkjax.kernels import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
