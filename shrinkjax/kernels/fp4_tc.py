"""Pallas kernel (Triton lowering): MXFP4 / NVFP4 ``y = x @ W`` for decode (M <= 128) with the
weight as the tensor-core *left* operand, decoded to f16 pairs in registers. The recipe of
:mod:`shrinkjax.kernels.int4_tc` (swapped operands, one contiguous block per loop step, scales
prefetched a step ahead, chained dots) carried over to E2M1 codes; larger M runs
:func:`dequantize_fp4_tc` (Pallas, bit-exact) + cuBLAS.

* **E2M1 -> f16 by bit placement.** With the sign at bit 15 and the three magnitude bits
  ``e1 e0 m`` at bits 9-11, an f16 holds exactly ``e2m1 * 2**-14`` (codes +-0.5 land on f16
  subnormals, which the tensor cores keep). The packing puts the bits where a pair needs them:
  per 16-bit half, the magnitudes of its four codes at bits ``9 - 3 i .. 11 - 3 i`` and their
  signs at bit ``15 - i`` (``i`` = pair 0..3), so pair 0 is one ``and`` and pairs 1-3 are
  ``shl, shl, and, lop3``: 13 instructions per 8 weights. (No placement does better: the
  pattern {9, 10, 11, 15} of a half does not tile 16 bits by shifts, nor by rotations.)
* **x in f16** (XLA converts it; in the kernel each slab would round-trip through shared
  memory). bf16 -> f16 is exact for ``2**-14 <= |x| <= 65504``; smaller values keep
  ``>= 2**-24`` absolute precision, larger ones overflow (linear-layer inputs of the models here
  stay far below).
* **Scales, two modes.** ``"late"``: each scale group's chained dots (MXFP4: 2 per 32 rows,
  NVFP4: 1 per 16) give an f32 partial scaled into the accumulator (one FMA per accumulator
  element per group, and a dot wait per group). ``"columns"`` (M <= 8; the default up to
  ``COLUMNS_AUTO_M``: M = 1 for MXFP4, M <= 2 for NVFP4):
  the eight groups of a step go to eight *columns* of the MMA per token: XLA spreads x into
  ``xg [Kw, 8 Mc]`` (``Mc`` = M rounded up to a power of two), column ``8 m + c`` holding token
  m's x on the rows of groups ``g % 8 == c`` (zero elsewhere), so all dots of a step chain into
  one ``[bn, 8 Mc]`` partial whose columns are the group sums; one FMA with the step's
  ``[bn, 8]`` scale tile (loaded as it is stored, broadcast over the tokens through a
  ``[bn, Mc, 8]`` view; no layout conversion in the SASS) and a sum over the eight groups at
  the end give y. At M = 1 eight times fewer FMAs than ``"late"``, and no waits between dots;
  a step is 128 rows (NVFP4) or 256 (MXFP4, two 128-row blocks). Scaling the decoded f16
  weights instead (one ``mul.f16x2`` per pair) was measured slower: Triton then stages the MMA
  operand through shared memory. MXFP4 scales are ``2**(e - 127 + 14)`` (f32 bits
  ``(e + 14) << 23``, exact for e <= 240), NVFP4's ``e4m3 * 2**14`` (and ``tensor_scale`` on
  the f32 result).

Layout (:class:`TcFP4`, built once per weight by :func:`pack_fp4_tc`, jit-able). ``words`` is
uint32 ``[Np/bn, Kw/128, bn, 16]`` (``Kw`` = K padded to 8 scale groups: 128 rows for NVFP4,
256 for MXFP4): like :class:`~.int4_tc.TcInt4`, K offset ``16 j + 2 u + b`` of a 128-row block
(slab ``j``, pair ``u``, ``b`` in {0, 1}) is in word ``2 u + j // 4`` of its weight row, half
``b`` (bits ``16 b ..``), pair ``i = j % 4`` of that half: magnitude at bits ``16 b + 9 - 3 i``
(3 bits), sign at bit ``16 b + 15 - i``. ``scales`` (uint8 E8M0 or E4M3 bits, as the format
stores them) are ``[Np/bn, Kw/(8 group), bn, 8]``: the eight groups of a step, contiguous per
weight row (padded rows: E8M0 127 / E4M3 0); ``tensor_scale`` f32 scalar (1 for MXFP4).
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
from shrinkjax.kernels.layouts import PackedMXFP4, PackedNVFP4, round_up
from shrinkjax.kernels.reference import _unpack_split_half
from shrinkjax.kernels.split_k import split_k_call
from shrinkjax.kernels.triton_ext import dot_acc

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old jax
    plgpu = None

CHUNK = 128  # K rows per block of words (16 words of 8 codes per weight row)
SLAB = 16  # K rows per MMA (f16 k-step)
GROUPS = 8  # scale groups per step (the scales' innermost axis; "columns" mode's MMA width)
DEFAULT_BLOCK_N = 128
MAX_M = 128  # tokens per call: the MMA's N side (8 to 128 wide, driver.mma_tokens)
COLUMNS_MAX_M = 8  # "columns" mode: 8 MMA columns per token, at most 64 wide
# "auto" runs "columns" up to this M, "late" above. H100 probe at 8192² (ninth session, since
# "late" with 2 warps takes an 8-wide MMA at M <= 8, driver.mma_tokens; x read in place,
# probe_fp4_n8.json), columns vs late: MXFP4 17.5 / 17.4 µs at M = 1, > 20 / 17.6 at M = 2;
# NVFP4 19.0 / > 21 at M = 1, 21.3 / 20.7 at M = 2, > 25 / 21.0 at M = 4. (With a 16-wide MMA,
# fifth session: MXFP4 20.5 / 22.2 at M = 2; NVFP4 25.5 / 28.3 at M = 4.)
COLUMNS_AUTO_M = {"mxfp4": 1, "nvfp4": 2}
FORMATS = {"mxfp4": 32, "nvfp4": 16}  # format -> K rows per scale
SCALE_MODES = ("auto", "late", "columns")
# Where x comes from (``x_in``): "xla" (default) has XLA make the kernel's x before the call,
# f16 x for "late" mode or the spread xg (group_columns) for "columns" (in a model this fuses
# into x's producer); "kernel" reads bf16 x and converts (and spreads) each slab in registers:
# no XLA kernel before the matmul. Taken inside dispatch.opaque_input() (x from a kernel XLA
# cannot fuse into: the Llama o_proj, or a standalone call) in "late" mode up to OPAQUE_MAX_M
# rows and in "columns" mode at M = 1. H100, 8192²: "late" with 2 warps, MXFP4 M = 4 / 16
# 20.3 / 22.4 against 20.4 / 22.8 µs (with 4 warps, wgmma, the converted x goes through shared
# memory and "kernel" was slower: 23.7 / 25.4 against 22.4 / 24.3); "columns" at M = 1, MXFP4
# 17.6 against 18.7, NVFP4 18.5 against 19.3 (probe_fp4_columns_xin.json); at M = 4 the
# in-kernel spread over four tokens' columns was slower (NVFP4 > 30 against 26.8).
X_IN_MODES = ("xla", "kernel")
OPAQUE_MAX_M = 16
# "late" mode up to this M: 2 warps (Triton's mma.sync, its operands in registers, instead of
# wgmma, which waits and fences after every dot; see int4_tc). H100 probe at 8192²
# (probe_fp4_xin_warps.json): MXFP4 M = 4 / 16 20.4 / 22.8 against 22.4 / 25.0 µs with 4,
# NVFP4 M = 16 29.0 against 30.4. "columns" mode keeps 4 (2 did not help at M = 1).
LATE_FEW_TOKENS = 16
# NVFP4 in "late" mode up to this M (the 8-wide mma.sync tile): twice the K splits and 2 stages.
# H100 probe (ninth session, probe_late_split.json), M = 4, doubled vs default split: 8192²
# 21.1 / 22.8 µs, 4096 x 14336 19.8 / 21.6, 4096² 9.6 / 10.8. At M = 16 the default won on two
# of three shapes, and for MXFP4 on all three.
NVFP4_FEW_TOKENS = 8
_MAG_MASK = 0x0E000E00  # bits 9-11 of both halves
_SIGN_MASK = 0x80008000


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["words", "scales", "tensor_scale"],
    meta_fields=["k", "n", "fmt", "block_n"],
)
@dataclasses.dataclass(frozen=True)
class TcFP4(D.TcLayout):
    """MXFP4 / NVFP4 weight in :mod:`fp4_tc`'s layout (module docstring)."""

    STREAM, STEP_ROWS = "words", CHUNK  # (driver.TcLayout: kw, np_)

    words: jax.Array  # uint32 [Np/bn, Kw/128, bn, 16]
    scales: jax.Array  # uint8 [Np/bn, Gw, bn, 1]: E8M0 (mxfp4) or E4M3 bits (nvfp4)
    tensor_scale: jax.Array  # f32 scalar (1.0 for mxfp4)
    k: int
    n: int
    fmt: str  # "mxfp4" or "nvfp4"
    block_n: int

    @property
    def group(self) -> int:
        return FORMATS[self.fmt]

    @property
    def step_rows(self) -> int:
        """K rows per scale step (eight groups): 128 (NVFP4) or 256 (MXFP4)."""
        return GROUPS * self.group


