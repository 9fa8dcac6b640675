"""int4 weights packed for the Mosaic GPU probe's ``wgmma`` register fragments: each thread reads
its own 32-bit words and upcasts them with a shift, a ``lop3`` and a subtraction per bf16 pair.
Used by ``scripts/probe_mgpu_int4.py --w-layout packed``; a probe for issue 5, not a library
kernel.

Why: Mosaic GPU's own int4 load (layout inference picks ``WGMMA_LAYOUT``, 2 elements per
register) reads the int4 tile one byte per ``ld.shared.s8`` and spends 5 instructions per bf16
pair (load, shift, ``prmt``, ``lop3``, ``sub``): 64 byte loads and 320 instructions per thread
for a group's 64 x 256 part of a stage (fourteenth session's PTX). Its profile put the
consumers' upcast at 47% of their time. Here a one-time packing puts the 8 int4 values one
thread's fragment needs for a ``k16`` block into one 32-bit word, 16 words per thread per part,
read as 4 x 128-bit loads (consecutive threads, consecutive 16 bytes: no bank conflicts).

Packed layout (:func:`pack_wgmma_int4`), int32 ``[N / 64, K / 256, 16, 128]``: per 64-row tile
and 256-column part, 2048 words ``[4 quads i][128 threads t][4 words v]`` (flat ``512 i + 4 t +
v``). Word ``(i, t, v)`` holds ``k16`` block ``kb = 4 i + v`` of thread ``t`` (warp ``w = t //
32``, lane ``l = t % 32``): nibble ``j = 2 bb + h`` (bits ``4 j``) and ``j + 4`` (bits ``16 + 4
j``) are the offset-binary codes ``u = q + 8`` of weight row ``16 w + 8 h + l // 4`` at columns
``16 kb + 8 bb + 2 (l % 4)`` and the one after: the two bf16 of ``WGMMA_LAYOUT``'s register
``(col block 2 kb + bb, row half h)``. ``(word >> 4 j) & 0x000F000F | 0x43004300`` is then that
register as bf16 pair ``128 + u = 136 + q``, and subtracting 136 (exact) gives ``q``.
"""

from __future__ import annotations

import functools

import numpy as np

PART = 256  # weight columns per packed block (16 k16 blocks: 16 words per thread)
ROWS = 64  # weight rows per packed block (one wgmma M)


