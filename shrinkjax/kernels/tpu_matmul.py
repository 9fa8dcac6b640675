"""Pallas TPU (Mosaic) kernels: ``y = x @ W`` for int4 / int8 group-quantized, MXFP4 / NVFP4
and 2:4-sparse (bf16 or int4 values) weights.

The same packed bytes the GPU kernels read (no new layout): :class:`PackedInt` uint8
``qweight`` ``[Kp/2, Np]`` (int4) or ``[Kp, Np]`` (int8); :class:`PackedMXFP4` /
:class:`PackedNVFP4` uint8 ``codes`` ``[Kp/2, Np]``. 4-bit codes are split-half nibble pairs at
distance ``D``: byte row ``k0/2 + t`` of the chunk starting at K row ``k0`` holds rows ``k0 + t``
(low nibble) and ``k0 + D + t`` (high). Scales (and int zero points) are read as f32
``[Kp/g, Np]`` (:func:`tpu_operands`, a one-time conversion: e8m0 -> ``2**(e - 127)``, e4m3 ->
f32; f32 rows slice cleanly on the TPU's (8, 128) tiles at any group index).

Each ``[D, bn]`` tile of codes is widened to int32, its nibbles split with a mask and a shift,
decoded to f32 with vector arithmetic (int: ``q - z``; E2M1: sign, 2-bit exponent, 1-bit
mantissa), multiplied by its scale row, rounded to bf16 and fed to the MXU with ``jnp.dot``
(f32 accumulation). W equals :mod:`shrinkjax.kernels.reference`'s bf16 dequantization; NVFP4's
f32 tensor scale multiplies the result, as in the reference. Grid ``(M / bm, N / bn, K / bk)``:
the K axis is last and sequential (``arbitrary``), accumulating in a VMEM scratch written out
at the last K step; M and N tiles are independent (``parallel``).

2:4 (:class:`Packed24`): per group of 4 K rows two kept values and their positions (2-bit
metadata, split-half nibble pairs). Row ``4j + r`` of W is ``where(i0 == r, v0, 0) +
where(i1 == r, v1, 0)``: four ``[D, bn]`` selects per tile, each multiplied by the matching
columns ``x[:, 4j + r]``, which the wrapper gathers once per call into a ``[4, M, K/4]`` view
(no strided loads in the kernel).

Status: written for TPU and tested on CPU in Pallas' TPU interpret mode
(``pltpu.InterpretParams``: TPU memory spaces and grid semantics) against the reference and
float64, plus a check that each format lowers to a Mosaic custom call for the ``tpu`` platform
(Mosaic's own compiler passes run only on a TPU). It has not run on a TPU (none is lent here),
so it has no tuning and no timing; narrow tiles (NVFP4's 16-row pairs) may need a wider
layout there.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from shrinkjax.kernels import driver as D
from shrinkjax.kernels.layouts import Packed24, PackedInt, PackedMXFP4, PackedNVFP4, round_up

BLOCK_K = 512  # K rows per grid step (rounded down to a multiple of the layout chunk dividing Kp)
BLOCK_N = 256  # columns per program (128 when 256 does not divide Np)
MAX_BLOCK_M = 256
FORMATS = (PackedInt, PackedMXFP4, PackedNVFP4, Packed24)


def _geometry(p):
    """(kind, pair D, rows per scale row) of a packed weight."""
    if isinstance(p, PackedInt):
        return f"int{p.bits}", p.pair, p.group
    if isinstance(p, PackedMXFP4 | PackedNVFP4):
        return "fp4", p.pair, p.block
    if isinstance(p, Packed24):
        return ("24_int4" if p.is_int4 else "24_bf16"), p.pair, (p.group or 4)
    raise TypeError(
        f"no TPU kernel for {type(p).__name__}; formats: {[f.__name__ for f in FORMATS]}"
    )


def tpu_operands(p):
    """(codes as stored, f32 scales [G, Np] or None, f32 zero points [G, Np] or None).

    int: symmetric layouts get ``z = 2**(bits-1)``; MXFP4 ``2**(e - 127)``; NVFP4 the e4m3
    block scale (its tensor scale stays a separate scalar); 2:4: codes are ``(values, meta)``,
    scales and zero points only for int4 values (symmetric: 8). Cheap XLA converts; keep the result
    to convert once per weight."""
    from shrinkjax.kernels.reference import e4m3_to_f32

    _geometry(p)
    if isinstance(p, Packed24):
        if not p.is_int4:
            return (p.values, p.meta), None, None
        s = p.scales.astype(jnp.float32)
        z = jnp.full(s.shape, 8.0, jnp.float32) if p.zeros is None else p.zeros.astype(jnp.float32)
        return (p.values, p.meta), s, z
    if isinstance(p, PackedInt):
        s = p.scales.astype(jnp.float32)
        if p.zeros is None:
            z = jnp.full(s.shape, 2.0 ** (p.bits - 1), jnp.float32)
        else:
            z = p.zeros.astype(jnp.float32)
        return p.qweight, s, z
    if isinstance(p, PackedMXFP4):
        return p.codes, jnp.exp2(p.scales.astype(jnp.float32) - 127.0), None
    return p.codes, e4m3_to_f32(p.scales), None


def e2m1_f32(q):
    """int32 E2M1 codes in [0, 16) -> their f32 values, with vector arithmetic (no table)."""
    e = (q >> 1) & 3
    m = (q & 1).astype(jnp.float32)
    mag = jnp.where(e == 0, 0.5 * m, (1 << e).astype(jnp.float32) * (0.5 + 0.25 * m))
    return jnp.where((q & 8) != 0, -mag, mag)


def _kernel(x_ref, q_ref, s_ref, *rest, kind, pair, group, bk):
    z_ref = rest[0] if len(rest) == 3 else None
    o_ref, acc_ref = rest[-2], rest[-1]
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    chunk = pair if kind == "int8" else 2 * pair
    codes = q_ref[...].astype(jnp.int32)  # the block once; 32-bit rows slice on any 8 rows
    acc = acc_ref[...]
    for c in range(bk // chunk):
        k0 = kk * bk + c * chunk  # global K row of this chunk
        if kind == "int8":
            tiles = ((0, codes[c * chunk : (c + 1) * chunk]),)
        else:
            b = codes[c * pair : (c + 1) * pair]  # [D, bn]
            tiles = ((0, b & 0xF), (1, b >> 4))
        for h, q in tiles:
            g = jax.lax.div(k0 + h * pair, group)
            s = s_ref[pl.ds(g, 1), :]  # f32 [1, bn]
            if kind == "fp4":
                w = e2m1_f32(q) * s
            else:
                w = (q.astype(jnp.float32) - z_ref[pl.ds(g, 1), :]) * s
            xs = x_ref[:, pl.ds(c * chunk + h * pair, q.shape[0])]  # bf16 [bm, rows]
            acc = acc + jnp.dot(xs, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _kernel24(x_ref, v_ref, m_ref, *rest, int4, pair, group, bq):
    """2:4 along K. ``x_ref`` [4, bm, bq]: ``x[:, 4j + r]`` at ``[r, :, j]`` (permuted by the
    caller); ``v_ref`` bf16 [2, bq, bn] (slot values) or uint8 [bq, bn] (int4: slot0 | slot1 << 4);
    ``m_ref`` uint8 [bq/2, bn]: per group of 4 rows the two kept positions ``i0 | i1 << 2``, as
    split-half nibble pairs at distance ``pair`` groups."""
    s_ref, z_ref = (rest[0], rest[1]) if int4 else (None, None)
    o_ref, acc_ref = rest[-2], rest[-1]
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    meta = m_ref[...].astype(jnp.int32)
    vals = v_ref[...].astype(jnp.int32) if int4 else None
    acc = acc_ref[...]
    for c in range(bq // (2 * pair)):
        mb = meta[c * pair : (c + 1) * pair]  # [Dg, bn]
        for h, nib in ((0, mb & 0xF), (1, mb >> 4)):
            j0 = c * 2 * pair + h * pair  # first group (of 4 rows) of this tile, in the block
            if int4:
                g = jax.lax.div((kk * bq + j0) * 4, group)
                s, z = s_ref[pl.ds(g, 1), :], z_ref[pl.ds(g, 1), :]
                b = vals[j0 : j0 + pair]
                v0 = (((b & 0xF).astype(jnp.float32) - z) * s).astype(jnp.bfloat16)
                v1 = (((b >> 4).astype(jnp.float32) - z) * s).astype(jnp.bfloat16)
            else:
                v0 = v_ref[0, pl.ds(j0, pair), :]
                v1 = v_ref[1, pl.ds(j0, pair), :]
            i0, i1 = nib & 3, nib >> 2
            zero = jnp.zeros(v0.shape, v0.dtype)
            for r in range(4):  # rows 4j + r of W: the kept value at position r, else 0
                w = jnp.where(i0 == r, v0, zero) + jnp.where(i1 == r, v1, zero)
                xs = x_ref[r, :, pl.ds(j0, pair)]  # bf16 [bm, Dg]
                acc = acc + jnp.dot(xs, w, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("int4", "pair", "group", "bm", "bn", "bq", "interpret")
)
def _matmul24_2d(x2, values, meta, s, z, *, int4, pair, group, bm, bn, bq, interpret):
    m, k = x2.shape
    kq, np_ = meta.shape[0] * 2, meta.shape[1]
    mp = round_up(m, bm)
    xb = jnp.pad(x2.astype(jnp.bfloat16), ((0, mp - m), (0, 4 * kq - k)))
    xp = jnp.transpose(xb.reshape(mp, kq, 4), (2, 0, 1))  # [4, Mp, Kq]: x[:, 4j + r] at [r, :, j]
    in_specs = [
        pl.BlockSpec((4, bm, bq), lambda i, j, kk: (0, i, kk)),
        pl.BlockSpec((bq, bn), lambda i, j, kk: (kk, j))
        if int4
        else pl.BlockSpec((2, bq, bn), lambda i, j, kk: (0, kk, j)),
        pl.BlockSpec((bq // 2, bn), lambda i, j, kk: (kk, j)),
    ]
    arrays = [xp, values, meta]
    if int4:
        table = pl.BlockSpec((s.shape[0], bn), lambda i, j, kk: (0, j))
        in_specs += [table, table]
        arrays += [s, z]
    kern = functools.partial(_kernel24, int4=int4, pair=pair, group=group, bq=bq)
    name = f"tpu_24_{'int4' if int4 else 'bf16'}_matmul"
    y = _call(kern, arrays, in_specs, (mp // bm, np_ // bn, kq // bq), bm, bn, interpret, name)
    return y[:m]


def _call(kernel, arrays, in_specs, grid, bm, bn, interpret, name):
    """The pallas_call every TPU kernel here shares: f32 ``[M, N]`` out, K (grid axis 2) last
    and sequential, an f32 VMEM accumulator of one ``[bm, bn]`` tile."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((grid[0] * bm, grid[1] * bn), jnp.float32),
            grid=grid,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
            compiler_params=None
            if interpret
            else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=pltpu.InterpretParams() if interpret else False,
            name=name,
        )(*arrays)


