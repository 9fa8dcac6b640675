"""Pallas kernel: ``y = x @ W`` for int4 / int8 weights with per-group scales (and zeros).

Layout: :class:`shrinkjax.kernels.layouts.PackedInt` (build with
:func:`shrinkjax.kernels.layouts.pack_int`). The weight is dequantized to bf16 inside the
kernel and fed to ``jnp.dot`` (tensor cores, f32 accumulation):

* int4: the 4-bit code is OR-ed into the mantissa of bf16 ``128.0`` (``0x4300 | q`` is exactly
  ``128 + q``), so ``W = (bf16(0x4300 | q) - (128 + zero)) * scale`` needs no int->float
  conversion instruction; every step is exact until the single rounding of the product.
  With ``late_scale`` the dot takes ``128 + q`` directly and the scale / zero point are applied
  to the ``[bm, bn]`` result (see :class:`~shrinkjax.kernels.driver.TileConfig`).
* int8: the same trick in f32 (``0x4B000000 | q`` is ``2**23 + q``).

One K chunk is ``2*D`` rows (int4, split-half nibble pairs; ``D`` divides the group so each
half has one scale row) or ``C`` rows (int8); each chunk is one or two ``[bm, D] x [D, bn]``
dots. The same chunk decoder feeds the prefill path's dequantize kernel
(:mod:`shrinkjax.kernels.dequant`), so large M runs ``bf16 W = dequantize(packed)`` + cuBLAS.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from shrinkjax.kernels import dequant
from shrinkjax.kernels import driver as D
from shrinkjax.kernels.layouts import PackedInt
from shrinkjax.kernels.reference import int_matmul_ref

_F32_MAGIC = 0x4B000000  # bits of 2**23
_BF16_MAGIC = 0x4300  # bits of 128.0


def _int4_chunk(mac, w_refs, k, acc, *, pair, group, has_zeros):
    q_ref, s_ref = w_refs[0], w_refs[1]
    b = q_ref[pl.ds(pl.multiple_of(D.idiv(k, 2), pair), pair), :].astype(jnp.uint16)  # [D, bn]
    for h, nib in enumerate((b & 0xF, b >> 4)):
        kh = k + h * pair
        g = D.idiv(kh, group)
        s = s_ref[pl.ds(g, 1), :]  # bf16 [1, bn]
        if has_zeros:
            z = w_refs[2][pl.ds(g, 1), :]
            zoff = (z.astype(jnp.float32) + 128.0).astype(jnp.bfloat16)
        else:
            zoff = 136.0  # 128 + 8
        w = D.as_bf16_bits(nib | _BF16_MAGIC)  # exactly 128 + code
        acc = mac(acc, (), pl.multiple_of(kh, pair), pair, w, s, zoff)
    return acc


def _int8_chunk(mac, w_refs, k, acc, *, chunk, group, has_zeros):
    q_ref, s_ref = w_refs[0], w_refs[1]
    b = q_ref[pl.ds(k, chunk), :]  # uint8 [C, bn]
    g = D.idiv(k, group)
    s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)
    if has_zeros:
        zoff = w_refs[2][pl.ds(g, 1), :].astype(jnp.float32) + 8388608.0
    else:
        zoff = 8388608.0 + 128.0
    f = jax.lax.bitcast_convert_type(b.astype(jnp.uint32) | _F32_MAGIC, jnp.float32)
    return mac(acc, (), k, chunk, ((f - zoff) * s).astype(jnp.bfloat16))  # already scaled


def _chunk_fn(p: PackedInt):
    has_zeros = p.zeros is not None
    if p.bits == 4:
        return functools.partial(_int4_chunk, pair=p.pair, group=p.group, has_zeros=has_zeros)
    return functools.partial(_int8_chunk, chunk=p.pair, group=p.group, has_zeros=has_zeros)


def _weights(p: PackedInt):
    return [p.qweight, p.scales] + ([p.zeros] if p.zeros is not None else [])


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _int_matmul_2d(x2, p: PackedInt, cfg: D.TileConfig, interpret: bool):
    out = D.run_tiled_matmul(
        _chunk_fn(p),
        D.prepare_x(x2, p.kp, cfg.block_m),
        _weights(p),
        m=x2.shape[0],
        kp=p.kp,
        np_=p.np_,
        chunk=p.chunk,
        cfg=cfg,
        interpret=interpret,
        name=f"int{p.bits}_g{p.group}_matmul",
        width=p.pair,
        out_dtype=x2.dtype,
    )
    return D.finish(out, p.n, x2.dtype)


@dequant.register(PackedInt)
def _int_decoder(p: PackedInt) -> dequant.Decoder:
    return dequant.Decoder(_chunk_fn(p), _weights(p), f"int{p.bits}_g{p.group}_dequant")


def int_matmul(
    x,
    packed: PackedInt,
    *,
    interpret=None,
    path="auto",
    **tuning,
):
    """``x[..., K] @ W[K, N]`` for a :class:`PackedInt` weight (int4/int8, grouped scales).

    Runs the Pallas Triton kernels on GPU and the same kernels in Pallas interpret mode on CPU
    (``interpret=None`` picks automatically). Ragged M, K, N are handled internally (K and N
    are padded in the layout, rows beyond M are masked). Returns ``x.dtype``.

    ``path``: ``"fused"`` (one kernel decoding in its inner loop: decode / small M),
    ``"dequant_dot"`` (Pallas dequantize to bf16, then cuBLAS: prefill / large M) or
    ``"auto"`` (``M >= dispatch.PREFILL_MIN_M`` -> dequant_dot, unless a tile argument below
    is given).

    ``tuning``: fused-kernel tiles (:data:`shrinkjax.kernels.driver.TUNING_KEYS`; unknown names
    raise a TypeError; absent or ``None`` = :func:`shrinkjax.kernels.driver.choose_config`: the
    tuned table for M <= 16, heuristics otherwise): ``block_m`` / ``block_n`` (powers of two >= 16),
    ``block_k`` (K rows per loop step, rounded to the layout chunk), ``split_k`` (K splits whose
    f32 partials XLA sums), ``num_warps``, ``num_stages`` (Triton), ``fma`` (M <= 8: CUDA-core
    GEMV accumulation instead of tensor-core dots), ``late_scale`` (scale the dot result).
    """
    return D.run_packed(
        _int_matmul_2d,
        x,
        packed,
        interpret,
        path=path,
        **tuning,
    )


D.register_packed(PackedInt, int_matmul, int_matmul_ref)
