"""Experimental Pallas kernel: ``y = x @ W`` for int4 group-quantized W at M <= 4, decoding
32-bit words instead of bytes. Not dispatched: measured no faster than the fused kernel.
Superseded by :mod:`shrinkjax.kernels.int4_tc`, which found the limit this probe missed: the
scale loads inside the loop (not pipelined by Triton) and the strided weight blocks.

The question it answers. At M = 1 the fused int4 kernel (:mod:`shrinkjax.kernels.int_matmul`)
streams an 8192 x 8192 g128 weight at 0.43 of the copy bandwidth (27 µs on an H100; the issue
asks for 0.75). Is that the memory system or the arithmetic after each load? ``load_only=True``
keeps this kernel's weight loads, grid and tiles but drops the scale loads and replaces the
decode with one FMA per word (a wrong result, for timing only): 14.9-16.5 µs, 0.73-0.76 of the
copy bandwidth. So the loads can meet the target; the time goes to what follows them.

The decode here is short. Each thread loads ``uint32`` words — the same bytes as
:class:`~shrinkjax.kernels.layouts.PackedInt`, four columns at a time — and makes each of the 8
nibbles an f32 in two integer operations, with no int->float conversion:

    f32 bits = ((word >> (8c + 4h - 16)) & 0x000F0000) | 0x43000000   ==  128 + q   (exact)

(byte ``c`` of the word is column ``4i + c``; nibble ``h`` is K row ``k + h D`` of the layout's
split-half pairs). Then ``w = f * s + offset`` (``offset = -(128 + z) s``, precomputed) and
``acc += x_k * w``: four instructions per weight. With ``late=True`` the scale moves out of the
loop: ``acc += x_k * f`` accumulates a group, and ``s * acc + offset * sum(x)`` is added once
per group and column: three per weight. Measured (H100, 2026-11-27,
``scripts/probe_int4_gemv.py``, ``benchmarks/results/int4_gemv_probe.json``): 27.1 µs at best
(``late``, block_n 256, rows 16, 4 warps), against 27.0 µs for the fused kernel and 26.9 µs for
``torch._weight_int4pack_mm`` in the same run; 4 instructions per weight 28.0 µs; at M = 4 it
is 2x slower than the fused kernel (the FMA work grows with M). Loading a whole chunk before
its arithmetic, or prefetching the next chunk into registers, made it slower (30-40 µs). The
compiled loop (``scripts/triton_sass.py``) issues ~4.8 instructions per weight (the fused
kernel ~5.8): 10-13 µs of issue time that adds to the 15 µs memory stream instead of hiding
under it. Closing the gap needs ~1-1.5 per weight: packed bf16x2 decode into tensor-core
fragments (``benchmarks/RESULTS.md``, Pallas kernels).

Layouts. Weight: ``PackedInt.qweight`` uint8 ``[Kp/2, Np]`` viewed as uint32 ``[Kp/2, Np/4]``
(little endian: byte ``c`` of word ``i`` = column ``4i + c``; a free bitcast). Scales and
offsets are read as f32 ``[4, Kp/g, Np/4]`` (column ``4i + c`` at ``[c, :, i]``), built by
:func:`gemv_operands` (once per weight if the caller keeps them). Output partials are
``[S, M, 4, Np/4]`` f32, summed over the S K-splits and put back in column order by XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from shrinkjax.kernels import driver as D
from shrinkjax.kernels.layouts import PackedInt

MAX_M = 4  # more rows of x: the f32 FMA work grows with M; tensor cores win


def gemv_operands(p: PackedInt):
    """(uint32 words [Kp/2, Np/4], scales [4, G, Np/4] f32, offsets [4, G, Np/4] f32).

    ``offsets = -(128 + z) * s`` (the FMA's constant; symmetric layouts have ``z = 8``), so
    ``W = f * s + offset`` for ``f = 128 + q``. Pure XLA reshapes/bitcasts of ``p``'s arrays.
    """
    if p.bits != 4:
        raise ValueError(f"int4_gemv needs a 4-bit PackedInt, got bits={p.bits}")
    rows, np_ = p.qweight.shape
    words = jax.lax.bitcast_convert_type(p.qweight.reshape(rows, np_ // 4, 4), jnp.uint32)

    def by_byte(a):  # [G, Np] -> [4, G, Np/4]: column 4i + c at [c, :, i]
        g = a.shape[0]
        return jnp.transpose(a.reshape(g, np_ // 4, 4), (2, 0, 1))

    s = p.scales.astype(jnp.float32)
    z = 8.0 if p.zeros is None else p.zeros.astype(jnp.float32)
    return words, by_byte(s), by_byte(-(z + 128.0) * s)


def _kernel(
    x_ref, w_ref, s_ref, off_ref, o_ref, *, m, pair, group, rows, steps, ks, late, load_only
):
    s_id = pl.program_id(1)
    bn4 = w_ref.shape[1]

    def body(t, acc):
        acc = list(acc)
        k0 = s_id * ks + t * (2 * pair)  # first K row of this chunk (2D rows)
        # the chunk's scale rows, loaded once per chunk: [h][c] -> f32 [1, bn4]
        g = [D.idiv(k0 + h * pair, group) for h in range(2)]
        sc = [[s_ref[c, pl.ds(g[h], 1), :] for c in range(4)] for h in range(2)]
        of = [[off_ref[c, pl.ds(g[h], 1), :] for c in range(4)] for h in range(2)]
        for h in range(2):
            kh = k0 + h * pair  # K row of nibble h
            part = [jnp.zeros((rows, bn4), jnp.float32) for _ in range(4 * m)] if late else acc
            for sub in range(pair // rows):
                r0 = pl.multiple_of(D.idiv(k0, 2) + sub * rows, rows)
                w = w_ref[pl.ds(r0, rows), :]  # uint32 [rows, bn4]
                xrow = pl.ds(pl.multiple_of(kh + sub * rows, rows), rows)
                if load_only:  # probe: loads + one FMA per word, no decode (wrong result)
                    if h == 0:
                        wf = jax.lax.bitcast_convert_type(w & 0x3FFFFFFF, jnp.float32)
                        part[0] = part[0] + x_ref[xrow, pl.ds(0, 1)].astype(jnp.float32) * wf
                    continue
                xs = [x_ref[xrow, pl.ds(r, 1)].astype(jnp.float32) for r in range(m)]  # [rows, 1]
                for c in range(4):
                    sh = 8 * c + 4 * h - 16
                    v = (w << (-sh)) if sh < 0 else ((w >> sh) if sh > 0 else w)
                    f = jax.lax.bitcast_convert_type((v & 0x000F0000) | 0x43000000, jnp.float32)
                    wv = f if late else f * sc[h][c] + of[h][c]  # 128 + q, or (q - z) * s
                    for r in range(m):
                        part[r * 4 + c] = part[r * 4 + c] + xs[r] * wv
            if late and not load_only:  # sum_k x (128 + q) s + (sum_k x) offset, per group
                for r in range(m):
                    xsum = jnp.sum(x_ref[pl.ds(kh, pair), pl.ds(r, 1)].astype(jnp.float32))
                    for c in range(4):
                        j = r * 4 + c  # (the correction is summed over the rows at the end)
                        acc[j] = acc[j] + part[j] * sc[h][c] + (xsum / rows) * of[h][c]
            elif late:
                acc[0] = acc[0] + part[0]
            else:
                acc = part
        return tuple(acc)

    acc0 = tuple(jnp.zeros((rows, bn4), jnp.float32) for _ in range(4 * m))
    acc = jax.lax.fori_loop(0, steps, body, acc0)
    for r in range(m):
        for c in range(4):
            y = jnp.sum(acc[r * 4 + c], axis=0, keepdims=True)
            o_ref[pl.ds(r, 1), pl.ds(c, 1), :] = y[None]


@functools.partial(
    jax.jit,
    static_argnames=(
        "k",
        "n",
        "pair",
        "group",
        "block_n",
        "rows",
        "split_k",
        "num_warps",
        "num_stages",
        "interpret",
        "load_only",
        "late",
    ),
)
def gemv_padded(
    x2,
    words,
    s,
    off,
    *,
    k,
    n,
    pair,
    group,
    block_n,
    rows,
    split_k,
    num_warps,
    num_stages,
    interpret,
    load_only=False,
    late=False,
):
    """``x2[M, K] @ W`` from :func:`gemv_operands`' arrays; f32 ``[M, N]``."""
    m = x2.shape[0]
    kp = words.shape[0] * 2
    np_ = words.shape[1] * 4
    chunk = 2 * pair
    if m > MAX_M:
        raise ValueError(f"int4_gemv takes M <= {MAX_M} rows, got {m}")
    if np_ % block_n or block_n % 4 or block_n < 64:
        raise ValueError(f"block_n {block_n} must be a multiple of 64 dividing Np={np_}")
    if pair % rows:
        raise ValueError(f"rows {rows} must divide the layout's pair distance {pair}")
    if kp % (split_k * chunk):
        raise ValueError(f"split_k {split_k} x chunk {chunk} must divide Kp={kp}")
    ks = kp // split_k
    xt = jnp.swapaxes(jnp.pad(x2, ((0, 0), (0, kp - k))) if kp != k else x2, 0, 1)  # [Kp, M]
    bn4 = block_n // 4
    arrays = [xt, words, s, off]
    g = s.shape[1]
    in_specs = [
        pl.BlockSpec((kp, m), lambda j, si: (0, 0)),
        pl.BlockSpec((kp // 2, bn4), lambda j, si: (0, j)),
        pl.BlockSpec((4, g, bn4), lambda j, si: (0, 0, j)),
        pl.BlockSpec((4, g, bn4), lambda j, si: (0, 0, j)),
    ]
    squeezed = getattr(pl, "squeezed", None)
    kern = functools.partial(
        _kernel,
        m=m,
        pair=pair,
        group=group,
        rows=rows,
        steps=ks // chunk,
        ks=ks,
        late=late,
        load_only=load_only,
    )
    out = D.pallas_gpu_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((split_k, m, 4, np_ // 4), jnp.float32),
        grid=(np_ // block_n, split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((squeezed, m, 4, bn4), lambda j, si: (si, 0, 0, j)),
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        name="int4_gemv",
    )(*arrays)
    y = jnp.transpose(out.sum(axis=0), (0, 2, 1)).reshape(m, np_)  # column 4i + c
    return y[:, :n]


def int4_gemv(
    x,
    p: PackedInt,
    *,
    operands=None,
    interpret=None,
    block_n=128,
    rows=32,
    split_k=None,
    num_warps=4,
    num_stages=2,
    load_only=False,
    late=False,
):
    """``x[..., K] @ W`` for an int4 :class:`PackedInt` at M <= 4 rows; returns ``x.dtype``.

    ``operands``: :func:`gemv_operands(p) <gemv_operands>` computed once (per weight) to keep
    the scale transpose out of every call. ``split_k`` None: enough K splits for about four
    programs per SM.
    """
    x2, lead = D.flatten_x(x, p.k)
    words, s, off = gemv_operands(p) if operands is None else operands
    np_ = words.shape[1] * 4
    if split_k is None:
        progs = np_ // block_n
        split_k = 1
        while progs * split_k < 4 * D._num_sms() and p.kp % (2 * split_k * 2 * p.pair) == 0:
            split_k *= 2
    y = gemv_padded(
        x2,
        words,
        s,
        off,
        k=p.k,
        n=p.n,
        pair=p.pair,
        group=p.group,
        block_n=block_n,
        rows=rows,
        split_k=split_k,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=D.resolve_interpret(interpret),
        load_only=load_only,
        late=late,
    )
    return y.astype(x.dtype).reshape(*lead, p.n)
