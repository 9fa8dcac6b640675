"""Pallas kernel (Mosaic GPU lowering, Hopper only): int4 g128 decode ``y = x @ W`` for at most
16 rows of x, on :class:`~shrinkjax.kernels.int4_tc.TcInt4` weights as they are (no second
packing). :func:`shrinkjax.kernels.int4_tc.int4_tc_matmul` routes decode calls here where
:func:`usable` says so; elsewhere the Triton kernel runs.

* **One CTA per 64 weight rows over all of K, no K split**: 8192 rows are 128 CTAs on 132 SMs,
  so no second kernel sums partials (the Triton kernel's split-K sum costs 1.3-2.2 µs per
  call). A producer warpgroup streams the stages through TMA (``tile_k`` K rows of words,
  scales and zeros, and x; 3 in flight); two consumer warpgroups each take half of a stage's
  128-row chunks (:mod:`shrinkjax.kernels.mgpu_pipeline`), and their sums are added at the end.
* **Each thread reads its own words**: :class:`TcInt4` keeps, per weight row and 128 K rows, 16
  words in which ``(w >> 4 (j % 4)) & 0x000F000F`` is the bf16x2 pair ``(16 j + 2 u, + 1)`` of
  word ``2 u + j // 4``. That is one register of the ``wgmma`` A fragment (``WGMMA_LAYOUT``):
  the thread of lane ``l`` and warp ``w`` holds rows ``r = 16 w + l // 4`` and ``r + 8`` at
  columns ``16 j + 8 bb + 2 (l % 4)`` and the next, i.e. pair ``u = 4 bb + l % 4``. So a
  thread loads words ``2 u, 2 u + 1`` (one 64-bit load each for ``bb = 0, 1`` and both rows:
  4 loads per 128 K rows) and decodes each bf16 pair with a shift, a ``lop3`` (``128 + q``), a
  ``sub.bf16x2`` of ``128 + z`` (exact) and a ``mul.rn.bf16x2`` by the scale: the dequantized
  weight rounded to bf16 once, as :func:`~.int4_tc.dequantize_tc_ref` rounds it (the product
  of a small integer and a bf16 scale is exact before that rounding). Mosaic
  GPU's own int4 load reads one byte per instruction and costs 5 per pair (fourteenth
  session's PTX); this decode made the probe's g128 kernel 1.2x faster.
* **x is read in place**: its TMA box is 8 or 16 token rows (the ``wgmma`` N) over x's ``M``;
  the rows past ``M`` and the columns past ``K`` are filled with zeros by the copy, and only
  ``y``'s first ``M`` rows are written (bf16, ``[M, 64]`` per tile through shared memory).
  Mosaic GPU tiles x's rows by 8, so 9-15 rows are padded to 16 first (one small XLA op).

H100, 8192², g128 with zero points (``benchmarks/RESULTS.md``, fourteenth session):
``benchmarks/kernels.py`` 15.23 / 15.26 / 15.37 / 15.75 µs at M = 1 / 4 / 8 / 16, 0.77 / 0.77
/ 0.77 / 0.75 of the copy bandwidth measured in the same run (3.00 TB/s), 3.85 / 3.88 / 3.84
/ 3.77x PyTorch's cuBLAS bf16; the Triton kernel took 16.49 / 17.16 / 17.89 / 19.48 µs in
another call (``scripts/probe_call_kernels.py``, both paths in that call). It runs only where
its tiles are one full wave (:func:`usable`, ``MIN_WAVE_FILL``): with no K split, fewer tiles
leave SMs idle, and more waves restart the pipeline per tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from shrinkjax.kernels import driver as D
from shrinkjax.kernels import mgpu_pipeline as MP

MAX_M = 16  # rows of x: the wgmma's N side is 8 (M <= 8) or 16
GROUP = 128  # K rows per scale: one 128-row chunk of TcInt4 words
ROWS = 64  # weight rows per CTA tile (the wgmma's M)
STEPS = 3  # TMA stages in flight
# The Mosaic kernel runs where its 64-row CTA tiles are one wave filling at least this share of
# the SMs (wave_fill): 8192 rows are 128 tiles on 132 SMs (0.97). H100, fourteenth session,
# against the Triton kernel in the same calls: 4096² (64 tiles, 0.48) M = 1 / 16 8.57 / 8.90
# against 7.03 / 9.21 µs; 4096 x 14336 (224 tiles, 2 waves, 0.85) 19.24 / 19.70 against 15.16
# / 18.06. Several waves lose even when full: each tile restarts the TMA pipeline (its first
# stage's ~2 µs wait), so the 8B decode's int4 lm_head (128256 rows, 16 waves, 0.95) made the
# batch-1 decode 1% slower (445.6 against 450.7 tok/s), and every linear on it 22% slower.
MIN_WAVE_FILL = 0.9
# Several waves with the tiles' pipelines chained (mgpu_pipeline.over_tiles(chained=True):
# a CTA's next tile loads while its last stages are computed; each CTA takes >= 2 tiles).
# Written after the fourteenth session's device time ran out: it lowers, its GPU test is
# ready, but it has not run, so it is off (usable() then keeps several waves on Triton).
CHAIN_TILES = False


def _mosaic_gpu():
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:  # pragma: no cover - jax without Mosaic GPU
        return None
    return plgpu if hasattr(plgpu, "emit_pipeline_warp_specialized") else None


@functools.cache
def on_hopper() -> bool:
    """True on an sm_90 GPU with a jax that has Mosaic GPU's warp-specialized pipeline."""
    if jax.default_backend() != "gpu" or _mosaic_gpu() is None:
        return False
    cap = getattr(jax.devices()[0], "compute_capability", "")
    return str(cap).startswith("9")


