"""Pallas kernel (Triton lowering): int4 group-quantized ``y = x @ W`` for decode (M <= 128),
with the weight as the tensor-core *left* operand and the decode in packed bf16x2 registers.
The default int4 kernel on GPU (:func:`shrinkjax.kernels.convert.to_kernel_layout`); larger M runs
:func:`dequantize_tc` (Pallas, bit-exact) + cuBLAS.

* **Swapped operands** (as Marlin/Machete-style decode kernels do): a program computes
  ``acc[n, m] = sum_k W[k, n] x[m, k]`` as chained ``[bn, 16] @ [16, mp]`` MMAs, so the decoded
  weight is the MMA's left operand, fed from registers (no shared-memory round trip), and the
  few tokens are its 8-128 wide right side (:func:`.driver.mma_tokens`). x is read in place
  (rows >= M masked).
* **Two weights per instruction**: one ``lop3.b32`` turns two 4-bit codes into a bf16x2 register
  ``(128 + q0, 128 + q1)`` by OR-ing them into the mantissa of ``128.0`` (``0x4300``), exactly;
  one ``shr`` serves four codes. No int->float conversion, no subtraction per weight: the dot
  takes ``128 + q`` and the zero point and scale are applied once per group to the f32
  ``[bn, mp]`` result, ``s * sum_k x (128 + q) - (128 + z) s * sum_k x``, with ``sum_k x`` per
  group from a small XLA reduction (``xsum="xla"``, which a model's XLA fuses into x's
  producer), from the kernel itself (``"sum"``) where no XLA fusion produces x
  (:func:`shrinkjax.kernels.dispatch.opaque_input`), or from one more tensor-core dot against a
  ones tile (``"mma"``, at 9-32 rows); ``"none"`` subtracts the zero point in the decode
  instead (slower).
* **Scales prefetched**: Triton pipelines only tensor-core operands (``cp.async``); the scale and
  zero loads are issued one chunk ahead by hand, and their values converted at the top of the
  next step before its own loads issue (otherwise ptxas waits for the new loads; ncu).
  **Chained dots** through :func:`shrinkjax.kernels.triton_ext.dot_acc` (``tt.dot(a, b, acc)``:
  no FADD per dot).

Measured (one H100, device time, ``benchmarks/RESULTS.md``, tenth and eleventh sessions):
8192 x 8192 g128 at M = 1 in 16.6 µs (0.71 of the copy bandwidth; the kernel alone 15.6 µs,
0.75, the rest is XLA's split-K sum), at M = 16 in 19.4 µs, 4096 x 4096 at M = 1 in 7.0 µs,
against 27.5 / 79.7 / 11.6 µs for ``torch._weight_int4pack_mm`` (faster at every M measured);
Llama-3-8B-shaped W4 decode 2.64x bf16 at batch 1 and 2.15x at batch 16 (every linear and the
lm_head in int4). Since the fourteenth session, calls of at most 16 rows whose 64-row tiles make
one full wave of CTAs (8192 rows on 132 SMs) run :mod:`shrinkjax.kernels.int4_mgpu` (Mosaic GPU,
no K split: 15.2 µs at 8192², M = 1) where Hopper allows (``backend``, ``MGPU_DECODE``).
For M <= ``FEW_TOKENS`` a program runs 64 of a tile's 128 rows with 2 warps
(``mma.sync``; module constants below); up to ``MID_TOKENS`` whole tiles with 2 warps and the
tensor core's ``sum_k x``; above, whole tiles with 4 (``wgmma``).

Layout (:class:`TcInt4`, built once per weight by :func:`pack_tc`, jit-able; the tile
``block_n`` is fixed at packing, a program runs all of a tile or a 64-row multiple of it).
``words`` is uint32 ``[Np/bn, Kw/128, bn, 16]`` (``Kw`` = K padded to 128): tile ``i`` of ``bn``
weight rows (output columns), K chunk ``t`` of 128 rows is one contiguous ``bn * 64``-byte
block (a 64-row program reads its contiguous half), so each loop step of a program reads one
contiguous stream.
Within a chunk, K offset ``16 j + 2 u + b`` (slab ``j`` of 8, pair ``u`` of 8, ``b`` in {0, 1}) of
weight row ``n`` is word ``2 u + e`` of row ``n`` with ``e = j // 4``, nibble ``(j % 4) + 4 b``
(bits ``4 (j % 4) + 16 b``). So for the word pair ``(2u, 2u+1)`` one decode instance holds,
``(w >> 4 (j % 4)) & 0x000F000F`` of word ``2u + j // 4`` is the bf16x2 pair of K offsets
``(16 j + 2 u, 16 j + 2 u + 1)``: slab ``j``'s ``[bn, 16]`` operand comes out in order.
``scales`` (bf16) and ``zeros`` (uint8; None: symmetric, 8) are ``[Np/bn, Gw, bn, 1]``, as
:class:`~shrinkjax.kernels.layouts.PackedInt` stores them (scale 0 beyond K / N).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from shrinkjax.kernels import dispatch, int4_mgpu
from shrinkjax.kernels import driver as D
from shrinkjax.kernels.layouts import PackedInt, round_up
from shrinkjax.kernels.reference import _unpack_split_half
from shrinkjax.kernels.split_k import split_k_call
from shrinkjax.kernels.triton_ext import dot_acc

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old jax
    plgpu = None

CHUNK = 128  # K rows per loop step (16 words of 8 nibbles per weight row)
SLAB = 16  # K rows per MMA (bf16 k-step)
DEFAULT_BLOCK_N = 128  # packing tile: programs run it whole or in 64-row halves (rows)
# Up to FEW_TOKENS rows of x (decode at batch <= 8): 64-row programs, about 4 per SM, and 2
# warps, for which Triton emits mma.sync (HMMA) instead of Hopper's wgmma (4 warps per
# warpgroup), which here waits and fences (MEMBAR + fence.proxy.async) after every K=16 dot:
# ~1.7x fewer SASS instructions per weight (scripts/triton_sass.py int4_tc --warps 2). H100:
# 5-9% faster kernels, 8B decode at batch 1 +5%; at batch 16 wgmma stayed faster in the model.
# Batches 5-8 joined in the ninth session, with the 8-wide mma.sync tile (driver.mma_tokens):
# 8B decode at batch 8 3276 against 3044 tok/s (wgmma), 8192² at M = 8 19.2-19.6 against 20.6 µs.
FEW_TOKENS, FEW_TOKENS_ROWS, FEW_TOKENS_WARPS = 8, 64, 2
DEFAULT_XSUM = "xla"  # int4_tc_matmul's default xsum mode (benchmarks/decode.py --int4-xsum)
# ... and inside dispatch.opaque_input() (x from a kernel XLA cannot fuse the reduction into)
# for M <= FEW_TOKENS: in-kernel, which saves XLA's reduction kernel (H100, M = 1: 4096² 7.2
# against 8.7 µs; 8B decode +1.5%, o_proj only). Not elsewhere: a model's XLA fuses the
# reduction into x's producer for free, and at M >= 16 (wgmma) the in-kernel sum was slower.
OPAQUE_XSUM = "sum"
# Above FEW_TOKENS, up to MID_TOKENS rows (batch 9-32): 2 warps (mma.sync) on whole 128-row
# tiles, with sum_k x from the tensor core (xsum "mma": one more K=16 dot per slab against a
# ones tile; its row blocks are the same dot, which ptxas issues once) instead of XLA's
# reduction. H100, eleventh session, same calls: 8192² / 4096 x 14336 at M = 16 standalone 19.4
# / 17.9 against 22.4 / 21.7 µs (4 warps, wgmma, XLA's sums; scripts/probe_call_kernels.py),
# 8192² at M = 32 27.4 against 33.9 µs, M = 64 106 against 47.6 (so not there); 8B decode at
# batch 16 5870 / 5914 against 5591 tok/s and at batch 32 8759 against 8058 / 8004, where XLA's
# sums fuse into x's producer: the kernel itself is faster (M = 16: 17.8 against 19.1 µs).
MID_TOKENS = 32
MAX_M = 128  # tokens per call: the MMA's N side (8 to 128 wide, driver.mma_tokens)
# Decode calls of up to int4_mgpu.MAX_M (16) rows on Hopper run the Mosaic GPU kernel
# (shrinkjax.kernels.int4_mgpu: one CTA per 64 rows over all of K, no split-K sum) instead.
MGPU_DECODE = True
_BF16_128 = 0x43004300  # two bf16 128.0
_BF16_NEG136 = 0xC308C308  # two bf16 -136.0 (-(128 + 8): the symmetric zero point)
_BF16_ONE = 0x3F803F80  # two bf16 1.0
XSUM_MODES = ("none", "xla", "sum", "mma")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["words", "scales", "zeros"],
    meta_fields=["k", "n", "group", "block_n"],
)
@dataclasses.dataclass(frozen=True)
class TcInt4(D.TcLayout):
    """int4 weight in :mod:`int4_tc`'s layout (module docstring)."""

    STREAM, STEP_ROWS = "words", CHUNK  # (driver.TcLayout: kw, np_)

    words: jax.Array  # uint32 [Np/bn, Kw/128, bn, 16]
    scales: jax.Array  # bf16 [Np/bn, Gw, bn, 1]
    zeros: jax.Array | None  # uint8 [Np/bn, Gw, bn, 1]; None = symmetric (8)
    k: int
    n: int
    group: int
    block_n: int  # weight rows (output columns) per packed tile; a program runs all or part


