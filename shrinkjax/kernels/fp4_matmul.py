"""Pallas kernels: ``y = x @ W`` for MXFP4 and NVFP4 weights, dequantized to bf16 in-kernel.

Hopper has no FP4 tensor cores, so each ``[D, bn]`` tile of E2M1 codes is decoded with bit
operations (no lookup table, no int->float conversion):

* ``e2m1 -> f16``: ``bits = (q & 8) << 12 | (q & 7) << 9`` puts the sign, the 2 exponent bits
  and the mantissa bit into an f16 whose value is exactly ``e2m1(q) * 2**-14`` (code 1 lands on
  an f16 subnormal, which GPUs convert exactly).
* the per-block scale row ``[1, bn]`` is decoded once per tile into a bf16 that carries the
  ``2**14``: MXFP4 ``bf16 bits = (e8m0 + 14) << 7`` = ``2**(e - 127 + 14)``; NVFP4 e4m3 ->
  f16 bits ``(b & 0x80) << 8 | (b & 0x7F) << 7`` = ``e4m3 * 2**-8``, times ``2**22``.
* ``W = bf16(e2m1 * 2**-14) * scale_bf16`` is exact (at most 6 significant bits), so W equals
  the reference bit for bit. NVFP4's f32 ``tensor_scale`` multiplies the f32 result.

Layouts: :class:`~shrinkjax.kernels.layouts.PackedMXFP4` (split-half nibble pairs, ``D = 32``,
one e8m0 row per half) and :class:`~shrinkjax.kernels.layouts.PackedNVFP4` (``D = 16``).
With ``late_scale`` the block scale multiplies the ``[bm, bn]`` dot result instead of W. The
same chunk decoder feeds the prefill path's dequantize kernel (:mod:`shrinkjax.kernels.dequant`),
which for NVFP4 also folds ``tensor_scale`` into the bf16 W it writes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from shrinkjax.kernels import dequant
from shrinkjax.kernels import driver as D
from shrinkjax.kernels.layouts import PackedMXFP4, PackedNVFP4
from shrinkjax.kernels.reference import mxfp4_matmul_ref, nvfp4_matmul_ref


def e2m1_to_bf16_scaled(nib):
    """uint8 codes in [0,16) -> bf16 ``e2m1 * 2**-14`` (exact)."""
    n16 = nib.astype(jnp.uint16)
    bits = ((n16 & 8) << 12) | ((n16 & 7) << 9)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.bfloat16)


def e8m0_scale_row(e):
    """uint8 e8m0 [1, bn] -> bf16 ``2**(e - 127 + 14)`` (exact for e <= 240)."""
    return D.as_bf16_bits((e.astype(jnp.uint16) + 14) << 7)


def e4m3_scale_row(b):
    """uint8 e4m3fn bits [1, bn] -> bf16 ``e4m3 * 2**14`` (exact)."""
    b16 = b.astype(jnp.uint16)
    h = jax.lax.bitcast_convert_type(((b16 & 0x80) << 8) | ((b16 & 0x7F) << 7), jnp.float16)
    return (h.astype(jnp.float32) * 4194304.0).astype(jnp.bfloat16)  # 2**22


def _fp4_chunk(mac, w_refs, k, acc, *, pair, block, decode_scale):
    q_ref, s_ref = w_refs
    b = q_ref[pl.ds(pl.multiple_of(D.idiv(k, 2), pair), pair), :].astype(jnp.uint16)  # [D, bn]
    for h, nib in enumerate((b & 0xF, b >> 4)):
        kh = k + h * pair
        s = decode_scale(s_ref[pl.ds(D.idiv(kh, block), 1), :])  # bf16 [1, bn]
        acc = mac(acc, (), pl.multiple_of(kh, pair), pair, e2m1_to_bf16_scaled(nib), s)
    return acc


def _chunk_fn(p):
    nv = isinstance(p, PackedNVFP4)
    decode_scale = e4m3_scale_row if nv else e8m0_scale_row
    return functools.partial(_fp4_chunk, pair=p.pair, block=p.block, decode_scale=decode_scale)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _fp4_matmul_2d(x2, p, cfg: D.TileConfig, interpret: bool):
    nv = isinstance(p, PackedNVFP4)
    out = D.run_tiled_matmul(
        _chunk_fn(p),
        D.prepare_x(x2, p.kp, cfg.block_m),
        [p.codes, p.scales],
        m=x2.shape[0],
        kp=p.kp,
        np_=p.np_,
        chunk=p.chunk,
        cfg=cfg,
        interpret=interpret,
        name="nvfp4_matmul" if nv else "mxfp4_matmul",
        width=p.pair,
        out_dtype=jnp.float32 if nv else x2.dtype,  # NVFP4: tensor scale on the f32 result
    )
    return D.finish(out, p.n, x2.dtype, scale=p.tensor_scale if nv else None)


@dequant.register(PackedMXFP4)
def _mxfp4_decoder(p: PackedMXFP4) -> dequant.Decoder:
    return dequant.Decoder(_chunk_fn(p), [p.codes, p.scales], "mxfp4_dequant")


@dequant.register(PackedNVFP4)
def _nvfp4_decoder(p: PackedNVFP4) -> dequant.Decoder:
    return dequant.Decoder(
        _chunk_fn(p), [p.codes, p.scales], "nvfp4_dequant", tensor_scale=p.tensor_scale
    )


def fp4_matmul(
    x,
    packed: PackedMXFP4 | PackedNVFP4,
    *,
    interpret=None,
    path="auto",
    **tuning,
):
    """``x[..., K] @ W[K, N]`` for an MXFP4 or NVFP4 packed weight (see :func:`int_matmul`
    in :mod:`shrinkjax.kernels.int_matmul` for the shared keyword arguments)."""
    if not isinstance(packed, PackedMXFP4 | PackedNVFP4):
        raise TypeError(f"expected PackedMXFP4 or PackedNVFP4, got {type(packed).__name__}")
    return D.run_packed(
        _fp4_matmul_2d,
        x,
        packed,
        interpret,
        path=path,
        **tuning,
    )


def mxfp4_matmul(x, packed: PackedMXFP4, **kw):
    """``x @ W`` for MXFP4 (E2M1 codes, one e8m0 scale per 32 rows of K)."""
    if not isinstance(packed, PackedMXFP4):
        raise TypeError(f"expected PackedMXFP4, got {type(packed).__name__}")
    return fp4_matmul(x, packed, **kw)


def nvfp4_matmul(x, packed: PackedNVFP4, **kw):
    """``x @ W`` for NVFP4 (E2M1 codes, e4m3 scale per 16 rows of K, f32 tensor scale)."""
    if not isinstance(packed, PackedNVFP4):
        raise TypeError(f"expected PackedNVFP4, got {type(packed).__name__}")
    return fp4_matmul(x, packed, **kw)


D.register_packed(PackedMXFP4, fp4_matmul, mxfp4_matmul_ref)
D.register_packed(PackedNVFP4, fp4_matmul, nvfp4_matmul_ref)