def word_bits(i: int, b: int) -> tuple[int, int]:
    """(magnitude shift, sign bit) of pair ``i`` (0-3), half ``b`` (0-1) in a word."""
    return 16 * b + 9 - 3 * i, 16 * b + 15 - i


@functools.partial(jax.jit, static_argnames=("block_n",))
def pack_fp4_tc(p: PackedMXFP4 | PackedNVFP4, block_n: int = DEFAULT_BLOCK_N) -> TcFP4:
    """One-time conversion of a :class:`PackedMXFP4` / :class:`PackedNVFP4` (pure XLA)."""
    if not isinstance(p, PackedMXFP4 | PackedNVFP4):
        raise TypeError(f"pack_fp4_tc converts PackedMXFP4 or PackedNVFP4, got {type(p).__name__}")
    if p.np_ % block_n or block_n % 64:
        raise ValueError(f"block_n {block_n} must be a multiple of 64 dividing Np={p.np_}")
    nv = isinstance(p, PackedNVFP4)
    fmt = "nvfp4" if nv else "mxfp4"
    codes = _unpack_split_half(p.codes, p.pair).astype(jnp.uint32)  # [Kp, Np]
    kp, np_ = codes.shape
    g = FORMATS[fmt]
    kw = round_up(kp, GROUPS * g)
    q = jnp.pad(codes, ((0, kw - kp), (0, 0))).T  # [Np, Kw]; padded rows: code 0 = +0
    q = q.reshape(np_, kw // CHUNK, 2, 4, 8, 2)  # [n, t, e, i = j % 4, u, b]
    i = jnp.arange(4, dtype=jnp.uint32)[:, None]
    b = jnp.arange(2, dtype=jnp.uint32)[None, :]
    mag_sh, sign_sh = 16 * b + 9 - 3 * i, 16 * b + 15 - i  # [4, 2] (word_bits)
    bits = ((q & 7) << mag_sh[:, None, :]) | ((q >> 3) << sign_sh[:, None, :])
    w = jnp.sum(bits, axis=(3, 5), dtype=jnp.uint32)  # disjoint bits: sum == or
    w = jnp.transpose(w, (0, 1, 3, 2)).reshape(np_ // block_n, block_n, kw // CHUNK, 16)
    w = jnp.transpose(w, (0, 2, 1, 3))  # [tile, chunk, row, word 2u + e]
    pad = ((0, kw // g - p.scales.shape[0]), (0, 0))
    s = jnp.pad(p.scales, pad, constant_values=0 if nv else 127)  # padded rows: codes are 0
    s = s.reshape(kw // g // GROUPS, GROUPS, np_ // block_n, block_n)
    s = jnp.transpose(s, (2, 0, 3, 1))  # [tile, step, row, group of the step]
    ts = p.tensor_scale.astype(jnp.float32) if nv else jnp.float32(1.0)
    return TcFP4(w, s, ts, k=p.k, n=p.n, fmt=fmt, block_n=block_n)


def _pair_ptx(i: int, src: str) -> str:
    """PTX writing pair ``i``'s f16x2 (``e2m1 * 2**-14``) of word ``src`` into ``d``."""
    if i == 0:
        return f"and.b32 d, {src}, {(_SIGN_MASK | _MAG_MASK):#x}; "
    return (
        f"shl.b32 a, {src}, {3 * i}; shl.b32 s, {src}, {i}; and.b32 a, a, {_MAG_MASK:#x}; "
        f"lop3.b32 d, a, s, {_SIGN_MASK:#x}, 0xF8; "  # d = a | (s & SIGN)
    )


def _decode_asm(w):
    """uint32 [bn, 16] -> eight f16 [bn, 16] slabs of ``e2m1 * 2**-14`` (inline PTX, two words
    per instance; one asm op per slab: jax's Pallas lowering returns one result per op)."""
    out = []
    for j in range(8):
        (tile,) = plgpu.elementwise_inline_asm(
            "{ .reg .b32 a, s, d; "
            + _pair_ptx(j % 4, "$1" if j < 4 else "$2")
            + "mov.b32 $0, d; }",
            args=[w],
            constraints="=r,r,r",
            pack=2,
            result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.float16)],
        )
        out.append(tile)
    return out


def _decode_jnp(w):
    """Same as :func:`_decode_asm` in jnp (interpret mode / CPU, and the tests)."""
    out = []
    for j in range(8):
        src = w[:, j // 4 :: 2]  # [bn, 8]: word 2u + j // 4
        halves = []
        for b in range(2):
            mag_sh, sign_sh = word_bits(j % 4, b)
            h = (((src >> mag_sh) & 7) << 9) | (((src >> sign_sh) & 1) << 15)
            halves.append(jax.lax.bitcast_convert_type(h.astype(jnp.uint16), jnp.float16))
        out.append(jnp.stack(halves, axis=-1).reshape(w.shape))
    return out


def e8m0_scale(e):
    """uint8 E8M0 -> f32 ``2**(e - 127 + 14)`` (exact for e <= 240): undoes the decode's 2**-14."""
    return jax.lax.bitcast_convert_type((e.astype(jnp.uint32) + 14) << 23, jnp.float32)


def e4m3_value(b):
    """uint8 E4M3 bits -> f32 value (f16 bits ``s << 15 | em << 7`` = ``e4m3 * 2**-8``, exact)."""
    b = b.astype(jnp.uint32)
    h = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(h, jnp.float16).astype(jnp.float32) * 256.0


def scale_f32(s, group: int):
    """Stored scale bytes -> the f32 factor for the decode's ``e2m1 * 2**-14`` partial sums."""
    return e4m3_value(s) * 2.0**14 if group == 16 else e8m0_scale(s)


def _kernel(
    x_ref, ts_ref, w_ref, s_ref, *, m, mp, steps, group, columns, interpret, x_prefetch=True,
    x_in="xla", use_first=True,
):  # fmt: skip
    """One program: ``bn`` weight rows, ``steps`` 128-row blocks (``"late"``; x_ref ``[mp, Kw]``
    in f16, or bf16 converted here) or scale steps of eight groups (``"columns"``; x_ref is then
    ``xg [Kw, 8 Mc]``, the result ``[Mc, bn]``, or ``[16, bn]`` at Mc = 1; with ``x_in="kernel"``
    x ``[Mc, Kw]`` in bf16 instead, each slab spread into its group's columns here). Returns
    the program's f32 ``[mp, bn]`` partial of y (token-major).

    ``use_first``: the values a loop step loads for the next (scales; x in ``"columns"``) are
    widened to 32 bits at the load and converted at the top of the next step, before its own
    loads issue. As int4_tc's loop found with ncu, ptxas otherwise waits for those loads within
    the step that issued them. H100, 8192² (tenth session, ``prefetch_fp4s24_{old,new}_tenth``):
    MXFP4 M = 1 17.7 -> 16.6 µs, NVFP4 M = 1 18.7 -> 17.1, M = 16 29.0 -> 25.8; but NVFP4
    "late" at M = 4 (:func:`_nvfp4_few`'s doubled split) 21.1 -> 22.4, so not there."""
    sid = pl.program_id(1)
    decode = _decode_jnp if interpret else _decode_asm
    bn = w_ref.shape[1]
    last = sid * steps + steps - 1

    if columns:  # the eight groups of a step are eight MMA columns per token
        blocks = GROUPS * group // CHUNK  # 128-row blocks per step: 1 or 2
        # tokens in the MMA (M rounded up to a power of two)
        mc = x_ref.shape[0] if x_in == "kernel" else x_ref.shape[1] // GROUPS

        def xg_slab(k0, c):  # xg[k0:k0+16] from x [Mc, Kw]: x^T in columns 8 m + c, else 0
            view = x_ref.at[:, pl.ds(pl.multiple_of(k0, SLAB), SLAB)]
            return xg_columns(D.token_rows(view, m).astype(jnp.float16).T, c)

        def xg_columns(xt, c):  # x^T [16, Mc] f16 -> [16, 8 Mc]: columns 8 m + c, else 0
            col = jax.lax.broadcasted_iota(jnp.int32, (SLAB, mc, GROUPS), 2)
            xg = jnp.where(col == c, xt[:, :, None], jnp.zeros((), jnp.float16))
            return xg.reshape(SLAB, mc * GROUPS)

        def operands(t, raw=False):  # step t's scale tile f32 [bn, 8] and xg slabs [16, 8 Mc]
            xs = []  # (loaded a step ahead: 2 Mc bytes per thread per slab, too small for
            for j in range(GROUPS * group // SLAB):  # cp.async, how Triton pipelines dots)
                k0 = t * GROUPS * group + SLAB * j
                if x_in == "kernel" and raw:  # x [Mc, 16] as loaded, widened (ready())
                    view = x_ref.at[:, pl.ds(pl.multiple_of(k0, SLAB), SLAB)]
                    xs.append(D.widen_bits(D.token_rows(view, m)))
                elif x_in == "kernel":  # slab j lies in group (16 j) // group of the step
                    xs.append(xg_slab(k0, SLAB * j // group))
                else:
                    xk = x_ref[pl.ds(pl.multiple_of(k0, SLAB), SLAB), :]
                    xs.append(D.widen_bits(xk) if raw else xk)
            return (s_ref[t], xs) if raw else (scale_f32(s_ref[t], group), xs)

        def ready(loaded):  # operands(t, raw=True) -> operands(t)
            s_raw, xs = loaded
            out = []
            for j, w in enumerate(xs):
                if x_in == "kernel":
                    xt = D.bf16_bits_to_f32(w).astype(jnp.float16).T  # [16, Mc]
                    out.append(xg_columns(xt, SLAB * j // group))
                else:
                    out.append(D.f16_bits_to_f16(w))
            return scale_f32(s_raw, group), out

        first_use = x_prefetch and use_first

        def body(i, carry):
            acc, cur = carry
            t = sid * steps + i
            # this step's loaded values converted before the next step's loads issue (see
            # int4_tc's loop: ptxas shares scoreboards between loads)
            sc, xs = ready(cur) if first_use else cur
            nxt = operands(jnp.minimum(t + 1, last), raw=first_use)
            if not x_prefetch:  # slabs loaded at use: Triton pipelines them (cp.async)
                xs = operands(t)[1]
            part = jnp.zeros((bn, GROUPS * mc), jnp.float32)
            for b in range(blocks):
                tiles = decode(w_ref[t * blocks + b])
                for j in range(8):
                    part = dot_acc(tiles[j], xs[8 * b + j], part)
            if mc == 1:
                return acc + part * sc, nxt
            # column 8 m + c -> [bn, m, c]: each token's 8 columns take the same scale tile
            return acc + part.reshape(bn, mc, GROUPS) * sc[:, None, :], nxt

        acc0 = jnp.zeros((bn, GROUPS) if mc == 1 else (bn, mc, GROUPS), jnp.float32)
        acc, _ = jax.lax.fori_loop(0, steps, body, (acc0, operands(sid * steps, raw=first_use)))
        y = jnp.sum(acc, axis=-1 if mc > 1 else 1, keepdims=mc == 1).T  # [Mc, bn]
        if mc == 1:
            y = jnp.broadcast_to(y, (mp, bn))
    else:
        gpc = CHUNK // group  # scale groups per 128-row block: 4 or 8

        def x_slab(k0):  # x[0:mp, k0:k0+16]^T: the MMA's right operand; rows >= M read 0
            view = x_ref.at[:, pl.ds(pl.multiple_of(k0, SLAB), SLAB)]
            return D.token_rows(view, m).astype(jnp.float16).T

        def scales(t):  # block t's groups: f32 [bn, 1] each (a column of the stored tile)
            out = []
            for c in range(gpc):
                g = t * gpc + c
                col = s_ref.at[D.idiv(g, GROUPS), :, pl.ds(g % GROUPS, 1)]
                out.append(D.widen_bits(col[...]) if use_first else scale_f32(col[...], group))
            return out

        def body(i, carry):
            acc, cur = carry
            t = sid * steps + i
            if use_first:  # converted before the next block's loads issue
                cur = [scale_f32(c, group) for c in cur]
            nxt = scales(jnp.minimum(t + 1, last))  # issued a block ahead (Triton does not
            tiles = decode(w_ref[t])  # pipeline them: they are not tensor-core operands)
            spg = group // SLAB  # slabs per group
            for c in range(gpc):
                part = jnp.zeros(acc.shape, jnp.float32)
                for j in range(c * spg, (c + 1) * spg):
                    part = dot_acc(tiles[j], x_slab(t * CHUNK + SLAB * j), part)
                acc = acc + part * cur[c]
            return acc, nxt

        acc0 = jnp.zeros((bn, mp), jnp.float32)
        acc, _ = jax.lax.fori_loop(0, steps, body, (acc0, scales(sid * steps)))
        y = acc.T
    if group == 16:  # NVFP4: the f32 tensor scale
        y = y * ts_ref[...]
    return y


def group_columns(x, group: int, mc: int = 1):
    """f16 ``xg [Kw, 8 mc]`` for ``"columns"`` mode from x ``[M, Kw]`` (M <= mc): column
    ``8 m + c`` holds token m's x on the rows of scale groups ``g`` with ``g % 8 == c``, zero
    elsewhere and for tokens ``m >= M`` (XLA, one small fusion)."""
    m, kw = x.shape
    col = (jnp.arange(kw) // group) % GROUPS
    onehot = col[:, None] == jnp.arange(GROUPS)[None, :]  # [Kw, 8]
    xt = jnp.pad(x.T, ((0, 0), (0, mc - m)))  # [Kw, mc]
    xg = jnp.where(onehot[:, None, :], xt[:, :, None], 0)  # [Kw, mc, 8]
    return xg.reshape(kw, mc * GROUPS).astype(jnp.float16)


@functools.partial(
    jax.jit,
    static_argnames=(
        "split_k", "num_warps", "num_stages", "scale_mode", "x_prefetch", "out_dtype", "interpret",
        "x_in",
    ),
)  # fmt: skip
def _fp4_tc_2d(
    x2, t: TcFP4, *, split_k, num_warps, num_stages, interpret, scale_mode="auto",
    x_prefetch=True, out_dtype=None, x_in="xla",
):  # fmt: skip
    """f32 ``[M, N]`` (``out_dtype`` when ``split_k`` is 1: written by the kernel;
    :func:`.split_k.split_k_call`). ``x_in``: see ``X_IN_MODES``."""
    m = x2.shape[0]
    if m > MAX_M:
        raise ValueError(f"fp4_tc takes M <= {MAX_M} rows, got {m}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    columns = use_columns(scale_mode, m, t.fmt)
    if columns and m > COLUMNS_MAX_M:
        raise ValueError(
            f"scale_mode 'columns' takes at most {COLUMNS_MAX_M} rows of x (8 MMA columns per "
            f"token), got M = {m}"
        )
    if x_in not in X_IN_MODES:
        raise ValueError(f"x_in must be one of {X_IN_MODES}, got {x_in!r}")
    np_, kw, bn = t.np_, t.kw, t.block_n
    unit = t.step_rows if columns else CHUNK  # K rows per loop iteration
    if (kw // unit) % split_k:
        raise ValueError(f"split_k {split_k} must divide the {kw // unit} K steps of {unit} rows")
    xh = x2.astype(jnp.bfloat16 if x_in == "kernel" else jnp.float16)  # (module docstring)
    if kw != t.k:
        xh = jnp.pad(xh, ((0, 0), (0, kw - t.k)))
    squeezed = getattr(pl, "squeezed", None)
    mp = D.mma_tokens(m, num_warps)  # the MMA's token side ("late")
    ts = jnp.reshape(t.tensor_scale.astype(jnp.float32), (1, 1))
    if columns:
        mc = 1 << (m - 1).bit_length()  # tokens in the MMA
        mp = SLAB if mc == 1 else mc  # the output block's rows (M = 1: y broadcast, as tuned)
        if x_in == "kernel":  # x itself, rows >= M masked; spread into columns in the kernel
            x_spec = pl.BlockSpec((mc, kw), lambda j, s: (0, 0))
        else:
            xh = group_columns(xh, t.group, mc)
            x_spec = pl.BlockSpec((kw, GROUPS * mc), lambda j, s: (0, 0))
    else:
        x_spec = pl.BlockSpec((mp, kw), lambda j, s: (0, 0))  # rows >= M: masked
    steps = kw // unit // split_k
    body = functools.partial(
        _kernel, m=m, mp=mp, steps=steps, group=t.group, columns=columns, interpret=interpret,
        x_prefetch=x_prefetch, x_in=x_in, use_first=not _nvfp4_few(t, columns, m),
    )  # fmt: skip
    chunks, gs = kw // CHUNK, t.scales.shape[1]
    in_specs = [
        x_spec,
        pl.BlockSpec((1, 1), lambda j, s: (0, 0)),
        pl.BlockSpec((squeezed, chunks, bn, 16), lambda j, s: (j, 0, 0, 0)),
        pl.BlockSpec((squeezed, gs, bn, GROUPS), lambda j, s: (j, 0, 0, 0)),
    ]
    y = split_k_call(
        body, [xh, ts, t.words, t.scales], in_specs, m=m, mp=mp, bn=bn, np_=np_,
        split_k=split_k, out_dtype=jnp.float32 if out_dtype is None else out_dtype,
        interpret=interpret, num_warps=num_warps, num_stages=num_stages,
        name=f"{t.fmt}_tc_{'col' if columns else 'late'}_s{split_k}_k{kw}n{np_}m{mp}",
    )  # fmt: skip
    return y if np_ == t.n else y[:, : t.n]


def use_columns(scale_mode: str, m: int, fmt: str) -> bool:
    """Whether ``scale_mode`` runs the ``"columns"`` kernel for M rows of x in ``fmt``."""
    return scale_mode == "columns" or (scale_mode == "auto" and m <= COLUMNS_AUTO_M[fmt])


def default_split(t: TcFP4, columns: bool = True, m: int = 1) -> int:
    """K splits, in loop steps of the scale mode. ``"late"``: about two programs per SM and at
    least four 128-row blocks each (as :func:`.int4_tc.default_split`); ``"columns"``: up to
    four programs per SM and at least two blocks each (H100 probe, ``scripts/probe_tc.py``:
    MXFP4 4096 x 4096 at M = 1 in 8.3 µs at 16 splits, 9.3 µs at 8), halved from M = 3 on
    (four tokens' 32 columns: 181 registers, two programs per SM; NVFP4 8192² at M = 4:
    25.5 µs halved, 29.0 not). NVFP4 "late" at ``m <= NVFP4_FEW_TOKENS``: doubled.

    Not kept (tenth session, commit 468ef24): NVFP4 "columns" at M = 1 doubled with 2 stages. A
    probe with 2 warps had it at 17.2 µs at 8192² against 18.1 for the default with x from XLA;
    with the default 4 warps and x in place the grid then took 18.9, against 17.1 for this rule
    in an earlier call (``benchmarks/RESULTS.md``, tenth session)."""
    unit = t.step_rows if columns else CHUNK
    per_sm, min_blocks = (4, 2) if columns else (2, 4)
    min_steps = max(1, min_blocks * CHUNK // unit)
    split = D.split_for(
        t.words.shape[0], t.kw // unit, per_sm=per_sm, min_steps=min_steps, at_most=columns
    )
    if _nvfp4_few(t, columns, m) and (t.kw // unit) % (2 * split) == 0:
        return 2 * split
    return max(1, split // 2) if columns and m > 2 else split


def _nvfp4_few(t: TcFP4, columns: bool, m: int) -> bool:
    return t.fmt == "nvfp4" and not columns and m <= NVFP4_FEW_TOKENS


def default_stages(t: TcFP4, columns: bool, m: int = 1) -> int:
    """Pipeline stages: 2 for MXFP4's 256-row columns steps (H100: 18.7 vs 19.4 µs at 8192²,
    M = 1) and for NVFP4 "late" at ``m <= NVFP4_FEW_TOKENS``, else 3."""
    return 2 if (columns and t.fmt == "mxfp4") or _nvfp4_few(t, columns, m) else 3


def default_x_in(columns: bool, m: int = 1) -> str:
    """``"kernel"`` inside :func:`.dispatch.opaque_input` in ``"late"`` mode at ``m <=
    OPAQUE_MAX_M`` and in ``"columns"`` mode at ``m == 1``, else ``"xla"`` (``X_IN_MODES``)."""
    opaque = dispatch.input_is_opaque() and m <= (1 if columns else OPAQUE_MAX_M)
    return "kernel" if opaque else "xla"


def default_warps(columns: bool, m: int = 1) -> int:
    """2 (``mma.sync``) in ``"late"`` mode at ``m <= LATE_FEW_TOKENS``, else 4 (``wgmma``)."""
    return 2 if not columns and m <= LATE_FEW_TOKENS else 4


def resolve_tiles(
    t: TcFP4, m: int, *, scale_mode="auto", split_k=None, num_warps=None, num_stages=None,
    x_in=None,
) -> dict:  # fmt: skip
    """:func:`_fp4_tc_2d`'s keywords for ``m`` rows of x: the scale mode ``"auto"`` resolves
    to (:func:`use_columns`), the given tiles, and the defaults (:func:`default_split`,
    :func:`default_warps`, :func:`default_stages`, :func:`default_x_in`) for those left None."""
    if scale_mode not in SCALE_MODES:  # (before "auto" resolves it)
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    columns = use_columns(scale_mode, m, t.fmt)
    return dict(
        split_k=default_split(t, columns, m) if split_k is None else split_k,
        num_warps=default_warps(columns, m) if num_warps is None else num_warps,
        num_stages=default_stages(t, columns, m) if num_stages is None else num_stages,
        scale_mode="columns" if columns else "late",
        x_in=default_x_in(columns, m) if x_in is None else x_in,
    )


def fp4_tc_matmul(
    x, t: TcFP4, *, split_k=None, num_warps=None, num_stages=None, scale_mode="auto",
    x_prefetch=True, x_in=None, interpret=None,
):  # fmt: skip
    """``x[..., K] @ W`` for a :class:`TcFP4` weight and at most 128 rows of x; ``x.dtype``.
    ``scale_mode``: ``"auto"``, ``"late"`` or ``"columns"`` (M <= 8; module docstring);
    ``split_k`` / ``num_warps`` / ``num_stages`` / ``x_in``: None for the defaults
    (:func:`resolve_tiles`).
    ``x_prefetch`` (``"columns"``): the x slabs of the next step are loaded a step ahead into
    registers (the measured default); False loads them at use, which Triton pipelines through
    shared memory: at M = 4 (MXFP4, block_n 128) 124 registers instead of 181, so four
    programs per SM instead of two, for 759 loop instructions instead of 710 (offline SASS,
    ``scripts/triton_sass.py``; not yet timed on a GPU)."""
    given = dict(split_k=split_k, num_warps=num_warps, num_stages=num_stages, x_in=x_in)
    kw = resolve_tiles(t, math.prod(x.shape[:-1]), scale_mode=scale_mode, **given)
    return D.call_2d(_fp4_tc_2d, x, t, x_prefetch=x_prefetch, interpret=interpret, **kw)


# ------------------------------------------------------------------------------------------
# dequantize (reference and prefill path) and dispatch
# ------------------------------------------------------------------------------------------


def _codes_nk(t: TcFP4):
    """uint32 E2M1 codes [Np, Kw] (the inverse of :func:`pack_fp4_tc`'s bit placement)."""
    nt, chunks, bn, _ = t.words.shape
    w = t.words.reshape(nt, chunks, bn, 8, 2)  # [tile, t, row, u, e]
    i = jnp.arange(4, dtype=jnp.uint32)[:, None]
    b = jnp.arange(2, dtype=jnp.uint32)[None, :]
    mag = (w[..., None, None] >> (16 * b + 9 - 3 * i)) & 7  # [tile, t, row, u, e, i, b]
    sign = (w[..., None, None] >> (16 * b + 15 - i)) & 1
    q = jnp.transpose(mag | (sign << 3), (0, 2, 1, 4, 5, 3, 6))  # [tile, row, t, e, i, u, b]
    return q.reshape(nt * bn, chunks * CHUNK)


def dequantize_fp4_tc_ref(t: TcFP4):
    """bf16 ``W [K, N]`` (pure jnp; bit-identical to the Packed{MX,NV}FP4 reference)."""
    from shrinkjax.kernels.reference import _e2m1, e4m3_to_f32

    s = jnp.transpose(t.scales, (0, 2, 1, 3)).reshape(t.np_, -1)  # [Np, Gw]
    s = jnp.repeat(s, t.group, axis=1)[:, : t.kw]
    if t.fmt == "mxfp4":
        w = _e2m1(_codes_nk(t)) * jnp.exp2(s.astype(jnp.float32) - 127.0)
    else:
        w = _e2m1(_codes_nk(t)) * e4m3_to_f32(s) * t.tensor_scale
    return w.astype(jnp.bfloat16)[: t.n, : t.k].T


def fp4_tc_matmul_ref(x2, t: TcFP4):
    """The reference ``x @ W`` (NVFP4: tensor scale on the f32 result, as the kernel does)."""
    from shrinkjax.kernels.reference import _mm

    if t.fmt == "mxfp4":
        return _mm(x2, dequantize_fp4_tc_ref(t))
    t1 = dataclasses.replace(t, tensor_scale=jnp.float32(1.0))
    return _mm(x2, dequantize_fp4_tc_ref(t1), t.tensor_scale)


def _dequant_kernel(ts_ref, w_ref, s_ref, o_ref, *, group, interpret):
    t = pl.program_id(0)
    tiles = (_decode_jnp if interpret else _decode_asm)(w_ref[...])
    for j in range(8):
        g = D.idiv(t * CHUNK + SLAB * j, group)
        s = scale_f32(s_ref.at[D.idiv(g, GROUPS), :, pl.ds(g % GROUPS, 1)][...], group)
        w = tiles[j].astype(jnp.float32) * s  # exact: e2m1 times a power of two / an e4m3
        if group == 16:  # f32(e2m1 * e4m3) * tensor_scale, as reference.dequantize rounds it
            w = w * ts_ref[...]
        o_ref[pl.ds(SLAB * j, SLAB), :] = w.astype(o_ref.dtype).T


@functools.partial(jax.jit, static_argnames=("interpret",))
def dequantize_fp4_tc(t: TcFP4, interpret=False):
    """bf16 ``W [Kw, Np]`` (K-major; tensor scale folded in) by a Pallas kernel: one program per
    128-row chunk and tile."""
    nt, chunks, bn, _ = t.words.shape
    gs = t.scales.shape[1]
    squeezed = getattr(pl, "squeezed", None)
    ts = jnp.reshape(t.tensor_scale.astype(jnp.float32), (1, 1))
    return D.pallas_gpu_call(
        functools.partial(_dequant_kernel, group=t.group, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((t.kw, t.np_), jnp.bfloat16),
        grid=(chunks, nt),
        in_specs=[
            pl.BlockSpec((1, 1), lambda c, i: (0, 0)),
            pl.BlockSpec((squeezed, squeezed, bn, 16), lambda c, i: (i, c, 0, 0)),
            pl.BlockSpec((squeezed, gs, bn, GROUPS), lambda c, i: (i, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((CHUNK, bn), lambda c, i: (c, i)),
        interpret=interpret,
        num_warps=4,
        num_stages=1,
        name=f"{t.fmt}_tc_dequant",
    )(ts, t.words, t.scales)


def fp4_tc_linear(x, t: TcFP4, *, path="auto", interpret=None, **tuning):
    """``x[..., K] @ W`` for a :class:`TcFP4`; the dispatch entry point (``x.dtype`` out).
    ``path``: see :func:`.driver.decode_or_prefill`; ``tuning``: :func:`fp4_tc_matmul`'s."""
    return D.decode_or_prefill(
        x,
        t,
        fp4_tc_matmul,
        dequantize_fp4_tc,
        max_m=MAX_M,
        path=path,
        interpret=interpret,
        **tuning,
    )


D.register_packed(TcFP4, fp4_tc_linear, fp4_tc_matmul_ref)