def supports(p: PackedInt) -> bool:
    """True when :func:`pack_tc` takes ``p`` (4-bit; group divides 128 or is a multiple of it)."""
    if not isinstance(p, PackedInt):
        return False
    g = p.group
    return p.bits == 4 and g % SLAB == 0 and (CHUNK % g == 0 or g % CHUNK == 0)


@functools.partial(jax.jit, static_argnames=("block_n",))
def pack_tc(p: PackedInt, block_n: int | None = None) -> TcInt4:
    """One-time conversion of an int4 :class:`PackedInt` to :class:`TcInt4` (pure XLA);
    ``block_n`` None: ``DEFAULT_BLOCK_N`` (read at call time)."""
    block_n = DEFAULT_BLOCK_N if block_n is None else block_n
    if not isinstance(p, PackedInt):
        raise TypeError(f"pack_tc converts a PackedInt, got {type(p).__name__}")
    if p.np_ % block_n or block_n % 64:
        raise ValueError(f"block_n {block_n} must be a multiple of 64 dividing Np={p.np_}")
    if not supports(p):
        raise ValueError(
            f"int4_tc needs bits=4 and a group size that divides {CHUNK} or is a multiple of "
            f"it (and of {SLAB}); got bits={p.bits}, group={p.group}"
        )
    codes = _unpack_split_half(p.qweight, p.pair).astype(jnp.uint32)  # [Kp, Np]
    kp, np_ = codes.shape
    kw = round_up(kp, CHUNK)
    gw = kw // p.group  # kp is a multiple of a group > CHUNK already
    pad_g = ((0, gw - p.scales.shape[0]), (0, 0))  # padded K rows: scale 0 -> no effect
    s = jnp.pad(p.scales, pad_g)
    z = None if p.zeros is None else jnp.pad(p.zeros, pad_g)
    q = jnp.pad(codes, ((0, kw - kp), (0, 0))).T  # [Np, Kw]
    q = q.reshape(np_, kw // CHUNK, 2, 4, 8, 2)  # [n, t, e, j%4, u, b]
    shift = (4 * (jnp.arange(4)[:, None] + 4 * jnp.arange(2)[None, :])).astype(jnp.uint32)
    w = jnp.sum(q << shift[None, None, None, :, None, :], axis=(3, 5), dtype=jnp.uint32)
    w = jnp.transpose(w, (0, 1, 3, 2)).reshape(np_ // block_n, block_n, kw // CHUNK, 16)
    w = jnp.transpose(w, (0, 2, 1, 3))  # [tile, chunk, row, word 2u + e]

    def tiles(a):  # [Gw, Np] -> [Np/bn, Gw, bn, 1]
        return jnp.transpose(a.reshape(gw, np_ // block_n, block_n), (1, 0, 2))[..., None]

    z = None if z is None else tiles(z)
    return TcInt4(w, tiles(s), z, k=p.k, n=p.n, group=p.group, block_n=block_n)


def _neg_zero(z):
    """``-(128 + z)`` in f32 for uint8 zero points ``z`` (None: symmetric, -136.0), without an
    int->float conversion: ``0x4B000000 | z`` is the f32 ``2**23 + z``, exactly."""
    if z is None:
        return -136.0
    big = jax.lax.bitcast_convert_type(z.astype(jnp.uint32) | 0x4B000000, jnp.float32)
    return (2.0**23 - 128.0) - big


def _decode_asm(w, js=range(8), zero=None):
    """uint32 [bn, 16] -> bf16 [bn, 16] tiles of slabs ``js``: ``128 + q`` (inline PTX, two
    words per instance), or with ``zero`` the signed code ``q - z``, exactly (one more
    ``fma.rn.bf16x2`` per two weights: ``(128 + q) * 1 - (128 + z)``). ``zero``: None (no
    subtraction), ``"sym"`` (z = 8) or a bf16 [bn, 1] column ``-(128 + z)`` per weight row.

    One asm op per tile: jax's Pallas lowering returns a single result per inline-asm op.
    """
    out = []
    for j in js:
        src = "$1" if j < 4 else "$2"
        sh = 4 * (j % 4)
        shift = f"shr.u32 t, {src}, {sh}; " if sh else f"mov.b32 t, {src}; "
        lop = f"lop3.b32 {{dst}}, t, 0x000F000F, {_BF16_128:#x}, 0xEA; "
        args, cons = [w], "=r,r,r"
        if zero is None:
            body = lop.format(dst="$0")
        else:
            neg = f"{_BF16_NEG136:#x}" if zero == "sym" else "$3"
            body = lop.format(dst="t") + f"mov.b32 c, {neg}; mov.b32 o, {_BF16_ONE:#x}; "
            body += "fma.rn.bf16x2 $0, t, o, c; "
            if zero != "sym":
                args, cons = [w, jnp.broadcast_to(zero, w.shape)], "=r,r,r,r"
        (tile,) = plgpu.elementwise_inline_asm(
            "{ .reg .b32 t, c, o; " + shift + body + "}",
            args=args,
            constraints=cons,
            pack=2,
            result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.bfloat16)],
        )
        out.append(tile)
    return out


def _decode_jnp(w, js=range(8), zero=None):
    """Same as :func:`_decode_asm` in jnp (interpret mode / CPU)."""
    out = []
    for j in js:
        src = w[:, j // 4 :: 2]  # [bn, 8]: word 2u + j // 4
        sh = 4 * (j % 4)
        pair = jnp.stack([(src >> sh) & 0xF, (src >> (sh + 16)) & 0xF], axis=-1)
        v = pair.reshape(w.shape).astype(jnp.float32) + 128.0
        if zero is not None:
            v = v + (-136.0 if zero == "sym" else zero.astype(jnp.float32))
        out.append(v.astype(jnp.bfloat16))
    return out


def _kernel(x_ref, xs_ref, w_ref, s_ref, z_ref, *, m, mp, steps, group, xsum, interpret):
    """This program's f32 ``[mp, bn]`` partial (token-major) of ``y``."""
    sid = pl.program_id(1)
    spg = min(group, CHUNK) // SLAB  # slabs per scale group
    decode = _decode_jnp if interpret else _decode_asm
    bn = w_ref.shape[1]

    def token_rows(view):  # a [mp, ...] view of the token axis; rows >= M read as 0
        return D.token_rows(view, m)

    def x_slab(k0):  # x[0:mp, k0:k0+16]^T: the MMA's right operand
        return token_rows(x_ref.at[:, pl.ds(pl.multiple_of(k0, SLAB), SLAB)]).T

    def scales(t):  # per group of chunk t, as loaded: scale, zero [bn, 1], x sums or words
        out = []
        for j0 in range(0, 8, spg):
            k0 = t * CHUNK + SLAB * j0
            g = D.idiv(k0, group)
            xs = None
            if xsum == "xla":  # XLA's [M, units] sums: column u as a [1, mp] row
                xs = token_rows(xs_ref.at[:, pl.ds(D.idiv(k0, SLAB * spg), 1)]).T
            elif xsum == "sum":  # this unit's x as uint32 bf16 pairs [mp, unit / 2], for ready()
                # (32-bit words: a loop-carried bf16 tile would be repacked by PRMTs, which wait
                # for the load in the iteration that issued it)
                k2 = pl.multiple_of(D.idiv(k0, 2), SLAB // 2)
                xs = token_rows(xs_ref.at[:, pl.ds(k2, SLAB * spg // 2)])
            out.append((s_ref[g], None if z_ref is None else z_ref[g], xs))
        return out

    def ready(loaded):  # scales()'s values -> f32 scale, -(128 + zero) [bn, 1], sum x [1, mp]
        out = []
        for sc, z, xs in loaded:
            if xsum == "sum":  # bf16 pairs -> f32: the high half as is, the low half shifted up
                lo = D.bf16_bits_to_f32(xs)
                hi = jax.lax.bitcast_convert_type(xs & jnp.uint32(0xFFFF0000), jnp.float32)
                xs = jnp.sum(lo + hi, axis=1, keepdims=True).T
            out.append((sc.astype(jnp.float32), _neg_zero(z), xs))
        return out

    last = sid * steps + steps - 1

    def body(i, carry):
        acc, cur = carry
        t = sid * steps + i
        # Scales are not tensor-core operands, so Triton does not pipeline their loads: the
        # next chunk's are issued here and used one iteration later. This chunk's loaded values
        # are converted first: ptxas shares scoreboards between loads, so a first use after the
        # next loads issue waited for those too (ncu: ~35% of the stall samples at M = 1).
        cur = ready(cur)
        nxt = scales(jnp.minimum(t + 1, last))
        words = w_ref[t]  # uint32 [bn, 16]: one contiguous block
        if xsum != "none":  # -> 8 x bf16 [bn, 16] of 128 + q
            tiles = decode(words)
        for c, j0 in enumerate(range(0, 8, spg)):
            sc, z, x_total = cur[c]  # x_total: sum_k x, [1, mp] (None: "mma" / "none")
            # sc: f32 scale, z: f32 -(128 + zero point), [bn, 1]
            if xsum == "none":  # slabs of this group decoded to q - z: no sum_k x term
                zero = "sym" if z_ref is None else z.astype(jnp.bfloat16)
                tiles = dict(zip(range(j0, j0 + spg), decode(words, range(j0, j0 + spg), zero)))
                part = jnp.zeros(acc.shape, jnp.float32)
                for j in range(j0, j0 + spg):
                    part = dot_acc(tiles[j], x_slab(t * CHUNK + SLAB * j), part)
                acc = acc + part * sc
                continue
            off = z * sc
            part = jnp.zeros(acc.shape, jnp.float32)
            if xsum == "mma":
                x_total = jnp.zeros(acc.shape, jnp.float32)
            for j in range(j0, j0 + spg):  # chained on the tensor core
                xj = x_slab(t * CHUNK + SLAB * j)
                part = dot_acc(tiles[j], xj, part)  # sum_k (128 + q) x
                if xsum == "mma":  # sum_k x, broadcast over the bn rows
                    x_total = dot_acc(jnp.ones((bn, SLAB), jnp.bfloat16), xj, x_total)
            acc = acc + part * sc + off * x_total
        return acc, nxt

    acc0 = jnp.zeros((bn, mp), jnp.float32)
    acc, _ = jax.lax.fori_loop(0, steps, body, (acc0, scales(sid * steps)))
    return acc.T


@functools.partial(
    jax.jit,
    static_argnames=(
        "split_k", "num_warps", "num_stages", "xsum", "out_dtype", "interpret", "rows"
    ),
)  # fmt: skip
def _tc_2d(
    x2, t: TcInt4, *, split_k, num_warps, num_stages, interpret, xsum="xla", out_dtype=None,
    rows=None,
):  # fmt: skip
    """f32 ``[M, N]`` (``out_dtype`` when ``split_k`` is 1: written by the kernel, no XLA pass;
    :func:`.split_k.split_k_call`).
    ``rows``: weight rows per program (None: ``t.block_n``; a multiple of 64 dividing it: a
    program streams its contiguous ``rows * 64``-byte part of each chunk block)."""
    m = x2.shape[0]
    if m > MAX_M:
        raise ValueError(f"int4_tc takes M <= {MAX_M} rows, got {m}")
    np_, kw = t.np_, t.kw
    block_n, parts = D.program_rows(t, rows)  # rows per program, programs per packed tile
    gw = t.scales.shape[1]
    chunks = kw // CHUNK
    if chunks % split_k:
        raise ValueError(f"split_k {split_k} must divide the {chunks} K chunks of {CHUNK} rows")
    xb = D.prepare_x(x2, kw, 1)  # bf16, K padded (K a multiple of 128 needs no copy of x)
    unit = min(t.group, CHUNK)  # K rows per scale correction
    mp = D.mma_tokens(m, num_warps)  # the MMA's token side: 8 (mma.sync) or 16 ... 128
    in_specs = [pl.BlockSpec((mp, kw), lambda j, s: (0, 0))]  # rows >= M: masked
    args = [xb]
    if xsum == "xla":  # sum_k x per correction unit by XLA (one reduce), read by the kernel
        args.append(xb.astype(jnp.float32).reshape(m, kw // unit, unit).sum(axis=2))
        in_specs.append(pl.BlockSpec((mp, kw // unit), lambda j, s: (0, 0)))
    elif xsum == "sum":  # x again as uint32 words of bf16 pairs, summed in the kernel (on the
        # H100 this bitcast is no kernel of its own: scripts/probe_call_kernels.py)
        args.append(jax.lax.bitcast_convert_type(xb.reshape(m, kw // 2, 2), jnp.uint32))
        in_specs.append(pl.BlockSpec((mp, kw // 2), lambda j, s: (0, 0)))
    elif xsum not in XSUM_MODES:
        raise ValueError(f"xsum must be one of {XSUM_MODES}, got {xsum!r}")
    static = dict(m=m, mp=mp, steps=chunks // split_k, group=t.group, xsum=xsum)

    w_args = [t.words, t.scales] + ([] if t.zeros is None else [t.zeros])
    w_specs = [D.row_part_spec(chunks, block_n, 16, parts)]
    w_specs += [D.row_part_spec(gw, block_n, 1, parts)] * (len(w_args) - 1)

    def body(x_ref, *refs):
        xs_ref = refs[0] if xsum in ("xla", "sum") else None
        w_refs = refs[len(refs) - len(w_args) :]
        z_ref = w_refs[2] if len(w_refs) == 3 else None
        return _kernel(x_ref, xs_ref, w_refs[0], w_refs[1], z_ref, interpret=interpret, **static)

    y = split_k_call(
        body, [*args, *w_args], in_specs + w_specs, m=m, mp=mp, bn=block_n, np_=np_,
        split_k=split_k, out_dtype=jnp.float32 if out_dtype is None else out_dtype,
        interpret=interpret, num_warps=num_warps, num_stages=num_stages,
        name=f"int4_tc_{xsum}_s{split_k}_k{kw}n{np_}m{mp}",  # shape: per-shape traces
    )  # fmt: skip
    return y if np_ == t.n else y[:, : t.n]


def default_rows(t: TcInt4, m: int = 1) -> int:
    """Weight rows per program: ``FEW_TOKENS_ROWS`` (64) for ``m <= FEW_TOKENS`` tokens where
    the packed tile allows, else the whole tile (H100, 2 warps: 64 won at M = 1 and 4, 128 at
    M = 16; ``benchmarks/results/probe_int4_warps.json``, ``probe_int4_m16.json``)."""
    return FEW_TOKENS_ROWS if m <= FEW_TOKENS else t.block_n  # (block_n: a multiple of 64)


def default_xsum(m: int = 1) -> str:
    """Where ``sum_k x`` comes from for ``m`` rows: ``"mma"`` above ``FEW_TOKENS`` up to
    ``MID_TOKENS``; else ``DEFAULT_XSUM`` (XLA's reduction, which a model fuses into x's
    producer), or ``OPAQUE_XSUM`` up to ``FEW_TOKENS`` inside :func:`.dispatch.opaque_input`
    (no producer to fuse into)."""
    if FEW_TOKENS < m <= MID_TOKENS:
        return "mma"
    opaque = dispatch.input_is_opaque() and m <= FEW_TOKENS
    return OPAQUE_XSUM if opaque else DEFAULT_XSUM


def default_warps(m: int = 1, xsum: str = DEFAULT_XSUM) -> int:
    """``FEW_TOKENS_WARPS`` (2: mma.sync) for ``m <= FEW_TOKENS``, and with ``xsum="mma"`` up to
    ``MID_TOKENS``; else 4 (wgmma). ``xsum="none"`` always takes 4: with 2 warps its products
    were wrong on the H100 at M = 16 and 64 (rel. err 0.87; Triton's lowering of the 3-input
    decode asm; not investigated further)."""
    if xsum == "none":
        return 4
    few = m <= FEW_TOKENS or (xsum == "mma" and m <= MID_TOKENS)
    return FEW_TOKENS_WARPS if few else 4


def default_stages(t: TcInt4, split_k: int, xsum: str = "xla", m: int = 1) -> int:
    """Pipeline stages: 2 where a program runs at most 2 chunks (H100, 4096² at M = 1: 8.6
    against 9.3 µs); with x summed in the kernel (``"sum"``) 3 for one token and 2 above
    (tenth session, 8192² / 4096 x 14336: M = 1 16.4 / 15.3 against 16.8 / 15.8 µs, M = 8 17.6
    / 16.8 against 18.4 / 16.9; ``benchmarks/results/probe_int4_slab_tenth.json``); else 3."""
    if t.kw // CHUNK <= 2 * split_k:
        return 2
    if xsum == "sum":
        return 3 if m == 1 else 2
    return 3


def default_split(t: TcInt4, m: int = 1, rows: int | None = None) -> int:
    """K splits (a power of two dividing the chunk count) for ``rows``-row programs (None:
    :func:`default_rows`): about four programs per SM and at least 2 chunks each at
    ``m <= FEW_TOKENS`` tokens, two per SM and 4 chunks above (H100, 2 warps: at M = 1 these
    won on all five Llama-3-8B shapes, ``benchmarks/results/probe_int4_warps.json``)."""
    rows = default_rows(t, m) if rows is None else rows
    programs = t.np_ // rows
    if m <= FEW_TOKENS:
        return D.split_for(programs, t.kw // CHUNK, per_sm=4, min_steps=2)
    return D.split_for(programs, t.kw // CHUNK, per_sm=2, min_steps=4)


def resolve_tiles(
    t: TcInt4, m: int, *, rows=None, split_k=None, num_warps=None, num_stages=None, xsum=None
) -> dict:
    """:func:`_tc_2d`'s tile keywords for ``m`` rows of x: the given ones, and the defaults
    (:func:`default_rows` ...) for those left None; ``xsum`` None: :func:`default_xsum`."""
    rows = default_rows(t, m) if rows is None else rows
    if xsum is None:
        xsum = default_xsum(m)
    if xsum == "none" and num_warps == 2:
        raise ValueError('xsum="none" needs num_warps >= 4 (wrong products with 2 on the H100)')
    split_k = default_split(t, m, rows) if split_k is None else split_k
    return dict(
        rows=rows,
        split_k=split_k,
        num_warps=default_warps(m, xsum) if num_warps is None else num_warps,
        num_stages=default_stages(t, split_k, xsum, m) if num_stages is None else num_stages,
        xsum=xsum,
    )


def resolve_backend(t: TcInt4, m: int, backend=None, *, interpret=None, **tuning) -> str:
    """The kernel :func:`int4_tc_matmul` runs for ``m`` rows of x (its ``backend`` argument):
    ``"mgpu"`` or ``"triton"`` as given, or for None ``"mgpu"`` where ``MGPU_DECODE``,
    :func:`~shrinkjax.kernels.int4_mgpu.usable` and no Triton ``tuning`` keyword (``split_k``,
    ``num_warps``, ``num_stages``, ``xsum``, ``rows``) nor interpret mode say so."""
    if backend is None:
        auto = MGPU_DECODE and not interpret and all(v is None for v in tuning.values())
        return "mgpu" if auto and int4_mgpu.usable(t, m) else "triton"
    if backend not in ("triton", "mgpu"):
        raise ValueError(f"backend must be 'triton', 'mgpu' or None, got {backend!r}")
    if backend == "mgpu" and not int4_mgpu.on_hopper():
        raise ValueError(
            f"backend 'mgpu' needs a Hopper GPU with Mosaic GPU, not {jax.devices()[0]}"
        )
    return backend


def int4_tc_matmul(
    x, t: TcInt4, *, split_k=None, num_warps=None, num_stages=None, xsum=None, rows=None,
    interpret=None, backend=None,
):  # fmt: skip
    """``x[..., K] @ W`` for a :class:`TcInt4` weight and at most 128 rows of x; ``x.dtype``.

    ``xsum``: where ``sum_k x`` per scale group (the zero-point term) comes from (None: see
    :func:`resolve_tiles`): ``"xla"`` a small XLA reduction before the kernel (one more launch,
    ~1.4 µs), ``"sum"`` a reduction of the x tile inside the kernel (issued one chunk ahead,
    like the scales), or ``"mma"`` an extra tensor-core dot with a ones operand inside the
    kernel (the default at 9-32 rows; H100 with 2 warps: level with ``"sum"`` at M = 1 and 4,
    and once 4-5 µs slower at 8192² with 4 warps); or ``"none"``: no ``sum_k x`` at all, the decode
    makes ``q - z`` exactly with one more ``fma.rn.bf16x2`` per two weights (H100: ~1 µs
    slower per call in the 8B decode).
    ``rows`` / ``split_k`` / ``num_warps`` / ``num_stages``: None for the defaults
    (:func:`resolve_tiles`).
    ``backend``: ``"triton"`` (this module's kernel), ``"mgpu"``
    (:func:`shrinkjax.kernels.int4_mgpu.int4_mgpu_matmul`: Hopper, at most 16 rows, g128), or
    None: ``"mgpu"`` where :func:`~shrinkjax.kernels.int4_mgpu.usable` and ``MGPU_DECODE`` say
    so and no Triton tile or ``xsum`` is given, else ``"triton"``.
    """
    m = math.prod(x.shape[:-1])
    tuning = dict(split_k=split_k, num_warps=num_warps, num_stages=num_stages, xsum=xsum, rows=rows)
    backend = resolve_backend(t, m, backend, interpret=interpret, **tuning)
    if backend == "mgpu":
        y = int4_mgpu.int4_mgpu_matmul(x.reshape(m, x.shape[-1]), t)
        return y.astype(x.dtype).reshape(*x.shape[:-1], t.n)
    given = dict(rows=rows, split_k=split_k, num_warps=num_warps, num_stages=num_stages)
    kw = resolve_tiles(t, m, xsum=xsum, **given)
    return D.call_2d(_tc_2d, x, t, interpret=interpret, **kw)


# ------------------------------------------------------------------------------------------
# dequantize (reference and prefill path) and dispatch
# ------------------------------------------------------------------------------------------


def _codes_nk(t: TcInt4):
    """uint32 codes [Np, Kw] (the inverse of :func:`pack_tc`'s word packing)."""
    nt, chunks, bn, _ = t.words.shape
    w = t.words.reshape(nt, chunks, bn, 8, 2)  # [tile, t, row, u, e]
    shift = 4 * (jnp.arange(4)[:, None] + 4 * jnp.arange(2)[None, :])  # [j % 4, b]
    q = (w[..., None, None] >> shift.astype(jnp.uint32)) & 0xF  # [tile, t, row, u, e, j%4, b]
    q = jnp.transpose(q, (0, 2, 1, 4, 5, 3, 6))  # [tile, row, t, e, j%4, u, b]
    return q.reshape(nt * bn, chunks * CHUNK)


def _rows_of(a, t: TcInt4):  # [Np/bn, Gw, bn, 1] -> f32 [Np, Kw] (per K row)
    g = jnp.transpose(a[..., 0], (0, 2, 1)).reshape(t.np_, -1).astype(jnp.float32)
    return jnp.repeat(g, t.group, axis=1)[:, : t.kw]


def dequantize_tc_ref(t: TcInt4):
    """bf16 ``W [K, N]`` (pure jnp; bit-identical to the PackedInt reference)."""
    z = 8.0 if t.zeros is None else _rows_of(t.zeros, t)
    w = (_codes_nk(t).astype(jnp.float32) - z) * _rows_of(t.scales, t)
    return w.astype(jnp.bfloat16)[: t.n, : t.k].T


def tc_matmul_ref(x2, t: TcInt4):
    y = jnp.matmul(
        x2.astype(jnp.bfloat16), dequantize_tc_ref(t), preferred_element_type=jnp.float32
    )
    return y.astype(x2.dtype)


def _dequant_kernel(w_ref, s_ref, z_ref, o_ref, *, group, interpret):
    t = pl.program_id(0)
    tiles = (_decode_jnp if interpret else _decode_asm)(w_ref[...])
    for j in range(8):
        g = D.idiv(t * CHUNK + SLAB * j, group)
        s = s_ref[g].astype(jnp.float32)  # [bn, 1]
        z = 136.0 if z_ref is None else z_ref[g].astype(jnp.float32) + 128.0
        w = ((tiles[j].astype(jnp.float32) - z) * s).astype(o_ref.dtype)  # [bn, 16]
        o_ref[pl.ds(SLAB * j, SLAB), :] = w.T  # 16 whole K rows of the [128, bn] block


@functools.partial(jax.jit, static_argnames=("interpret",))
def dequantize_tc(t: TcInt4, interpret=False):
    """bf16 ``W [Kw, Np]`` (K-major, like a dense weight) by a Pallas kernel: one program per
    128-row chunk and tile, writing 16 whole rows of ``bn`` columns per slab."""
    nt, chunks, bn, _ = t.words.shape
    gw = t.scales.shape[1]
    squeezed = getattr(pl, "squeezed", None)
    w_args = [t.words, t.scales] + ([] if t.zeros is None else [t.zeros])
    specs = [pl.BlockSpec((squeezed, squeezed, bn, 16), lambda c, i: (i, c, 0, 0))] + [
        pl.BlockSpec((squeezed, gw, bn, 1), lambda c, i: (i, 0, 0, 0))
    ] * (len(w_args) - 1)

    def kern(*refs):
        z_ref = refs[2] if len(refs) == 4 else None
        _dequant_kernel(refs[0], refs[1], z_ref, refs[-1], group=t.group, interpret=interpret)

    return D.pallas_gpu_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((t.kw, t.np_), jnp.bfloat16),
        grid=(chunks, nt),
        in_specs=specs,
        out_specs=pl.BlockSpec((CHUNK, bn), lambda c, i: (c, i)),
        interpret=interpret,
        num_warps=4,
        num_stages=1,
        name="int4_tc_dequant",
    )(*w_args)


def tc_linear(x, t: TcInt4, *, path="auto", interpret=None, **tuning):
    """``x[..., K] @ W`` for a :class:`TcInt4`; the dispatch entry point (``x.dtype`` out).
    ``path``: see :func:`.driver.decode_or_prefill` (fused below ``dispatch.PREFILL_MIN_M``
    rows and at most 128); ``tuning``: :func:`int4_tc_matmul`'s."""
    return D.decode_or_prefill(
        x, t, int4_tc_matmul, dequantize_tc, max_m=MAX_M, path=path, interpret=interpret, **tuning
    )


D.register_packed(TcInt4, tc_linear, tc_matmul_ref)
