"""Pallas kernel: ``y = x @ W`` for 2:4-sparse (along K) weights, expanded inside the kernel.

Layout: :class:`~shrinkjax.kernels.layouts.Packed24` (build with
:func:`~shrinkjax.kernels.layouts.pack_24` for bf16 values or
:func:`~shrinkjax.kernels.layouts.pack_24_int4` for int4 values with group scales). The
weight stream is half the dense one (bf16: 2 values + 4 metadata bits per 4 weights; int4:
one byte + 4 bits per 4 weights).

The activations are re-ordered once by XLA as ``x4[p, m, j] = x[m, 4j + p]``. For a tile of
``Dg`` groups the kernel loads the two kept values ``v0, v1 [Dg, bn]`` and their positions
``i0, i1`` and, for each in-group position ``p``, builds the dense rows ``4j + p`` as
``where(i0 == p, v0, where(i1 == p, v1, 0))`` and dots them with ``x4[p, :, groups]``: no
scatter, gather or reshape inside the kernel. Hopper's sparse tensor cores are not used (the
Triton lowering has no sparse MMA); the gain is the halved weight stream. The same chunk decoder
feeds the prefill path's dequantize kernel (:mod:`shrinkjax.kernels.dequant`), which stores
each position's rows ``4j + p`` of the dense bf16 W (a ``[Kp/4, 4, Np]`` view of ``[Kp, Np]``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from shrinkjax.kernels import dequant
from shrinkjax.kernels import driver as D
from shrinkjax.kernels.layouts import Packed24
from shrinkjax.kernels.reference import sparse24_matmul_ref

_BF16_MAGIC = 0x4300  # bits of 128.0


def _dequant_int4(nib, s, zoff):
    w = D.as_bf16_bits(nib.astype(jnp.uint16) | _BF16_MAGIC)
    return (w - zoff) * s


def _sparse_chunk(mac, w_refs, k, acc, *, pair, is_int4, group, has_zeros):
    v_ref, m_ref = w_refs[0], w_refs[1]
    g0 = pl.multiple_of(D.idiv(k, 4), 2 * pair)  # first group of this chunk
    mb = m_ref[pl.ds(pl.multiple_of(D.idiv(k, 8), pair), pair), :]  # uint8 [Dg, bn]
    for h, nib in enumerate((mb & 0xF, mb >> 4)):
        gh = pl.multiple_of(g0 + h * pair, pair)
        if is_int4:
            c = v_ref[pl.ds(gh, pair), :]  # uint8 [Dg, bn]: slot0 | slot1 << 4
            srow = D.idiv(k + h * 4 * pair, group)
            s = w_refs[2][pl.ds(srow, 1), :]
            if has_zeros:
                z = w_refs[3][pl.ds(srow, 1), :]
                zoff = (z.astype(jnp.float32) + 128.0).astype(jnp.bfloat16)
            else:
                zoff = 136.0
            v0 = _dequant_int4(c & 0xF, s, zoff)
            v1 = _dequant_int4(c >> 4, s, zoff)
        else:
            v0 = v_ref[0, pl.ds(gh, pair), :]  # bf16 [Dg, bn]
            v1 = v_ref[1, pl.ds(gh, pair), :]
        i0 = nib & 3
        i1 = nib >> 2
        for p in range(4):
            w = jnp.where(i0 == p, v0, jnp.where(i1 == p, v1, 0.0).astype(v1.dtype))
            acc = mac(acc, (np.int32(p),), gh, pair, w)  # x4[p, :, groups gh..gh+Dg)
    return acc


def _chunk_fn(p: Packed24):
    has_zeros = p.zeros is not None
    return functools.partial(
        _sparse_chunk, pair=p.pair, is_int4=p.is_int4, group=p.group, has_zeros=has_zeros
    )


def _weights(p: Packed24):
    ws = [p.values, p.meta]
    if p.is_int4:
        ws.append(p.scales)
        if p.zeros is not None:
            ws.append(p.zeros)
    return ws


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _sparse24_matmul_2d(x2, p: Packed24, cfg: D.TileConfig, interpret: bool):
    m = x2.shape[0]
    xp = D.prepare_x(x2, p.kp, cfg.block_m)  # [Mp, Kp]
    mp = xp.shape[0]
    x4 = xp.reshape(mp, p.kp // 4, 4).transpose(2, 0, 1)  # [4, Mp, Kq]
    out = D.run_tiled_matmul(
        _chunk_fn(p),
        x4,
        _weights(p),
        m=m,
        kp=p.kp,
        np_=p.np_,
        chunk=p.chunk,
        cfg=cfg,
        interpret=interpret,
        name="sparse24_int4_matmul" if p.is_int4 else "sparse24_bf16_matmul",
        width=p.pair,
        out_dtype=x2.dtype,
    )
    return D.finish(out, p.n, x2.dtype)


@dequant.register(Packed24)
def _sparse24_decoder(p: Packed24) -> dequant.Decoder:
    name = "sparse24_int4_dequant" if p.is_int4 else "sparse24_bf16_dequant"
    return dequant.Decoder(_chunk_fn(p), _weights(p), name, sparse24=True)


def sparse24_matmul(
    x,
    packed: Packed24,
    *,
    interpret=None,
    path="auto",
    **tuning,
):
    """``x[..., K] @ W[K, N]`` for a 2:4-sparse :class:`Packed24` weight (bf16 or int4 values).

    Same keyword arguments as :func:`shrinkjax.kernels.int_matmul.int_matmul`; ``block_k`` is
    rounded to a multiple of the layout chunk (``8 * Dg`` rows of K); ``late_scale`` has no
    effect (the kept values are dequantized before the position select).
    """
    if not isinstance(packed, Packed24):
        raise TypeError(f"expected Packed24, got {type(packed).__name__}")
    return D.run_packed(
        _sparse24_matmul_2d,
        x,
        packed,
        interpret,
        path=path,
        **tuning,
    )


D.register_packed(Packed24, sparse24_matmul, sparse24_matmul_ref)
