"""FP8 weight formats ``fp8_e4m3`` and ``fp8_e5m2`` (OCP 8-bit floating point, v1.0), plus the
exact minifloat rounding shared with FP4 (E2M1) and the FP8 scales of NVFP4 / NF4 double quant.

Element codes are the IEEE-style bit patterns ``s eeee mmm`` (E4M3, bias 7, "fn" variant: no
infinities, only ``S.1111.111`` is NaN, max 448) and ``s eeeee mm`` (E5M2, bias 15, max 57344),
i.e. the bytes of ``jnp.float8_e4m3fn`` / ``jnp.float8_e5m2``, stored one per uint8 (no packing).
Examples (E4M3): 1.0 -> 0x38, -2.0 -> 0xC0, 448 -> 0x7E, 2**-6 -> 0x08, 2**-9 -> 0x01;
(E5M2): 1.0 -> 0x3C, 57344 -> 0x7B.

Quantization: ``scale = amax / fmax`` per tensor (``[1, 1]``), per output channel (``[1, N]``,
default) or per group of G input rows (``[K/G, N]``), stored in ``scale_dtype`` (float32 by
default, rounded up); ``code = fp8(w / scale)`` with round-half-to-even onto the FP8 grid and
saturation at ±fmax (never NaN / inf). Dequant ``w = f32(code) * scale``.
Bytes = ``K * N + scale bytes``.

The rounding is done in f32 arithmetic exactly (:func:`round_minifloat`), so the final cast to
the float8 dtype is exact on every backend (no double rounding through f16).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from shrinkjax.quant.formats import Format, floor_log2, pow2, reduce_groups, register, store_scale


@dataclasses.dataclass(frozen=True)
class Minifloat:
    """A small float grid: ``mbits`` mantissa bits, smallest normal exponent ``emin``, largest
    finite value ``fmax`` (whose magnitude code is ``max_code``), optional JAX dtype."""

    name: str
    ebits: int
    mbits: int
    emin: int
    fmax: float
    max_code: int
    dtype: object = None


E4M3 = Minifloat("e4m3", ebits=4, mbits=3, emin=-6, fmax=448.0, max_code=0x7E,
                 dtype=jnp.float8_e4m3fn)  # fmt: skip
E5M2 = Minifloat("e5m2", ebits=5, mbits=2, emin=-14, fmax=57344.0, max_code=0x7B,
                 dtype=jnp.float8_e5m2)  # fmt: skip
E2M1 = Minifloat("e2m1", ebits=2, mbits=1, emin=0, fmax=6.0, max_code=0x7)


def round_minifloat(x, fmt: Minifloat, mode: str = "nearest"):
    """Round f32 ``x`` onto ``fmt``'s grid, saturating at ±fmax.

    Returns ``(q, sign, mag)``: the grid value as f32 (exact), the sign bit (1 for q < 0) and
    the magnitude code ``mag = (e - emin) * 2**mbits + m`` (exponent/mantissa fields, so the
    element code is ``sign << (ebits + mbits) | mag``). ``mode="nearest"`` rounds half to even;
    ``mode="up"`` rounds toward +inf (used for scales that must not shrink).
    """
    x = jnp.asarray(x, jnp.float32)
    a = jnp.abs(x)
    e = jnp.maximum(floor_log2(a), fmt.emin)  # exponent of the binade (subnormals: emin)
    t = a * pow2(fmt.mbits - e)  # in [0, 2**(mbits+1)): mantissa with the hidden bit, exact
    if mode == "nearest":
        m = jnp.round(t)
    elif mode == "up":
        m = jnp.where(x >= 0, jnp.ceil(t), jnp.floor(t))
    else:
        raise ValueError(f"mode must be 'nearest' or 'up', got {mode!r}")
    mag = (e - fmt.emin) * (1 << fmt.mbits) + m.astype(jnp.int32)
    mag = jnp.minimum(mag, fmt.max_code)
    q = jnp.copysign(decode_magnitude(mag, fmt), x)
    sign = ((x < 0) & (mag > 0)).astype(jnp.int32)
    return q, sign, mag


def decode_magnitude(mag, fmt: Minifloat):
    """f32 value of a magnitude code (exponent field ``mag >> mbits``, mantissa the rest)."""
    mag = jnp.asarray(mag, jnp.int32)
    ef = mag >> fmt.mbits
    mf = (mag & ((1 << fmt.mbits) - 1)).astype(jnp.float32)
    normal = (mf + (1 << fmt.mbits)) * pow2(ef - 1 + fmt.emin - fmt.mbits)
    sub = mf * pow2(fmt.emin - fmt.mbits)
    return jnp.where(ef == 0, sub, normal)


@functools.partial(jax.jit, static_argnames=("fmt", "mode"))
def encode_fp8(x, fmt: Minifloat = E4M3, mode: str = "nearest"):
    """uint8 bit patterns of ``x`` rounded to FP8 (``fmt`` = E4M3 or E5M2)."""
    q, _, _ = round_minifloat(x, fmt, mode)
    return jax.lax.bitcast_convert_type(q.astype(fmt.dtype), jnp.uint8)


@functools.partial(jax.jit, static_argnames=("fmt",))
def decode_fp8(codes, fmt: Minifloat = E4M3):
    """f32 values of FP8 uint8 bit patterns."""
    return jax.lax.bitcast_convert_type(jnp.asarray(codes, jnp.uint8), fmt.dtype).astype(
        jnp.float32
    )


class FP8Format(Format):
    bits = 8
    default_granularity = "channel"
    default_group_size = 128
    default_scale_dtype = "float32"

    def __init__(self, spec, fmt: Minifloat):
        self.fmt = fmt
        super().__init__(spec)

    def _fit(self, x, tensor_amax):
        amax = reduce_groups(jnp.abs(x), jnp.max, self.spec.granularity == "tensor")
        return {"scales": store_scale(amax / self.fmt.fmax, self.spec.scale_dtype)}

    def _effective(self, qp):
        return qp["scales"].astype(jnp.float32), None

    def _encode_elems(self, v, zero):
        return encode_fp8(v, self.fmt)

    def _decode_elems(self, codes, zero):
        return decode_fp8(codes, self.fmt)


register("fp8_e4m3")(lambda spec: FP8Format(spec, E4M3))
register("fp8_e5m2")(lambda spec: FP8Format(spec, E5M2))
