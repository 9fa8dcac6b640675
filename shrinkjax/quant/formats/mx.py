"""FP4 (E2M1) microscaling formats: ``mxfp4`` (OCP Microscaling Formats (MX) Specification
v1.0, 2023) and ``nvfp4`` (NVIDIA Blackwell NVFP4: E2M1 elements, E4M3 block scales, FP32
tensor scale).

E2M1 element code (4 bits, ``s ee m``, bias 1, no inf/NaN)::

    code & 7 : 0    1    2    3    4    5    6    7
    value    : 0    0.5  1.0  1.5  2.0  3.0  4.0  6.0      (bit 3 = sign; -0 is never emitted)

so 0.5 -> 0x1, 1.5 -> 0x3, 6 -> 0x7, -1 -> 0xA, -6 -> 0xF. Scaled values round to nearest,
ties to even code (0.25 -> 0, 0.75 -> 1.0, 2.5 -> 2, 5 -> 4), and saturate at ±6.
Codes are packed two per byte along K, low nibble = even row (``shrinkjax.quant.array``).

mxfp4: one shared scale per 32 consecutive input rows (a block along K) of each output
column, an E8M0 byte (``scales [K/32, N]`` uint8): ``scale = 2**(code - 127)``, code 0..254
(255 = NaN, never emitted); e.g. 2**-3 -> 124. Per the spec (§6.3) the shared exponent is
``floor(log2(amax)) - 2`` (2 = exponent of E2M1's largest normal, 6 = 1.5 * 2**2), clamped to
[-127, 127]; an all-zero block gets code 0. Elements above 6 after scaling saturate (amax / scale
lies in [4, 8)). Dequant ``w = e2m1(code) * 2**(e - 127)``. Bytes = ``K*N/2 + K*N/32``
(4.25 bits/weight).

nvfp4: blocks of 16 along K. Tensor scale (``scales2 [1, 1]`` f32, the *decode* scale)
``s_t = amax(W) / (6 * 448)``; block scale (``scales [K/16, N]``, FP8 E4M3 bit patterns)
``s_b = e4m3(amax_block / (6 * s_t))`` (round to nearest, saturating at 448); dequant
``w = e2m1(code) * f32(s_b) * s_t``. Bytes = ``K*N/2 + K*N/16 + 4`` (4.5 bits/weight + 32 bits).
For GPTQ pass ``fit(..., tensor_amax=max|W|)`` so every group shares ``s_t``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from shrinkjax.quant.formats import Format, floor_log2, pow2, reduce_groups, register
from shrinkjax.quant.formats.fp8 import E2M1, E4M3, decode_fp8, encode_fp8, round_minifloat

E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
E2M1_EMAX = 2  # exponent of the largest normal (6 = 1.5 * 2**2)


@jax.jit
def e2m1_encode(v):
    """4-bit E2M1 codes (uint8) of ``v`` (round to nearest even, saturating at ±6)."""
    _, sign, mag = round_minifloat(v, E2M1)
    return (sign << 3 | mag).astype(jnp.uint8)


@jax.jit
def e2m1_decode(codes):
    c = jnp.asarray(codes).astype(jnp.int32)
    mag = jnp.asarray(E2M1_VALUES)[c & 7]
    return jnp.where(c & 8, -mag, mag)


def e8m0_encode_exponent(e):
    """E8M0 byte of the scale 2**e (integer e in [-127, 127])."""
    return (jnp.asarray(e, jnp.int32) + 127).astype(jnp.uint8)


def e8m0_decode(codes):
    """f32 scale 2**(code - 127) of E8M0 bytes (code 0 = 2**-127, a subnormal)."""
    return pow2(jnp.asarray(codes).astype(jnp.int32) - 127)


class _FP4Format(Format):
    bits = 4
    granularities = ("group",)
    default_scale_dtype = None  # scale encodings are fixed by the formats

    def _encode_elems(self, v, zero):
        return e2m1_encode(v)

    def _decode_elems(self, codes, zero):
        return e2m1_decode(codes)


class MXFP4Format(_FP4Format):
    fixed_group_size = 32

    def _fit(self, x, tensor_amax):
        amax = reduce_groups(jnp.abs(x), jnp.max, False)
        e = jnp.clip(floor_log2(amax) - E2M1_EMAX, -127, 127)
        e = jnp.where(amax > 0, e, -127)
        return {"scales": e8m0_encode_exponent(e)}

    def _effective(self, qp):
        return e8m0_decode(qp["scales"]), None


class NVFP4Format(_FP4Format):
    fixed_group_size = 16
    tensor_keys = ("scales2",)

    @property
    def qparam_keys(self):
        return ("scales", "scales2")

    def _fit(self, x, tensor_amax):
        s_t = tensor_amax / (E2M1.fmax * E4M3.fmax)
        s_t = jnp.where(s_t > 0, s_t, 1.0).astype(jnp.float32)
        amax = reduce_groups(jnp.abs(x), jnp.max, False)
        s_b = encode_fp8(jnp.minimum(amax / (E2M1.fmax * s_t), E4M3.fmax), E4M3)
        return {"scales": s_b, "scales2": s_t.reshape(1, 1)}

    def _effective(self, qp):
        s_t = qp["scales2"].astype(jnp.float32).reshape(())
        return decode_fp8(qp["scales"], E4M3) * s_t, None

    def _check_qparams(self, qparams, n):
        qp = super()._check_qparams(qparams, n)
        if qp["scales2"].shape != (1, 1):
            raise ValueError(
                f"nvfp4: qparams['scales2'] is the per-tensor scale, shape (1, 1); "
                f"got {qp['scales2'].shape}"
            )
        return qp


register("mxfp4")(MXFP4Format)
register("nvfp4")(NVFP4Format)
