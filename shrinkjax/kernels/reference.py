"""Pure-jnp references for the packed matmul kernels (the CPU / non-GPU fallback).

Each ``*_ref`` dequantizes the packed layout of :mod:`shrinkjax.kernels.layouts` to a bf16
``W[K, N]`` and computes ``x @ W`` with f32 accumulation, returning ``x.dtype``. The
dequantized values are bit-identical to what the kernels build in-kernel: int and FP4 products
are exact before the single rounding to bf16; for NVFP4 ``e2m1 * e4m3`` is exact in bf16 and
the f32 ``tensor_scale`` is applied to the f32 result (not folded into W).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shrinkjax.kernels.layouts import (
    E2M1_VALUES,
    Packed24,
    PackedInt,
    PackedMXFP4,
    PackedNVFP4,
)


def _unpack_split_half(packed, pair: int):
    """uint8 [Kp/2, Np] -> codes uint8 [Kp, Np] (split-half nibble pairing)."""
    half, np_ = packed.shape
    p = packed.reshape(half // pair, 1, pair, np_)
    return jnp.concatenate([p & 15, p >> 4], axis=1).reshape(2 * half, np_)


def _rows(a, rep: int):
    return jnp.repeat(a, rep, axis=0)


def dequantize_int(p: PackedInt):
    """bf16 W [K, N] for a :class:`PackedInt`."""
    codes = _unpack_split_half(p.qweight, p.pair) if p.bits == 4 else p.qweight
    if p.zeros is None:
        zero = jnp.float32(2 ** (p.bits - 1))
    else:
        zero = _rows(p.zeros, p.group).astype(jnp.float32)
    s = _rows(p.scales, p.group).astype(jnp.float32)
    w = ((codes.astype(jnp.float32) - zero) * s).astype(jnp.bfloat16)
    return w[: p.k, : p.n]


def _e2m1(codes):
    return jnp.asarray(E2M1_VALUES)[codes.astype(jnp.int32)]


def dequantize_mxfp4(p: PackedMXFP4):
    codes = _unpack_split_half(p.codes, p.pair)
    e = _rows(p.scales, p.block).astype(jnp.float32)
    w = (_e2m1(codes) * jnp.exp2(e - 127.0)).astype(jnp.bfloat16)
    return w[: p.k, : p.n]


def e4m3_to_f32(bits):
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint8), jnp.float8_e4m3fn).astype(
        jnp.float32
    )


def dequantize_nvfp4(p: PackedNVFP4, *, with_tensor_scale: bool = True):
    """bf16 W. ``with_tensor_scale=False`` gives the exact bf16 ``e2m1 * e4m3`` the kernel uses."""
    codes = _unpack_split_half(p.codes, p.pair)
    s = e4m3_to_f32(_rows(p.scales, p.block))
    w = _e2m1(codes) * s
    if with_tensor_scale:
        w = w * p.tensor_scale
    return w.astype(jnp.bfloat16)[: p.k, : p.n]


def dequantize_24(p: Packed24):
    kq, np_ = p.meta.shape[0] * 2, p.meta.shape[1]
    nib = _unpack_split_half(p.meta, p.pair)  # [Kq, Np]
    i0, i1 = nib & 3, nib >> 2
    if p.is_int4:
        zero = (
            jnp.full(p.scales.shape, 8.0, jnp.float32)
            if p.zeros is None
            else p.zeros.astype(jnp.float32)
        )
        gpr = p.group // 4  # groups of 4 per scale row
        s = _rows(p.scales.astype(jnp.float32), gpr)
        z = _rows(zero, gpr)
        v0 = (((p.values & 15).astype(jnp.float32) - z) * s).astype(jnp.bfloat16)
        v1 = (((p.values >> 4).astype(jnp.float32) - z) * s).astype(jnp.bfloat16)
    else:
        v0, v1 = p.values[0], p.values[1]
    pos = jnp.arange(4, dtype=jnp.uint8)[None, :, None]
    dense = jnp.where(i0[:, None, :] == pos, v0[:, None, :], 0) + jnp.where(
        i1[:, None, :] == pos, v1[:, None, :], 0
    )
    return dense.astype(jnp.bfloat16).reshape(kq * 4, np_)[: p.k, : p.n]


def dequantize(p):
    """bf16 W [K, N] for any packed layout (NVFP4 includes its tensor scale)."""
    if isinstance(p, PackedInt):
        return dequantize_int(p)
    if isinstance(p, PackedMXFP4):
        return dequantize_mxfp4(p)
    if isinstance(p, PackedNVFP4):
        return dequantize_nvfp4(p)
    if isinstance(p, Packed24):
        return dequantize_24(p)
    from shrinkjax.kernels import int4_tc  # imports this module

    if isinstance(p, int4_tc.TcInt4):
        return int4_tc.dequantize_tc_ref(p)
    from shrinkjax.kernels import fp4_tc

    if isinstance(p, fp4_tc.TcFP4):
        return fp4_tc.dequantize_fp4_tc_ref(p)
    from shrinkjax.kernels import sparse24_tc

    if isinstance(p, sparse24_tc.Tc24):
        return sparse24_tc.dequantize_24_tc_ref(p)
    raise TypeError(f"not a packed layout: {type(p).__name__}")


def _mm(x, w, scale=None):
    y = jnp.matmul(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
    if scale is not None:
        y = y * scale
    return y.astype(x.dtype)


def int_matmul_ref(x, p: PackedInt):
    return _mm(x, dequantize_int(p))


def mxfp4_matmul_ref(x, p: PackedMXFP4):
    return _mm(x, dequantize_mxfp4(p))


def nvfp4_matmul_ref(x, p: PackedNVFP4):
    return _mm(x, dequantize_nvfp4(p, with_tensor_scale=False), p.tensor_scale)


def sparse24_matmul_ref(x, p: Packed24):
    return _mm(x, dequantize_24(p))


def matmul_ref(x, p):
    """Reference ``x @ W`` for any packed layout."""
    if isinstance(p, PackedNVFP4):
        return nvfp4_matmul_ref(x, p)
    return _mm(x, dequantize(p))