def pack_wgmma_int4(codes_NxK):
    """Signed int4 codes ``q [N, K]`` (-8..7, any int dtype) -> int32 ``[N / 64, K / 256, 16,
    128]`` in the module's packed layout."""
    q = np.asarray(codes_NxK)
    n, k = q.shape
    if n % ROWS or k % PART:
        raise ValueError(f"packed int4 needs N % {ROWS} == 0 and K % {PART} == 0, got {q.shape}")
    if q.min() < -8 or q.max() > 7:
        raise ValueError(f"int4 codes must lie in [-8, 7], got [{q.min()}, {q.max()}]")
    u = (q.astype(np.int64) + 8).astype(np.uint32)
    # rows 16 w + 8 h + rr; columns 256 p + 16 (4 i + v) + 8 bb + 2 c + e
    u = u.reshape(n // ROWS, 4, 2, 8, k // PART, 4, 4, 2, 4, 2)
    #               nt     w  h  rr  p         i  v  bb c  e
    h = np.arange(2).reshape(1, 1, 2, 1, 1, 1, 1, 1, 1, 1)
    bb = np.arange(2).reshape(1, 1, 1, 1, 1, 1, 1, 2, 1, 1)
    e = np.arange(2).reshape(1, 1, 1, 1, 1, 1, 1, 1, 1, 2)
    words = (u << (4 * (2 * bb + h) + 16 * e).astype(np.uint32)).sum(axis=(2, 7, 9))
    # -> (nt, w, rr, p, i, v, c): to (nt, p, i, w, rr, c, v), i.e. [i][t = 32 w + 4 rr + c][v]
    words = words.transpose(0, 3, 4, 1, 2, 6, 5).reshape(n // ROWS, k // PART, 16, 128)
    return words.astype(np.uint32).view(np.int32)


def unpack_wgmma_int4(words):
    """The inverse of :func:`pack_wgmma_int4` (for tests): int32 ``[N / 64, K / 256, 16, 128]``
    -> int8 codes ``[N, K]``."""
    w = np.asarray(words).view(np.uint32)
    nt, kp = w.shape[:2]
    w = w.reshape(nt, kp, 4, 4, 8, 4, 4).transpose(0, 3, 4, 1, 2, 6, 5)  # (nt, w, rr, p, i, v, c)
    out = np.empty((nt, 4, 2, 8, kp, 4, 4, 2, 4, 2), np.int8)
    for h in range(2):
        for bb in range(2):
            for e in range(2):
                nib = (w >> (4 * (2 * bb + h) + 16 * e)) & 0xF
                out[:, :, h, :, :, :, :, bb, :, e] = nib.astype(np.int8) - 8
    return out.reshape(nt * ROWS, kp * PART)


def upcast_words(words, *, sub=True, groups=None, quads=(0, 1, 2, 3)):
    """A group's words (``plgpu.load`` of one packed block with layout ``WG_STRIDED((16, 128),
    vec_size=4)``) -> bf16 ``[64, 256]`` in ``WGMMA_LAYOUT`` (``plgpu.inline_mgpu``): per bf16
    pair one ``shr`` (none for the first), one ``lop3`` and, with ``sub``, one ``sub.bf16x2``
    of 136 (without: ``136 + q``, for a caller that takes ``136 Σx`` off itself).
    ``groups``: ``(s0, c0, s1, c1)``, bf16 ``[64]`` row vectors (``plgpu.Layout.WGMMA.reduce(1)``)
    of the block's two 128-column groups: scale ``s`` and ``c = 128 + z`` for the unsigned zero
    point ``z`` (``136 + z`` for one relative to the signed codes). Each pair is then
    ``((128 + u) - c) * s`` (``sub.bf16x2``, exact, then ``mul.rn.bf16x2``: the dequantized
    weight rounded to bf16 once, as Marlin-style kernels do). ``quads``: upcast only these
    quads' words, each 64 columns (the result is ``[64, 64 len(quads)]``)."""
    import jax.numpy as jnp
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from shrinkjax.kernels.int4_mgpu import bf16_pair, decode_pair  # (the library's decode)

    shape = (ROWS, PART // 4 * len(quads))
    row = plgpu.Layout.WGMMA.reduce(1)

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WG_STRIDED((16, 128), vec_size=4), *([row] * 4 if groups else [])),
        return_type=plgpu.ShapeDtypeStruct(shape, jnp.bfloat16, layout=plgpu.Layout.WGMMA),
    )
    def upcast(ctx, w, *sc):
        del ctx
        i16 = ir.IntegerType.get_signless(16)
        bf16x2 = ir.VectorType.get((2,), ir.BF16Type.get())
        rowregs = [
            [bf16_pair(mu.bitcast(a.registers[0, 0, h, 0, 0], i16)) for h in range(2)] for a in sc
        ]
        regs = np.empty(fa.WGMMA_LAYOUT.registers_shape(shape), dtype=object)
        c136 = arith.constant(ir.IntegerType.get_signless(32), 0x43084308)  # (two bf16 136)
        for qi, i in enumerate(quads):
            for v in range(4):
                word = vector.extract(w.registers[i], [], [v])
                kb = 4 * i + v  # (k16 block: group kb // 8)
                for j in range(4):
                    bb, h = divmod(j, 2)
                    if groups:  # (c and s of the pair's row and group)
                        g = kb // 8
                        pair = decode_pair(word, j, rowregs[2 * g + 1][h], rowregs[2 * g][h])
                    else:
                        pair = decode_pair(word, j, c136 if sub else None)
                    col_block = 2 * (4 * qi + v) + bb  # (of the result)
                    regs[0, col_block, 0, 0, h, 0, 0, 0, 0] = mu.bitcast(pair, bf16x2)
        return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return upcast(words, *(groups or ()))


def mgpu_int4_packed_gemv(
    w_packed, x_TxK, s_GxN=None, c_GxN=None, *, tile_k=512, steps=3, wgs=2, sub=True,
    mma_k=PART, num_sms=None, profile_dir="",
):  # fmt: skip
    """``y^T [N, T] = W [N, K] (int4) @ x^T`` for W packed by :func:`pack_wgmma_int4` and x
    tokens-major ``[T, K]``: ``probe_mgpu_int4.mgpu_int4_gemv``'s structure (one CTA per 64
    rows over all of K, TMA stages of ``tile_k`` columns, ``wgs`` consumer groups each taking
    its ``tile_k / wgs`` columns of every stage) with the upcast of :func:`upcast_words`.
    ``sub=False`` skips the subtraction of 136 (y is then off by ``136 Σx``: for timing the
    upcast without it). ``s_GxN`` / ``c_GxN``: g128 scales and ``128 + z`` (bf16 ``[K / 128,
    N]``, group-major as ``mgpu_int4_g128_gemv``'s), dequantized in registers
    (:func:`upcast_words`'s ``groups``): ``W = s * (u - z)`` for the packed codes ``u``.
    ``mma_k``: K columns per ``wgmma`` (256: a block at once; 64 or 128: upcast and issued in
    chunks of whole quads, so one chunk's upcast can overlap the previous chunk's MMA)."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from probe_mgpu_int4 import (
        GROUP,
        _finish,
        _launch,
        _over_tiles,
        _pipeline,
        _scope,
        _tokens,
        _transforms,
        _writer,
        _y_type,
    )

    nt, kp, *block = w_packed.shape
    if block != [16, 128] or w_packed.dtype != jnp.int32:
        raise ValueError(f"w_packed must be int32 [N / 64, K / 256, 16, 128], got {w_packed.shape}")
    n, k = nt * ROWS, kp * PART
    t = _tokens(x_TxK, k, True)
    parts = tile_k // PART  # packed blocks per stage
    if tile_k % (PART * wgs) or k % tile_k or wgs not in (1, 2):
        raise ValueError(
            f"tile_k {tile_k} must divide K {k} and be a multiple of {PART} x wgs ({wgs}; 1 or 2)"
        )
    if mma_k not in (64, 128, 256):
        raise ValueError(f"mma_k must be 64, 128 or 256, got {mma_k}")
    scaled = s_GxN is not None
    if scaled != (c_GxN is not None):
        raise ValueError("scales and zero offsets (c = 128 + z) go together")
    for name, a in (("scales", s_GxN), ("zero offsets", c_GxN)):
        if a is not None and a.shape != (k // GROUP, n):
            raise ValueError(f"{name} must be [K / {GROUP}, N] = {(k // GROUP, n)}, got {a.shape}")
    per_group = plgpu.BlockSpec(
        (tile_k // GROUP, ROWS), lambda kk: (kk, 0), memory_space=plgpu.SMEM
    )
    get_pipeline = _pipeline(
        [
            plgpu.BlockSpec((parts, 16, 128), lambda kk: (kk, 0, 0), memory_space=plgpu.SMEM),
            *([per_group, per_group] if scaled else []),
            plgpu.BlockSpec(
                (t, tile_k), lambda kk: (0, kk), transforms=_transforms(tile_k * 16, 16, "rhs"),
                memory_space=plgpu.SMEM,
            ),
        ],
        k_iters=k // tile_k, wgs=wgs, steps=steps,
    )  # fmt: skip
    words_layout = plgpu.Layout.WG_STRIDED((16, 128), vec_size=4)
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def kernel(*refs, out_smem, red_smem, red_bar):
        *gmem, out_gmem = refs

        def tile(mi, rows, allocs):
            def ctx(eval_pipeline):
                @functools.partial(pl.run_scoped, acc=plgpu.ACC((ROWS, t), jnp.float32))
                def _acc(acc):
                    eval_pipeline(acc)
                    wg = lax.axis_index("wg")
                    write = _writer(out_smem, _y_type(t)[0])
                    with _scope("finish"):
                        _finish(
                            lambda: acc[...], lambda y: write(y, 0, out_gmem.at[rows]), wg,
                            wgs=wgs, red_smem=red_smem, red_bar=red_bar,
                        )  # fmt: skip

            def body(_, a_smem, *rest):
                *sc_smem, b_smem, acc = rest  # (scales and zero offsets when scaled)
                wg = lax.axis_index("wg")
                for g in range(wgs):

                    @pl.when(wg == g)
                    def _mma(g=g):
                        for p in range(g * parts // wgs, (g + 1) * parts // wgs):
                            with _scope("upcast"):
                                words = plgpu.load(a_smem.at[p], (), layout=words_layout)
                                groups = None
                                if scaled:  # (the block's 2 groups: s, c of each)
                                    groups = [
                                        plgpu.load(r.at[2 * p + e], (), layout=row_layout)
                                        for e in range(2)
                                        for r in sc_smem
                                    ]
                            nq = mma_k // 64  # quads per wgmma
                            for q0 in range(0, 4, nq):
                                with _scope("upcast"):
                                    quads = tuple(range(q0, q0 + nq))
                                    a = upcast_words(words, sub=sub, groups=groups, quads=quads)
                                cols = pl.ds(p * PART + 64 * q0, mma_k)
                                b = b_smem.at[:, cols].transpose((1, 0))
                                with _scope("mma"):
                                    plgpu.wgmma(acc, a, b)

                with _scope("wait"):
                    plgpu.wgmma_wait(0)
                return acc

            per_rows = [a.at[:, rows] for a in gmem[1:-1]]  # (scales, zero offsets)
            get_pipeline(body, ctx)(gmem[0].at[mi], *per_rows, gmem[-1], allocations=allocs)

        _over_tiles(get_pipeline, gmem, m_iters=nt, cta_m=ROWS, tile=tile)

    args = (w_packed, *((s_GxN, c_GxN) if scaled else ()), x_TxK)
    return _launch(
        kernel, args, n=n, t=t, tile_m=ROWS, m_iters=nt, wgs=wgs, out_slots=wgs,
        num_sms=num_sms, profile_dir=profile_dir,
    )  # fmt: skip
