"""Pallas TPU (Mosaic) kernel: ``y = x @ W`` for int4 / int8 group-quantized weights.

The same :class:`~shrinkjax.kernels.layouts.PackedInt` bytes the GPU kernels read (no new
layout): uint8 ``qweight`` ``[Kp/2, Np]`` (int4, split-half nibble pairs at distance ``D``:
byte row ``k0/2 + t`` of the chunk starting at K row ``k0`` holds rows ``k0 + t`` (low nibble)
and ``k0 + D + t`` (high)) or ``[Kp, Np]`` (int8). Scales and zero points are read as f32
``[Kp/g, Np]`` (:func:`tpu_operands`: a one-time conversion; f32 rows slice cleanly on the
TPU's (8, 128) tiles at any group index, bf16 rows pack two per sublane).

The TPU has no GPU-style register tricks to play: each ``[D, bn]`` tile of codes is widened to
int32, its nibbles split with a mask and a shift, converted to f32 (the VPU converts natively),
dequantized ``(q - z) * s`` in f32, rounded to bf16 and fed to the MXU with ``jnp.dot``
(f32 accumulation). Grid ``(M / bm, N / bn, K / bk)``: the K axis is last and sequential
(``arbitrary``), accumulating in a VMEM scratch that is written out at the last K step; M and N
tiles are independent (``parallel``, split across TensorCores where there are several).

Status: written for TPU and tested on CPU in Pallas' TPU interpret mode
(``pltpu.InterpretParams``: TPU memory spaces and grid semantics) against the float reference,
plus a check that it lowers to a Mosaic custom call for the ``tpu`` platform. It has not run on
a TPU (none is lent here), so it has no tuning and no timing.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from shrinkjax.kernels import driver as D
from shrinkjax.kernels.layouts import PackedInt, round_up

BLOCK_K = 512  # K rows per grid step (rounded down to a multiple of the layout chunk dividing Kp)
BLOCK_N = 256  # columns per program (128 when 256 does not divide Np)
MAX_BLOCK_M = 256


def tpu_operands(p: PackedInt):
    """(uint8 codes as stored, f32 scales [G, Np], f32 zero points [G, Np]).

    Symmetric layouts get ``z = 2**(bits-1)``. Cheap XLA converts; keep the result to
    convert once per weight."""
    s = p.scales.astype(jnp.float32)
    if p.zeros is None:
        z = jnp.full(s.shape, 2.0 ** (p.bits - 1), jnp.float32)
    else:
        z = p.zeros.astype(jnp.float32)
    return p.qweight, s, z


def _block_k(p: PackedInt, block_k: int) -> int:
    bk = max(p.chunk, (min(block_k, p.kp) // p.chunk) * p.chunk)
    while p.kp % bk:
        bk -= p.chunk
    return bk


def _kernel(x_ref, q_ref, s_ref, z_ref, o_ref, acc_ref, *, bits, pair, group, bk):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    chunk = 2 * pair if bits == 4 else pair
    acc = acc_ref[...]
    for c in range(bk // chunk):
        k0 = kk * bk + c * chunk  # global K row of this chunk
        if bits == 4:
            b = q_ref[pl.ds(c * pair, pair), :].astype(jnp.int32)  # [D, bn]
            tiles = ((0, b & 0xF), (1, b >> 4))
        else:
            tiles = ((0, q_ref[pl.ds(c * chunk, chunk), :].astype(jnp.int32)),)
        for h, q in tiles:
            g = jax.lax.div(k0 + h * pair, group)
            s = s_ref[pl.ds(g, 1), :]  # f32 [1, bn]
            z = z_ref[pl.ds(g, 1), :]
            w = ((q.astype(jnp.float32) - z) * s).astype(jnp.bfloat16)
            xs = x_ref[:, pl.ds(c * chunk + h * pair, q.shape[0])]  # bf16 [bm, rows]
            acc = acc + jnp.dot(xs, w, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("bits", "pair", "group", "bm", "bn", "bk", "interpret")
)
def _matmul_2d(x2, q, s, z, *, bits, pair, group, bm, bn, bk, interpret):
    m, k = x2.shape
    kp, np_ = s.shape[0] * group, s.shape[1]
    mp = round_up(m, bm)
    xb = jnp.pad(x2.astype(jnp.bfloat16), ((0, mp - m), (0, kp - k)))
    qrows = bk // 2 if bits == 4 else bk
    kern = functools.partial(_kernel, bits=bits, pair=pair, group=group, bk=bk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        y = pl.pallas_call(
            kern,
            out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
            grid=(mp // bm, np_ // bn, kp // bk),
            in_specs=[
                pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((qrows, bn), lambda i, j, kk: (kk, j)),
                pl.BlockSpec((s.shape[0], bn), lambda i, j, kk: (0, j)),
                pl.BlockSpec((s.shape[0], bn), lambda i, j, kk: (0, j)),
            ],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
            compiler_params=None
            if interpret
            else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=pltpu.InterpretParams() if interpret else False,
            name=f"tpu_int{bits}_g{group}_matmul",
        )(xb, q, s, z)
    return y[:m]


def tpu_int_matmul(x, p: PackedInt, *, operands=None, interpret=None, block_k=BLOCK_K,
                   block_n=None, block_m=None):  # fmt: skip
    """``x[..., K] @ W`` for a :class:`PackedInt` (int4 / int8, grouped scales, optional zero
    points) with the Pallas TPU kernel; returns ``x.dtype``.

    ``interpret`` None: TPU interpret mode unless running on a TPU. ``operands``:
    :func:`tpu_operands(p) <tpu_operands>` kept by the caller. Tiles: ``block_k`` K rows per grid
    step (a multiple of the layout chunk dividing Kp), ``block_n`` (128 or a multiple dividing
    Np), ``block_m`` (rows of x per program; default: M rounded up to 16, at most 256).
    """
    x2, lead = D.flatten_x(x, p.k)
    m = x2.shape[0]
    if interpret is None:
        interpret = not D.on_tpu()
    bn = block_n or (BLOCK_N if p.np_ % BLOCK_N == 0 else 128)
    if p.np_ % bn or bn % 128:
        raise ValueError(f"block_n {bn} must be a multiple of 128 dividing Np={p.np_}")
    bm = block_m or min(MAX_BLOCK_M, round_up(max(m, 1), 16))
    if bm % 8:
        raise ValueError(f"block_m {bm} must be a multiple of 8")
    bk = _block_k(p, block_k)
    q, s, z = tpu_operands(p) if operands is None else operands
    y = _matmul_2d(
        x2, q, s, z, bits=p.bits, pair=p.pair, group=p.group, bm=bm, bn=bn, bk=bk,
        interpret=bool(interpret),
    )  # fmt: skip
    return y[:, : p.n].astype(x.dtype).reshape(*lead, p.n)