def wave_fill(n_padded: int, num_sms: int) -> tuple[int, float]:
    """(waves, the share of the SMs' tile slots filled) for the 64-row CTA tiles of ``n_padded``
    rows: ``tiles / (waves * num_sms)``. With no K split, a CTA streams a tile's whole K, so a
    partly filled last wave (or fewer tiles than SMs) leaves SMs without bytes to stream."""
    tiles = n_padded // ROWS
    waves = -(-tiles // num_sms)
    return waves, tiles / (waves * num_sms)


def usable(t, m: int) -> bool:
    """True when :func:`int4_mgpu_matmul` takes ``m`` rows of x against ``t`` here: Hopper,
    ``m <= MAX_M``, a scale per 128 K rows, tiles of whole 64-row CTAs, ``K % 8 == 0`` (x's
    rows must start 16-byte aligned for its TMA copies) and tiles that are one wave filling at
    least ``MIN_WAVE_FILL`` of the SMs (:func:`wave_fill`; elsewhere the Triton kernel's K
    split keeps every SM streaming)."""
    if not (0 < m <= MAX_M and t.group == GROUP and t.block_n % ROWS == 0 and t.k % 8 == 0):
        return False
    if not on_hopper():
        return False
    waves, fill = wave_fill(t.np_, D._num_sms())
    if waves == 1:
        return fill >= MIN_WAVE_FILL
    return CHAIN_TILES and chain_steps(t.kw) is not None


def chain_steps(kw: int) -> int | None:
    """TMA stages in flight for chained tiles (:data:`CHAIN_TILES`): 4 or 2, whichever divides
    the tile's K stages (Pallas' pipeline of pipelines needs that), else None."""
    k_iters = kw // tile_k_for(kw)[0]
    return next((s for s in (4, 2) if k_iters % s == 0), None)


def tile_k_for(kw: int) -> tuple[int, int]:
    """(K rows per stage, consumer warpgroups) for ``kw`` padded K rows: 512 with 2 groups
    where it divides (the probe's best), else 256 with 2, else 128 with 1."""
    for tile_k, wgs in ((512, 2), (256, 2), (128, 1)):
        if kw % tile_k == 0:
            return tile_k, wgs
    raise ValueError(f"padded K {kw} must be a multiple of {GROUP}")


def _c_pair(z16):
    """b32 ``(128 + z, 128 + z)`` as bf16x2 from a zero point ``z`` (0..15) in a b16 register:
    ``0x4300 | z`` is bf16 ``128 + z``."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    i32 = ir.IntegerType.get_signless(32)
    asm = (
        "{\n.reg .b32 t;\ncvt.u32.u16 t, $1;\nprmt.b32 t, t, t, 0x1010;\n"
        "or.b32 $0, t, 0x43004300;\n}"
    )
    return llvm.inline_asm(i32, [z16], asm, "=r,h")


def bf16_pair(s16):
    """b32 ``(s, s)`` from a bf16 scale in a b16 register."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    return llvm.inline_asm(ir.IntegerType.get_signless(32), [s16], "mov.b32 $0, {$1, $1};", "=r,h")


def _fragment_position():
    """(r, c) of this thread in a ``WGMMA_LAYOUT`` fragment, as i32 values: it holds rows ``r``
    and ``r + 8`` (``r = 16 warp + lane // 4`` within its warpgroup) and columns ``2 c, 2 c + 1``
    of each 8 (``c = lane % 4``)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import utils as mu

    i32 = ir.IntegerType.get_signless(32)
    tid = arith.remui(mu.thread_idx(), arith.constant(i32, 128))  # (within the warpgroup)
    lane = arith.remui(tid, arith.constant(i32, 32))
    warp = arith.divui(tid, arith.constant(i32, 32))
    r = arith.addi(
        arith.muli(warp, arith.constant(i32, 16)), arith.divui(lane, arith.constant(i32, 4))
    )
    return r, arith.remui(lane, arith.constant(i32, 4))


def decode_pair(word, j, c_pair=None, s_pair=None):
    """One bf16x2 register from nibbles ``j`` and ``j + 4`` of a 32-bit ``word`` (inline PTX):
    ``shr`` by ``4 j`` (none for ``j = 0``) and ``lop3`` give ``(128 + q0, 128 + q1)`` exactly;
    with ``c_pair`` (b32 ``(c, c)``) a ``sub.bf16x2`` takes ``c`` off (exact for ``c = 128 +
    z``), with ``s_pair`` (b32 ``(s, s)``) a ``mul.rn.bf16x2`` scales (one rounding). Returns an
    i32 value; ``c_pair`` / ``s_pair``: i32 values (:func:`_c_pair`, :func:`bf16_pair`)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    args = [word]
    ops = [f"shr.u32 a, $1, {4 * j}" if j else "mov.b32 a, $1"]
    ops.append("lop3.b32 a, a, 0x000F000F, 0x43004300, 0xea")
    for op, pair in (("sub.bf16x2", c_pair), ("mul.rn.bf16x2", s_pair)):
        if pair is not None:
            args.append(pair)
            ops.append(f"{op} a, a, ${len(args)}")
    ops[-1] = ops[-1].replace(" a, a", " $0, a", 1)  # (the last one writes the result)
    asm = "{\n.reg .b32 a;\n" + ";\n".join(ops) + ";\n}"
    return llvm.inline_asm(ir.IntegerType.get_signless(32), args, asm, "=r" + ",r" * len(args))


def decode_chunk(words_smem, chunk, s_row, z_row):
    """A 128-row chunk of a stage's words (smem ``[chunks, 64, 16]`` uint32, :class:`TcInt4`
    order) -> two bf16 ``[64, 64]`` A operands in ``WGMMA_LAYOUT`` (K rows ``0-63`` and
    ``64-127`` of the chunk), dequantized ``(q - z) * s`` with the chunk's scales ``s_row``
    (bf16 ``[64]``) and zero points ``z_row`` (uint8 ``[64]``; None: symmetric, 8), both in
    ``plgpu.Layout.WGMMA.reduce(1)`` (a thread holds rows ``r`` and ``r + 8``)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu

    plgpu = _mosaic_gpu()
    row = plgpu.Layout.WGMMA.reduce(1)
    half = plgpu.ShapeDtypeStruct((ROWS, 64), jnp.bfloat16, layout=plgpu.Layout.WGMMA)
    sym = z_row is None

    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(), row, *([] if sym else [row])), return_type=(half, half)
    )
    def decode(ctx, words, s, *z):
        del ctx
        i32, i16 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(16)
        index = ir.IndexType.get()
        bf16x2 = ir.VectorType.get((2,), ir.BF16Type.get())

        def c(v, ty=index):
            return arith.constant(ty, v)

        r, u = _fragment_position()
        s_pairs = [bf16_pair(mu.bitcast(s.registers[0, 0, h, 0, 0], i16)) for h in range(2)]
        if sym:
            c_pairs = [c(0x43084308, i32)] * 2  # (128 + 8)
        else:
            zr = [
                mu.bitcast(z[0].registers[0, 0, h, 0, 0], ir.IntegerType.get_signless(8))
                for h in range(2)
            ]
            c_pairs = [_c_pair(arith.extui(i16, v)) for v in zr]
        # words 2 u', 2 u' + 1 (u' = u + 4 bb) of rows r, r + 8: [h][bb] -> vector<2 x i32>
        vec2 = ir.VectorType.get((2,), i32)
        loaded = [
            [
                vector.load(
                    vec2,
                    words,
                    [
                        c(chunk),
                        arith.index_cast(index, arith.addi(r, c(8 * h, i32))),
                        arith.index_cast(
                            index, arith.muli(arith.addi(u, c(4 * bb, i32)), c(2, i32))
                        ),
                    ],
                )
                for bb in range(2)
            ]
            for h in range(2)
        ]
        out = []
        for e in range(2):  # K rows 64 e .. 64 e + 63 of the chunk: slabs j = 4 e .. 4 e + 3
            regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((ROWS, 64)), dtype=object)
            for h in range(2):
                for bb in range(2):
                    word = vector.extract(loaded[h][bb], [], [e])
                    for jj in range(4):
                        pair = decode_pair(word, jj, c_pairs[h], s_pairs[h])
                        regs[0, 2 * jj + bb, 0, 0, h, 0, 0, 0, 0] = mu.bitcast(pair, bf16x2)
            out.append(
                mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)
            )
        return tuple(out)

    return decode(words_smem, s_row, *([] if sym else [z_row]))


def store_rows(y, out_smem, m):
    """y^T ``[64, T]`` f32 (``WGMMA_LAYOUT``, the accumulator) -> ``out_smem[:m]`` as bf16
    ``[m, 64]`` (y's first ``m`` token rows; one scalar store per value a thread holds)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, vector
    from jax.experimental.mosaic.gpu import utils as mu

    plgpu = _mosaic_gpu()

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
    def store(ctx, acc, ref):
        del ctx
        i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
        bf16 = ir.BF16Type.get()

        def c(v, ty=i32):
            return arith.constant(ty, v)

        r, pair = _fragment_position()
        col = arith.muli(pair, c(2))
        for b in range(acc.registers.shape[1]):
            for h in range(2):
                reg = acc.registers[0, b, 0, 0, h, 0, 0, 0, 0]
                n = arith.index_cast(index, arith.addi(r, c(8 * h)))
                for e in range(2):
                    t = arith.addi(col, c(8 * b + e))
                    with mu.when(arith.cmpi(arith.CmpIPredicate.ult, t, c(m))):
                        v = arith.truncf(bf16, vector.extract(reg, [], [e]))
                        memref.store(v, ref, [arith.index_cast(index, t), n])

    store(y, out_smem)


def int4_mgpu_matmul(x2, t, *, steps=None, chain=None, profile_dir=""):
    """``x2 [M, K] @ W`` for a :class:`~shrinkjax.kernels.int4_tc.TcInt4` weight ``t`` with a
    scale per 128 K rows, ``M <= 16``; bf16 ``[M, N]`` (``x2`` is cast to bf16). Needs Hopper
    (:func:`usable`); ``profile_dir``: Mosaic GPU's on-device profile of each call there.
    ``chain``: the tiles' pipelines chained (:data:`CHAIN_TILES`; None: where there are
    several waves and ``CHAIN_TILES``); the grid then gives every CTA at least 2 tiles.
    ``steps``: TMA stages in flight (None: ``STEPS``, or :func:`chain_steps` chained)."""
    plgpu = _mosaic_gpu()
    from jax import lax
    from jax.experimental import pallas as pl

    m, k = x2.shape
    if not 0 < m <= MAX_M or k != t.k:
        raise ValueError(f"x must be [M <= {MAX_M}, K = {t.k}], got {x2.shape}")
    if t.group != GROUP or t.block_n % ROWS:
        raise ValueError(
            f"needs group {GROUP} and block_n a multiple of {ROWS}, got {t.group}, {t.block_n}"
        )
    tn = 8 if m <= 8 else 16  # tokens: the wgmma's N
    nt, chunks, bn, _ = t.words.shape
    halves = bn // ROWS  # CTA tiles per packed tile
    tile_k, wgs = tile_k_for(t.kw)
    cps = tile_k // GROUP  # chunks (scale groups) per stage
    tiles, num_sms = nt * halves, D._num_sms()
    if chain is None:
        chain = CHAIN_TILES and wave_fill(t.np_, num_sms)[0] > 1
    if chain and (tiles < 2 or chain_steps(t.kw) is None):
        raise ValueError(
            f"chained tiles need >= 2 tiles and K stages ({t.kw // tile_k}) divisible by 2 or"
            f" 4, got {tiles} tiles"
        )
    steps = steps or (chain_steps(t.kw) if chain else STEPS)
    s3 = t.scales.reshape(nt, chunks, bn)  # (drops the unit dim: no copy)
    z3 = None if t.zeros is None else t.zeros.reshape(nt, chunks, bn)
    per_group = plgpu.BlockSpec((cps, ROWS), lambda kk: (kk, 0), memory_space=plgpu.SMEM)
    get_pipeline = MP.warp_specialized(
        [
            plgpu.BlockSpec((cps, ROWS, 16), lambda kk: (kk, 0, 0), memory_space=plgpu.SMEM),
            *([per_group] * (1 if z3 is None else 2)),
            plgpu.BlockSpec(
                (tn, tile_k), lambda kk: (0, kk), memory_space=plgpu.SMEM,
                transforms=MP.smem_transforms(tile_k * 16, 16, "rhs"),
            ),
        ],
        k_iters=chunks // cps, wgs=wgs, steps=steps,
    )  # fmt: skip
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def kernel(*refs, out_smem, red_smem, red_bar):
        *gmem, out_gmem = refs

        def tile(mi, rows, allocs, state=None):
            i, part = mi // halves, lax.rem(mi, halves)
            sub = pl.ds(part * ROWS, ROWS)

            def ctx(eval_pipeline):
                @functools.partial(pl.run_scoped, acc=plgpu.ACC((ROWS, tn), jnp.float32))
                def _acc(acc):
                    eval_pipeline(acc)
                    wg = lax.axis_index("wg")

                    def write(y):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # (the last tile's)
                        store_rows(y, out_smem, m)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[:, rows])

                    with MP.scope("finish"):
                        MP.finish_groups(
                            lambda: acc[...], write, wg, wgs=wgs, red_smem=red_smem,
                            red_bar=red_bar,
                        )  # fmt: skip

            def body(_, w_smem, s_smem, *rest):
                *z_smem, x_smem, acc = rest
                wg = lax.axis_index("wg")
                for g in range(wgs):

                    @pl.when(wg == g)
                    def _mma(g=g):
                        for ch in range(g * cps // wgs, (g + 1) * cps // wgs):
                            with MP.scope("decode"):
                                s = plgpu.load(s_smem.at[ch], (), layout=row_layout)
                                z = [plgpu.load(r.at[ch], (), layout=row_layout) for r in z_smem]
                                operands = decode_chunk(w_smem, ch, s, z[0] if z else None)
                            for e, a in enumerate(operands):
                                cols = pl.ds(ch * GROUP + 64 * e, 64)
                                with MP.scope("mma"):
                                    plgpu.wgmma(acc, a, x_smem.at[:, cols].transpose((1, 0)))

                with MP.scope("wait"):
                    plgpu.wgmma_wait(0)
                return acc

            w_tile = gmem[0].at[i].at[:, sub]  # [chunks, 64, 16]
            groups = [a.at[i].at[:, sub] for a in gmem[1:-1]]  # [chunks, 64] each
            get_pipeline(body, ctx, state)(w_tile, *groups, gmem[-1], allocations=allocs)

        MP.over_tiles(get_pipeline, gmem, m_iters=tiles, cta_m=ROWS, tile=tile, chained=chain)

    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, t.n), jnp.bfloat16),
        grid=(min(num_sms, tiles // 2 if chain else tiles),),
        grid_names=("sm",),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=MP.compiler_params(profile_dir),
        scratch_types=dict(
            out_smem=plgpu.SMEM((m, ROWS), jnp.bfloat16),
            red_smem=plgpu.SMEM(
                (max(wgs - 1, 1), ROWS, tn), jnp.float32,
                transforms=MP.smem_transforms(tn * 32, 32, "out"),
            ),
            red_bar=plgpu.Barrier(num_arrivals=wgs),
        ),
    )  # fmt: skip
    xb = x2.astype(jnp.bfloat16)
    if 8 < m < tn:  # (x's TMA tiles rows by 8: 9-15 rows are padded to 16 by XLA)
        xb = jnp.pad(xb, ((0, tn - m), (0, 0)))
    args = (t.words, s3, *([] if z3 is None else [z3]), xb)
    return f(*args)
