"""Pallas kernel (Triton lowering): 2:4-sparse bf16 ``y = x @ W`` for decode (M <= 128), the
expanded weight as the tensor-core *left* operand (the recipe of :mod:`.int4_tc`), expanded in
registers with byte permutes; larger M runs :func:`dequantize_24_tc` (Pallas) + cuBLAS.

**Position tiles.** An inline-asm instance sees two 32-bit words, the kept pairs ``(a, b)``
(bf16, ``a`` at the lower position) of two groups of 4 rows ``G0`` and ``G1``, and one
register holding their keep masks. It cannot
write the four dense values of one group (one result register per asm op), so each MMA tile
holds *one position* ``p`` of 16 groups: tile ``p`` of a 64-row chunk is ``[bn, 16]`` with
column ``c`` = dense row ``4 c + p``. XLA reorders x to match (``x4[p, m, j] = x[m, 4 j + p]``,
as :mod:`.sparse_matmul` does). Per instance and chunk, with keep masks ``k`` (bit ``p`` set if
row ``p`` is one of the two stored):

* ``A = prmt(G0, G1, 0x5410)`` = ``(a0, a1)`` and ``B = prmt(..., 0x7632)`` = ``(b0, b1)``;
* lane masks ``m_p`` (``0xFFFF`` per half where ``k.p``) by one ``shl`` and one sign-replicating
  ``prmt`` from the packed keep bits;
* tile 0 = ``A & m0``, tile 3 = ``B & m3`` (row 0 can only hold ``a``, row 3 only ``b``),
  tile 1 = ``m1 & (m0 ? B : A)``, tile 2 = ``m2 & (m3 ? A : B)`` (``lop3``).

About 16 instructions per 8 dense weights once ptxas shares ``A``, ``B`` and the masks between
the four asm ops (SASS, ``scripts/triton_sass.py sparse24_tc``: 6 ``PRMT`` and 6 ``LOP3`` per
instance and chunk); no lookup table and no shared memory. A loop step is 256 rows (four
chunks and one keep block): 512-row steps needed 192 KB of shared memory at 3 stages.

Layout (:class:`Tc24`, built once per weight by :func:`pack_24_tc` from a bf16
:class:`~.layouts.Packed24`). ``values`` uint32 ``[Np/bn, Kw/64, bn, 16]``: word ``w`` of a
weight row in chunk ``c`` is group ``16 c + w``'s pair, ``a`` in the low half. ``keep``
uint16 ``[Np/bn, Kw/256, bn, 16]``: element ``w`` of a weight row holds the keep masks of
group ``w`` of each of the step's four chunks, row ``p`` of chunk ``c`` at bit
``15 - p - 4 c``. An asm instance reads elements ``2 u`` and ``2 u + 1`` as one register, so
its group ``h`` has that bit at ``16 h + 15 - p - 4 c``. ``Kw`` = K padded to 256.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from shrinkjax.kernels import dispatch
from shrinkjax.kernels import driver as D
from shrinkjax.kernels.layouts import Packed24, round_up
from shrinkjax.kernels.reference import _unpack_split_half
from shrinkjax.kernels.split_k import split_k_call
from shrinkjax.kernels.triton_ext import dot_acc

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old jax
    plgpu = None

CHUNK = 64  # dense K rows per block of value words (16 groups)
SUPER = 256  # dense K rows per keep-mask block (4 chunks): one loop step
DEFAULT_BLOCK_N = 64  # H100 probe (scripts/probe_tc.py): 64 beat 128 at 8192² and 4096x14336
# H200 probe, int4 values, 8192²: 24.7 / 28.0 µs at M = 1 / 16 with 128, 28.5 / 34.9 with 64
DEFAULT_BLOCK_N_INT4 = 128
# int4 values, M up to this: 64-row programs (halves of the 128-row tiles), 2 warps (Triton's
# mma.sync instead of wgmma; see int4_tc), twice the K splits, 2 stages. H100 probe at 8192²
# (native 64-row packing): M = 1 22.5 against 23.5 µs, M = 4 24.4 against 25.7; as halves of
# 128-row tiles, benchmarks/kernels.py: 22.6 against 23.5 and 24.0 against 25.6 (2.61x / 2.44x
# cuBLAS bf16). With x from XLA's by-position copy, M > 4 keeps 128-row / 4-warp tiles (the
# 2-warp gain there was small, probe_24_warps.json); with x read in place (x_in="kernel",
# below) the 2-warp regime runs up to OPAQUE_MAX_M (_few).
INT4_FEW_TOKENS = 4
MAX_M = 128
# Where the kernel's x comes from (``x_in``): "xla" (default) reads x4, the by-position copy
# XLA makes of x; in a model it fuses into x's producer. "kernel" reads x as given, one
# contiguous 64-row load per chunk split by position in registers: no XLA kernel before the
# matmul (int4 values keep XLA's sums of x per scale unit: summing in the kernel was slower).
# Taken inside dispatch.opaque_input() (x from a kernel XLA cannot fuse into: the Llama o_proj,
# or a standalone call) at M up to OPAQUE_MAX_M, with 2 warps (default_warps). H100,
# benchmarks/RESULTS.md (eighth session), 4 warps, same call: bf16 values 8192² M = 1 / 16
# 31.3 / 33.0 against 32.8 / 36.5 µs with x4; with 2 warps 29.5 / 31.1 (grid).
X_IN_MODES = ("xla", "kernel")
OPAQUE_MAX_M = 16
# bf16 values at these many rows take 2 warps with XLA's x4 too (a model's linears). H100,
# eleventh session, same call: 8B decode (2:4 bf16) at batch 16 / 32 3611 / 6129 against 3270 /
# 4779 tok/s with 4 warps; standalone 8192² at M = 32 40.1 against 53.9 µs (x read in place:
# 32.7). Batches up to 8 keep 4 warps (not measured in the model).
BF16_MMA_SYNC_ROWS = range(9, 33)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "keep", "scales"],
    meta_fields=["k", "n", "block_n", "group"],
)
@dataclasses.dataclass(frozen=True)
class Tc24(D.TcLayout):
    """2:4-sparse weight in :mod:`sparse24_tc`'s layout (module docstring): bf16 values, or
    symmetric int4 codes with per-group scales (``group`` > 0)."""

    STREAM, STEP_ROWS = "keep", SUPER  # (driver.TcLayout: kw, np_)

    values: jax.Array  # uint32 bf16: [Np/bn, Kw/64, bn, 16]; int4: [Np/bn, Kw/256, bn, 16]
    keep: jax.Array  # uint16 [Np/bn, Kw/256, bn, 16]
    scales: jax.Array | None  # int4: bf16 [Np/bn, Kw/group, bn, 1]
    k: int
    n: int
    block_n: int
    group: int = 0  # int4: K rows per scale (0: bf16 values)

    @property
    def is_int4(self) -> bool:
        return self.group > 0


def supports(p: Packed24) -> bool:
    """True when :func:`pack_24_tc` takes ``p``: bf16 values, or symmetric int4 codes with a
    group size dividing 256 or a multiple of it."""
    if not isinstance(p, Packed24):
        return False
    if not p.is_int4:
        return True
    return p.zeros is None and (SUPER % p.group == 0 or p.group % SUPER == 0)


def keep_bit(p: int, chunk: int) -> int:
    """Bit of row ``p`` of a group in chunk ``chunk`` (0-3) of a step, in its uint16 element."""
    return 15 - p - 4 * chunk


@functools.partial(jax.jit, static_argnames=("block_n",))
def pack_24_tc(p: Packed24, block_n: int | None = None) -> Tc24:
    """One-time conversion of a :class:`Packed24` (bf16 values, or symmetric int4 codes with a
    group size that divides 256 or is a multiple of it) to :class:`Tc24` (pure XLA)."""
    if not isinstance(p, Packed24):
        raise TypeError(f"pack_24_tc converts a Packed24, got {type(p).__name__}")
    if p.is_int4 and p.zeros is not None:
        raise ValueError(
            "sparse24_tc takes symmetric int4 codes (zero point 8); this Packed24 has per-group "
            "zero points: keep it in the Packed24 layout (sparse_matmul)"
        )
    if p.is_int4 and SUPER % p.group and p.group % SUPER:
        raise ValueError(f"sparse24_tc needs a group size dividing {SUPER} or a multiple of it")
    if block_n is None:
        block_n = DEFAULT_BLOCK_N_INT4 if p.is_int4 else DEFAULT_BLOCK_N
    if p.np_ % block_n or block_n % 64:
        raise ValueError(f"block_n {block_n} must be a multiple of 64 dividing Np={p.np_}")
    nib = _unpack_split_half(p.meta, p.pair).astype(jnp.uint32)  # [Kq, Np]
    kq, np_ = nib.shape
    kw = round_up(kq * 4, SUPER)
    gq = kw // 4
    pad = ((0, gq - kq), (0, 0))
    keep = (1 << (nib & 3)) | (1 << (nib >> 2))  # 4-bit keep mask (bit p: row p stored)
    keep = jnp.pad(keep, pad, constant_values=3).astype(jnp.uint16)  # padding: rows 0, 1
    nt = np_ // block_n
    if p.is_int4:  # a in bits 16 h + 8 c'' .. + 3, b 4 bits above: chunk 2 e + c'' of a step
        codes = jnp.pad(p.values.astype(jnp.uint32), pad, constant_values=0x88)  # zero = 8
        codes = codes.reshape(kw // SUPER, 2, 2, 8, 2, nt, block_n)  # [S, e, c'', u, h, ..]
        ch = jnp.arange(2, dtype=jnp.uint32).reshape(1, 1, 2, 1, 1, 1, 1)
        hh = jnp.arange(2, dtype=jnp.uint32).reshape(1, 1, 1, 1, 2, 1, 1)
        sh = 16 * hh + 8 * ch
        words = ((codes & 15) << sh) | ((codes >> 4) << (sh + 4))
        words = jnp.sum(words, axis=(2, 4), dtype=jnp.uint32)  # [S, e, u, tile, row]
        words = jnp.transpose(words, (3, 0, 4, 2, 1)).reshape(nt, kw // SUPER, block_n, 16)
        gw = kw // p.group
        sc = jnp.pad(p.scales, ((0, gw - p.scales.shape[0]), (0, 0)))  # padded rows: scale 0
        scales = jnp.transpose(sc.reshape(gw, nt, block_n), (1, 0, 2))[..., None]
    else:
        bits = [jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32) for v in p.values]
        words = jnp.pad(bits[0] | (bits[1] << 16), pad)  # [Gw, Np]: a low, b high
        words = words.reshape(kw // CHUNK, 16, nt, block_n)
        words = jnp.transpose(words, (2, 0, 3, 1))  # [tile, chunk, row, word]
        scales = None
    k4 = keep.reshape(kw // SUPER, 4, 16, nt, block_n)  # [step, chunk, group w, tile, row]
    c = jnp.arange(4, dtype=jnp.uint16).reshape(1, 4, 1, 1, 1)
    mword = jnp.zeros(k4.shape, jnp.uint16)
    for row in range(4):  # row p of chunk c -> bit 15 - p - 4 c
        mword = mword | (((k4 >> row) & 1) << (15 - row - 4 * c)).astype(jnp.uint16)
    mword = jnp.sum(mword, axis=1, dtype=jnp.uint16)  # [step, w, tile, row]: disjoint bits
    mword = jnp.transpose(mword, (2, 0, 3, 1))  # [tile, step, row, w]
    group = p.group if p.is_int4 else 0
    return Tc24(words, mword, scales, k=p.k, n=p.n, block_n=block_n, group=group)


_BF16_128 = 0x43004300  # two bf16 128.0
_BF16_136 = 0x43084308  # two bf16 136.0 = 128 + 8: int4's (symmetric) zero point


def _tile_ptx(p: int, chunk: int, int4: bool = False) -> str:
    """PTX for tile ``p`` of chunk ``chunk``: ``$1, $2`` value words, ``$3`` the keep masks of
    the instance's groups G0, G1 (two uint16), ``$0`` the bf16x2 of row ``p`` of G0 and G1.

    bf16: ``$1, $2`` are G0's and G1's pairs; rows not stored are 0. int4: word ``$1`` (chunks
    0, 1) or ``$2`` (2, 3) holds the codes (module docstring) and the result is ``128 + q``
    (the int4_tc decode), with ``136`` (the zero point) on rows not stored."""
    base = 15 - keep_bit(0, chunk)  # shift bringing row 0's bit to 15 (and 31); row p adds p

    def mask(dst, row):
        return f"shl.b32 t, $3, {base + row}; prmt.b32 {dst}, t, t, 0xBB99; "

    if int4:
        w, sh = ("$1" if chunk < 2 else "$2"), 8 * (chunk % 2)
        body = "".join(
            (f"shr.b32 t, {w}, {sh + 4 * i}; " if sh + 4 * i else f"mov.b32 t, {w}; ")
            + f"lop3.b32 {dst}, t, 0x000F000F, {_BF16_128:#x}, 0xEA; "
            for i, dst in enumerate("AB")
        )

        def keep_or_zero(dst, src):  # dst = m ? src : 136
            return f"lop3.b32 {dst}, {src}, {_BF16_136:#x}, m, 0xE4; "
    else:
        body = "prmt.b32 A, $1, $2, 0x5410; prmt.b32 B, $1, $2, 0x7632; "

        def keep_or_zero(dst, src):  # dst = m ? src : 0
            return f"and.b32 {dst}, {src}, m; "

    body += mask("m", p)
    if p == 0:
        body += keep_or_zero("$0", "A")
    elif p == 3:
        body += keep_or_zero("$0", "B")
    elif p == 1:  # row 1 holds b when row 0 is stored, else a
        body += mask("q", 0) + "lop3.b32 s, B, A, q, 0xE4; " + keep_or_zero("$0", "s")
    else:  # row 2 holds a when row 3 is stored, else b
        body += mask("q", 3) + "lop3.b32 s, A, B, q, 0xE4; " + keep_or_zero("$0", "s")
    return "{ .reg .b32 A, B, m, q, s, t; " + body + "}"


def _decode_asm(v, keep, chunk, int4=False):
    """uint32 value words ``[bn, 16]`` (bf16: of one chunk; int4: of the step) and the step's
    keep masks -> four bf16 ``[bn, 16]`` position tiles of chunk ``chunk`` (docstring)."""
    return [
        plgpu.elementwise_inline_asm(
            _tile_ptx(p, chunk, int4),
            args=[v, keep],
            constraints="=r,r,r,r",
            pack=2,
            result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.bfloat16)],
        )[0]
        for p in range(4)
    ]


def _decode_jnp(v, keep, chunk, int4=False):
    """Same as :func:`_decode_asm` in jnp (interpret mode, tests and the reference)."""
    if int4:  # column 2u + h: word 2u + chunk // 2, bits 16 h + 8 (chunk % 2) (a), + 4 (b)
        w = jnp.repeat(v[:, chunk // 2 :: 2], 2, axis=1)  # [bn, 16]: column c -> word c // 2
        sh = 16 * (jnp.arange(16, dtype=jnp.uint32) % 2)[None, :] + 8 * (chunk % 2)
        a = (((w >> sh) & 15) + 128).astype(jnp.bfloat16)
        b = (((w >> (sh + 4)) & 15) + 128).astype(jnp.bfloat16)
        zero = jnp.full_like(a, 136.0)
    else:
        a = jax.lax.bitcast_convert_type((v & 0xFFFF).astype(jnp.uint16), jnp.bfloat16)
        b = jax.lax.bitcast_convert_type((v >> 16).astype(jnp.uint16), jnp.bfloat16)
        zero = jnp.zeros_like(a)

    def kept(row):  # column w = group w of the chunk: its own uint16 keep element
        return ((keep >> keep_bit(row, chunk)) & 1) == 1

    return [
        jnp.where(kept(0), a, zero),
        jnp.where(kept(1), jnp.where(kept(0), b, a), zero),
        jnp.where(kept(2), jnp.where(kept(3), a, b), zero),
        jnp.where(kept(3), b, zero),
    ]


def _kernel(
    x_ref, xs_ref, v_ref, k_ref, s_ref, *, m, mp, steps, group, x_in, interpret
):  # fmt: skip
    """One program: ``bn`` weight rows, ``steps`` 256-row steps. int4 (``group`` > 0): per scale
    unit (``min(group, 256)`` rows) the chained partial ``sum (128 + q) x`` becomes
    ``s * part - 136 s * sum x`` (``xs_ref``: XLA's sums of x per unit), as in int4_tc.
    ``x_in="xla"``: ``x_ref`` is x4 ``[4, mp, Kw/4]``; ``"kernel"``: ``x_ref`` is x ``[mp, Kw]``
    (a chunk's 64 rows loaded at once and split by position in registers). Returns the
    program's f32 ``[mp, bn]`` partial of y (token-major)."""
    sid = pl.program_id(1)
    decode = _decode_jnp if interpret else _decode_asm
    bn = v_ref.shape[1]
    per = SUPER // CHUNK  # chunks per step
    int4 = group > 0
    unit = min(group, SUPER) if int4 else SUPER  # rows per scale correction
    cpu = unit // CHUNK  # chunks per unit

    def token_rows(view):  # a [mp, ...] view of the token axis; rows >= M read as 0
        return D.token_rows(view, m)

    def x_slabs(g0):  # x4[p, 0:mp, g0:g0+16]^T for p = 0..3: the MMA's right operands
        if x_in == "xla":  # (rows >= M read 0)
            views = [x_ref.at[jnp.int32(p), :, pl.ds(pl.multiple_of(g0, 16), 16)] for p in range(4)]
            return [token_rows(v).T for v in views]
        # one contiguous [mp, 64] load, split by position in registers (Triton: two tt.split;
        # a stride-4 load per position was 1.8x slower on the H100)
        xc = token_rows(x_ref.at[:, pl.ds(pl.multiple_of(4 * g0, 4 * 16), 4 * 16)])
        even, odd = jnp.unstack(xc.reshape(mp, 16, 2, 2), axis=-1)  # rows 4j + 2a + b
        pos = [*jnp.unstack(even, axis=-1), *jnp.unstack(odd, axis=-1)]  # p = 0, 2, 1, 3
        return [pos[p].T for p in (0, 2, 1, 3)]

    def scales(t):  # step t's units as loaded: bf16 scale bits (widened) [bn, 1], sum x [1, mp]
        out = []
        for u0 in range(0, per, cpu):
            row0 = t * SUPER + u0 * CHUNK
            sc = D.widen_bits(s_ref[D.idiv(row0, group)])
            out.append((sc, token_rows(xs_ref.at[:, pl.ds(D.idiv(row0, unit), 1)]).T))
        return out

    def ready(loaded):  # -> (scale, -136 scale) [bn, 1] and sum x [1, mp] per unit
        out = []
        for bits, xs in loaded:
            sc = D.bf16_bits_to_f32(bits)
            out.append((sc, -136.0 * sc, xs))
        return out

    last = sid * steps + steps - 1

    def body(i, carry):
        acc, cur = carry
        t = sid * steps + i
        if int4:  # converted before the next step's loads issue (see int4_tc's loop; H100
            cur = ready(cur)  # 8192²: 2:4-int4 at M = 4 / 8 / 16 -1 to -2%, M = 1 the same)
            nxt = scales(jnp.minimum(t + 1, last))  # a step ahead (not pipelined)
        else:
            nxt = cur
        keep = k_ref[t]  # uint16 [bn, 16]: this step's keep masks
        words = v_ref[t] if int4 else None  # int4: one block of codes per step
        part = jnp.zeros(acc.shape, jnp.float32) if int4 else acc
        for c in range(per):
            if int4:
                tiles = decode(words, keep, c, True)
            else:
                tiles = decode(v_ref[t * per + c], keep, c)
            xs4 = x_slabs((t * per + c) * 16)  # (the chunk's first group)
            for p in range(4):
                part = dot_acc(tiles[p], xs4[p], part)
            if int4 and (c + 1) % cpu == 0:  # end of a scale unit
                sc, off, xs = cur[c // cpu]
                acc = acc + part * sc + off * xs
                part = jnp.zeros(acc.shape, jnp.float32)
        return (acc if int4 else part), nxt

    acc0 = jnp.zeros((bn, mp), jnp.float32)
    acc, _ = jax.lax.fori_loop(0, steps, body, (acc0, scales(sid * steps) if int4 else ()))
    return acc.T


def x_by_position(x2, kw: int):
    """bf16 ``x4[p, m, j] = x[m, 4 j + p]`` (K padded to ``kw``)."""
    xb = D.prepare_x(x2, kw, 1)
    return jnp.transpose(xb.reshape(x2.shape[0], kw // 4, 4), (2, 0, 1))


@functools.partial(
    jax.jit,
    static_argnames=(
        "split_k", "num_warps", "num_stages", "out_dtype", "interpret", "rows", "x_in"
    ),
)  # fmt: skip
def _tc24_2d(
    x2, t: Tc24, *, split_k, num_warps, num_stages, interpret, out_dtype=None, rows=None,
    x_in="xla",
):  # fmt: skip
    """f32 ``[M, N]`` (``out_dtype`` when ``split_k`` is 1; :func:`.split_k.split_k_call`).
    ``rows``: weight rows per program
    (None: ``t.block_n``; a multiple of 64 dividing it, :func:`.driver.program_rows`);
    ``x_in``: see ``X_IN_MODES``."""
    m = x2.shape[0]
    if m > MAX_M:
        raise ValueError(f"sparse24_tc takes M <= {MAX_M} rows, got {m}")
    supers = t.kw // SUPER
    if supers % split_k:
        raise ValueError(f"split_k {split_k} must divide the {supers} K steps of {SUPER} rows")
    np_, kw = t.np_, t.kw
    bn, parts = D.program_rows(t, rows)  # rows per program, programs per packed tile
    mp = D.mma_tokens(m, num_warps)  # the MMA's token side
    if x_in not in X_IN_MODES:
        raise ValueError(f"x_in must be one of {X_IN_MODES}, got {x_in!r}")
    static = dict(m=m, mp=mp, steps=supers // split_k, group=t.group, x_in=x_in)
    xb = D.prepare_x(x2, kw, 1)  # bf16, K padded (K a multiple of 256: no copy)
    if x_in == "kernel":  # x as given
        args = [xb]
        specs = [pl.BlockSpec((mp, kw), lambda j, s: (0, 0))]  # rows >= M: masked
    else:
        args = [x_by_position(xb, kw)]
        specs = [pl.BlockSpec((4, mp, kw // 4), lambda j, s: (0, 0, 0))]  # rows >= M: masked
    if t.is_int4:  # sum x per scale unit (over all K rows of the unit)
        unit = min(t.group, SUPER)
        args.append(xb.astype(jnp.float32).reshape(m, kw // unit, unit).sum(axis=2))
        specs.append(pl.BlockSpec((mp, kw // unit), lambda j, s: (0, 0)))
    args += [t.values, t.keep] + ([t.scales] if t.is_int4 else [])
    specs += [
        D.row_part_spec(t.values.shape[1], bn, 16, parts),
        D.row_part_spec(supers, bn, 16, parts),
    ]
    if t.is_int4:
        specs.append(D.row_part_spec(kw // t.group, bn, 1, parts))

    def body(*refs):
        x_ref, rest = refs[0], list(refs[1:])
        xs_ref = rest.pop(0) if t.is_int4 else None
        s_ref = rest[2] if t.is_int4 else None
        return _kernel(x_ref, xs_ref, rest[0], rest[1], s_ref, interpret=interpret, **static)

    y = split_k_call(
        body, args, specs, m=m, mp=mp, bn=bn, np_=np_, split_k=split_k,
        out_dtype=jnp.float32 if out_dtype is None else out_dtype,
        interpret=interpret, num_warps=num_warps, num_stages=num_stages,
        name=f"sparse24_tc{'_int4' if t.is_int4 else ''}_s{split_k}_k{kw}n{np_}m{mp}",
    )  # fmt: skip
    return y if np_ == t.n else y[:, : t.n]


def _few(t: Tc24, m: int, x_in: str = "xla") -> bool:
    """The 64-row, 2-warp (``mma.sync``) regime of int4 values: at ``m <= INT4_FEW_TOKENS``
    rows, or with x read in place (``x_in="kernel"``, up to ``OPAQUE_MAX_M`` rows; H100, M = 16:
    2 warps held every top-six place at 8192² in ``probe_24_m16_xin.json``; 24.6 µs in the
    grid against 26.1 with 128-row / 4-warp tiles)."""
    return t.is_int4 and (m <= INT4_FEW_TOKENS or x_in == "kernel")


def default_rows(t: Tc24, m: int = 1, x_in: str = "xla") -> int:
    """Weight rows per program: 64 in the :func:`_few` regime (where the packed tile allows),
    else the packed tile."""
    return 64 if _few(t, m, x_in) else t.block_n  # (block_n: a multiple of 64)


def default_warps(t: Tc24, m: int = 1, x_in: str = "xla") -> int:
    """2 (``mma.sync``) in the :func:`_few` regime, wherever x is read in place (``x_in=
    "kernel"``: its by-position split stays in registers, the ``mma.sync`` operand layout, where
    ``wgmma`` takes it through shared memory; H100 probe, bf16 values at M = 16: 8192² 30.7 µs
    against 32.5 with 4 warps, 4096² 11.6 against 12.5) and for bf16 values at
    ``BF16_MMA_SYNC_ROWS`` (9-32) rows; else 4 (``wgmma``)."""
    mid = not t.is_int4 and m in BF16_MMA_SYNC_ROWS
    return 2 if _few(t, m, x_in) or x_in == "kernel" or mid else 4


def default_split(t: Tc24, m: int = 1, rows: int | None = None, x_in: str = "xla") -> int:
    """K splits for at most two ``rows``-row programs per SM (None: :func:`default_rows`; H100
    probe at block_n 64, M = 1: 8192² 33.5 µs at 256 programs, 37.7 at 512); twice that for
    int4 values at M = 1, and in the :func:`_few` regime with 64-row programs (see
    :func:`default_stages`)."""
    rows = default_rows(t, m, x_in) if rows is None else rows
    split = D.split_for(t.np_ // rows, t.kw // SUPER, per_sm=2, at_most=True)
    double = t.is_int4 and (m == 1 or (_few(t, m, x_in) and rows == 64))
    if double and (t.kw // SUPER) % (2 * split) == 0:
        return 2 * split
    return split


def default_stages(t: Tc24, m: int = 1, x_in: str = "xla") -> int:
    """Pipeline stages: 2 for int4 values at M = 1 (with twice the K splits: 8192² 23.9 µs
    against 25.2 at 3 stages, H100 and H200 probes agreeing) and in the rest of the
    :func:`_few` regime, else 3."""
    return 2 if _few(t, m, x_in) else 3


def default_x_in(m: int = 1) -> str:
    """``"kernel"`` inside :func:`.dispatch.opaque_input` at ``m <= OPAQUE_MAX_M``, else
    ``"xla"`` (``X_IN_MODES``)."""
    return "kernel" if dispatch.input_is_opaque() and m <= OPAQUE_MAX_M else "xla"


def resolve_tiles(
    t: Tc24, m: int, *, rows=None, split_k=None, num_warps=None, num_stages=None, x_in=None
):  # fmt: skip
    """:func:`_tc24_2d`'s tile keywords for ``m`` rows of x: the given ones, and the defaults
    (:func:`default_rows`, :func:`default_split`, :func:`default_x_in` ...) for those left
    None."""
    x_in = default_x_in(m) if x_in is None else x_in
    rows = default_rows(t, m, x_in) if rows is None else rows
    return dict(
        rows=rows,
        split_k=default_split(t, m, rows, x_in) if split_k is None else split_k,
        num_warps=default_warps(t, m, x_in) if num_warps is None else num_warps,
        num_stages=default_stages(t, m, x_in) if num_stages is None else num_stages,
        x_in=x_in,
    )


def tc24_matmul(
    x, t: Tc24, *, split_k=None, num_warps=None, num_stages=None, rows=None, x_in=None,
    interpret=None,
):  # fmt: skip
    """``x[..., K] @ W`` for a :class:`Tc24` weight and at most 128 rows of x; ``x.dtype``.
    ``rows`` / ``split_k`` / ``num_warps`` / ``num_stages`` / ``x_in``: None for the defaults
    (:func:`resolve_tiles`)."""
    given = dict(rows=rows, split_k=split_k, num_warps=num_warps, num_stages=num_stages)
    kw = resolve_tiles(t, math.prod(x.shape[:-1]), x_in=x_in, **given)
    return D.call_2d(_tc24_2d, x, t, interpret=interpret, **kw)


# ------------------------------------------------------------------------------------------
# dequantize (reference and prefill path) and dispatch
# ------------------------------------------------------------------------------------------


def dequantize_24_tc_ref(t: Tc24):
    """bf16 ``W [K, N]`` (pure jnp; bit-identical to the Packed24 reference)."""
    nt, bn, per = t.keep.shape[0], t.block_n, SUPER // CHUNK
    rows = []
    for c in range(t.kw // CHUNK):
        step, cc = divmod(c, per)
        v = t.values[:, step] if t.is_int4 else t.values[:, c]
        tiles = jax.vmap(lambda v, k, cc=cc: jnp.stack(_decode_jnp(v, k, cc, t.is_int4)))(
            v, t.keep[:, step]
        )  # [nt, 4 (p), bn, 16 (group)]
        rows.append(jnp.transpose(tiles, (3, 1, 0, 2)).reshape(64, nt * bn))  # row 4 g + p
    w = jnp.concatenate(rows)
    if t.is_int4:  # (v - 136) * scale: v = 128 + q, or 136 on rows not stored
        s = jnp.transpose(t.scales[..., 0], (1, 0, 2)).reshape(-1, nt * bn)  # [Gw, Np]
        s = jnp.repeat(s.astype(jnp.float32), t.group, axis=0)
        w = ((w.astype(jnp.float32) - 136.0) * s).astype(jnp.bfloat16)
    return w[: t.k, : t.n]


def tc24_matmul_ref(x2, t: Tc24):
    y = jnp.matmul(
        x2.astype(jnp.bfloat16), dequantize_24_tc_ref(t), preferred_element_type=jnp.float32
    )
    return y.astype(x2.dtype)


def _dequant_kernel(v_ref, k_ref, s_ref, o_ref, *, group, interpret):
    decode = _decode_jnp if interpret else _decode_asm
    keep = k_ref[...]
    step = pl.program_id(0)
    for c in range(SUPER // CHUNK):
        if group:
            tiles = decode(v_ref[...], keep, c, True)
            sc = s_ref[D.idiv(step * SUPER + c * CHUNK, group)].astype(jnp.float32)  # [bn, 1]
            tiles = [((w.astype(jnp.float32) - 136.0) * sc).astype(o_ref.dtype) for w in tiles]
        else:
            tiles = decode(v_ref[c], keep, c)
        for p in range(4):  # rows 4 g + p of the chunk: a [16, 4, bn] view of its 64 rows
            o_ref[pl.ds(16 * c, 16), p, :] = tiles[p].T


@functools.partial(jax.jit, static_argnames=("interpret",))
def dequantize_24_tc(t: Tc24, interpret=False):
    """bf16 ``W [Kw, Np]`` (K-major) by a Pallas kernel: one program per 256 rows and tile."""
    nt, bn = t.keep.shape[0], t.block_n
    squeezed = getattr(pl, "squeezed", None)
    per = SUPER // CHUNK
    if t.is_int4:
        args = [t.values, t.keep, t.scales]
        specs = [
            pl.BlockSpec((squeezed, squeezed, bn, 16), lambda s, i: (i, s, 0, 0)),
            pl.BlockSpec((squeezed, squeezed, bn, 16), lambda s, i: (i, s, 0, 0)),
            pl.BlockSpec((squeezed, t.scales.shape[1], bn, 1), lambda s, i: (i, 0, 0, 0)),
        ]
    else:
        args = [t.values, t.keep]
        specs = [
            pl.BlockSpec((squeezed, per, bn, 16), lambda s, i: (i, s, 0, 0)),
            pl.BlockSpec((squeezed, squeezed, bn, 16), lambda s, i: (i, s, 0, 0)),
        ]

    def kern(*refs):
        s_ref = refs[2] if t.is_int4 else None
        _dequant_kernel(refs[0], refs[1], s_ref, refs[-1], group=t.group, interpret=interpret)

    w4 = D.pallas_gpu_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((t.kw // 4, 4, t.np_), jnp.bfloat16),
        grid=(t.kw // SUPER, nt),
        in_specs=specs,
        out_specs=pl.BlockSpec((SUPER // 4, 4, bn), lambda s, i: (s, 0, i)),
        interpret=interpret,
        num_warps=4,
        num_stages=1,
        name="sparse24_tc_dequant",
    )(*args)
    return w4.reshape(t.kw, t.np_)


def tc24_linear(x, t: Tc24, *, path="auto", interpret=None, **tuning):
    """``x[..., K] @ W`` for a :class:`Tc24`; the dispatch entry point (``x.dtype`` out).
    ``path``: see :func:`.driver.decode_or_prefill`; ``tuning``: :func:`tc24_matmul`'s."""
    return D.decode_or_prefill(
        x, t, tc24_matmul, dequantize_24_tc, max_m=MAX_M, path=path, interpret=interpret, **tuning
    )


D.register_packed(Tc24, tc24_linear, tc24_matmul_ref)