@functools.partial(
    jax.jit, static_argnames=("kind", "pair", "group", "bm", "bn", "bk", "interpret")
)
def _matmul_2d(x2, q, s, z, scale, *, kind, pair, group, bm, bn, bk, interpret):
    m, k = x2.shape
    kp, np_ = s.shape[0] * group, s.shape[1]
    mp = round_up(m, bm)
    xb = jnp.pad(x2.astype(jnp.bfloat16), ((0, mp - m), (0, kp - k)))
    qrows = bk if kind == "int8" else bk // 2
    kern = functools.partial(_kernel, kind=kind, pair=pair, group=group, bk=bk)
    table = pl.BlockSpec((s.shape[0], bn), lambda i, j, kk: (0, j))
    in_specs = [
        pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
        pl.BlockSpec((qrows, bn), lambda i, j, kk: (kk, j)),
        table,
    ] + ([] if z is None else [table])
    arrays = [xb, q, s] + ([] if z is None else [z])
    grid = (mp // bm, np_ // bn, kp // bk)
    y = _call(kern, arrays, in_specs, grid, bm, bn, interpret, f"tpu_{kind}_g{group}_matmul")
    if scale is not None:  # NVFP4 tensor scale, on the f32 result as in the reference
        y = y * scale
    return y[:m]


def tpu_matmul(x, p, *, operands=None, interpret=None, block_k=BLOCK_K, block_n=None,
               block_m=None):  # fmt: skip
    """``x[..., K] @ W`` for a :class:`PackedInt` (int4 / int8, grouped scales, optional zero
    points), :class:`PackedMXFP4` or :class:`PackedNVFP4` with the Pallas TPU kernel; returns
    ``x.dtype``. Other layouts raise a TypeError.

    ``interpret`` None: TPU interpret mode unless running on a TPU. ``operands``:
    :func:`tpu_operands(p) <tpu_operands>` kept by the caller. Tiles: ``block_k`` K rows per grid
    step (a multiple of the layout chunk dividing Kp), ``block_n`` (128 or a multiple dividing
    Np), ``block_m`` (rows of x per program; default: M rounded up to 16, at most 256).
    """
    kind, pair, group = _geometry(p)
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
    bk = D.rows_per_step(block_k, p.chunk, p.kp)
    q, s, z = tpu_operands(p) if operands is None else operands
    if isinstance(p, Packed24):
        values, meta = q
        y = _matmul24_2d(
            x2, values, meta, s, z, int4=p.is_int4, pair=pair, group=group, bm=bm, bn=bn,
            bq=bk // 4, interpret=bool(interpret),
        )  # fmt: skip
        return y[:, : p.n].astype(x.dtype).reshape(*lead, p.n)
    scale = jnp.asarray(p.tensor_scale, jnp.float32) if isinstance(p, PackedNVFP4) else None
    y = _matmul_2d(
        x2, q, s, z, scale, kind=kind, pair=pair, group=group, bm=bm, bn=bn, bk=bk,
        interpret=bool(interpret),
    )  # fmt: skip
    return y[:, : p.n].astype(x.dtype).reshape(*lead, p.n)
