"""Can a Pallas *Mosaic GPU* kernel stream an int4 weight faster than the Triton-lowered decode
kernels? A probe for issue 5's decode target, not a library kernel.

    python3 scripts/probe_mgpu_int4.py            # the best config found, at T = 8 and 16
    python3 scripts/probe_mgpu_int4.py --scaled   # the same with a scale per 128 K rows
    python3 scripts/probe_mgpu_int4.py --stream-only --tile-k 512,1024  # the stream alone
    python3 scripts/probe_mgpu_int4.py --tokens 16 --tile-k 256,512 --steps 3,4 --wgs 1,2 \
        --x-layout kt,tk                          # a sweep (configs Mosaic rejects are reported)

The Triton kernels (``shrinkjax.kernels.int4_tc``) need a K split to keep the SMs busy, and so
a second kernel (XLA's sum of the partials, 1.3-2.2 µs per standalone call; an in-kernel sum
was slower twice: ``shrinkjax/kernels/split_k.py``). Hopper's own tools remove that need: one
CTA per 64-row weight tile streams the whole K through TMA copies issued by a producer
warpgroup (``plgpu.emit_pipeline_warp_specialized``), while one or two consumer warpgroups
upcast the int4 tile to bf16 in registers (Mosaic GPU's ``WGMMA_LAYOUT_UPCAST_4X``) and run
``wgmma`` with x from shared memory. 8192 rows are 128 CTAs on 132 SMs, one kernel, no
partials. :func:`mgpu_int4_gemv` is the bare stream + upcast + MMA (signed int4 codes, no
scales); :func:`mgpu_int4_g128_gemv` adds a bf16 scale per 128 K rows (``--scaled``). Each
config is checked against float32 on fresh random inputs, then timed as
``benchmarks/kernels.py`` times the decode kernels (distinct weight copies per call, device time
from a profiler trace), beside the copy bandwidth of the same run. Needs jax with Mosaic GPU
(jax >= 0.10) and a Hopper GPU; CI only lowers the kernels (Mosaic GPU's interpret mode in jax
0.10.2 has no ``wgmma`` with a register operand).

H100, 8192² (``benchmarks/RESULTS.md``, twelfth and thirteenth sessions): x tokens-major, 2
consumers, tile_k 512: 16.7-16.9 µs at T = 8 and 17.4-17.8 at T = 16 without scales (0.67 /
0.64 of copy); with scales 17.4-17.7 / 18.2-18.5 µs; with zero points too 19.2 / 20.7-20.9,
against int4_tc's 17.6-17.8 / 19.6-19.9 µs (g128 with zero points) in the same calls. What
limits it is the consumers, not the stream: the same pipeline with no upcast and no MMA
(``--stream-only``) streams at 0.82-0.85 of copy (13.2-13.7 µs). Measured and lost or level:
each stage one contiguous block (``--w-layout tiled``, :func:`tile_weight`), x multicast to a
cluster of 2 or 4 CTAs (``--cluster``), the part upcast in chunks (``--chunk``), a stage's
wgmma left in flight over the next (``--overlap``), 3 groups taking whole stages; 4 groups
hang (the register split). Groups taking whole stages in turn (``--split stages``, 2 groups)
gained 3% (16.36 against 16.87 µs at T = 8).

Fourteenth session: ``--profile DIR`` (Mosaic GPU's on-device profiler, :func:`summarize_profile`)
put the consumers' upcast at 47% of their cycles, and their PTX showed why: Mosaic's int4 load
reads one byte per ``ld.shared.s8``. ``--w-layout packed`` (``scripts/probe_mgpu_packed.py``:
each thread's fragment words, decoded with a shift and a ``lop3``) took the bare kernel to 14.99
µs (0.754) and g128 with zero points to 15.93 / 16.19 µs at T = 8 / 16 (0.753 / 0.743). The
library's ``shrinkjax.kernels.int4_mgpu`` does the same on ``TcInt4`` words as they are.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
GROUP = 128  # K rows per scale (g128, mgpu_int4_g128_gemv)

from shrinkjax.kernels.mgpu_pipeline import (  # noqa: E402  (after the sys.path set-up)
    compiler_params,
    trace_ranges,
)
from shrinkjax.kernels.mgpu_pipeline import finish_groups as _finish  # noqa: E402
from shrinkjax.kernels.mgpu_pipeline import over_tiles as _over_tiles  # noqa: E402
from shrinkjax.kernels.mgpu_pipeline import scope as _scope  # noqa: E402
from shrinkjax.kernels.mgpu_pipeline import smem_transforms as _transforms  # noqa: E402
from shrinkjax.kernels.mgpu_pipeline import warp_specialized as _pipeline  # noqa: E402


def tile_weight(w_NxK, rows, tile_k):
    """``W [N, K]`` -> ``[N / rows, K / tile_k, rows, tile_k]``: each TMA stage of a CTA one
    contiguous block (``rows * tile_k / 2`` bytes of int4), as int4_tc's packing makes each
    program's step one contiguous block, instead of ``rows`` runs of ``tile_k / 2`` bytes
    that lie ``K / 2`` bytes apart."""
    n, k = w_NxK.shape
    return w_NxK.reshape(n // rows, rows, k // tile_k, tile_k).transpose(0, 2, 1, 3)


def _weight(w, tiled, cta_m, tile_k, tr):
    """(N, K, the weight's BlockSpec with transforms ``tr``, ``a_at(a_gmem, mi, rows)``: the
    tile's GMEM view) for a weight ``[N, K]`` or, ``tiled``, :func:`tile_weight`'s
    ``[N / cta_m, K / tile_k, cta_m, tile_k]``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not tiled:
        n, k = w.shape
        spec = plgpu.BlockSpec(
            (cta_m, tile_k), lambda kk: (0, kk), transforms=tr, memory_space=plgpu.SMEM
        )
        return n, k, spec, lambda a, mi, rows: a.at[rows]
    nt, kt, rows, cols = w.shape
    if (rows, cols) != (cta_m, tile_k):
        raise ValueError(f"a tiled weight needs blocks of {(cta_m, tile_k)}, got {(rows, cols)}")
    spec = plgpu.BlockSpec(
        (None, cta_m, tile_k), lambda kk: (kk, 0, 0), transforms=tr, memory_space=plgpu.SMEM
    )
    return nt * rows, kt * cols, spec, lambda a, mi, rows: a.at[mi]


def _tokens(x, k, tokens_major):
    """T of x ``[T, K]`` (``tokens_major``) or x^T ``[K, T]``, after checking its K against the
    weight's (a shorter x would be read past its end, as zeros, without an error)."""
    layout = "x [T, K]" if tokens_major else "x^T [K, T]"
    if x.ndim != 2 or x.shape[1 if tokens_major else 0] != k:
        raise ValueError(f"{layout} must have K = {k} (the weight's), got shape {x.shape}")
    return x.shape[0] if tokens_major else x.shape[1]


def _multicast(cluster):
    """x's BlockSpec ``collective_axes``: with a cluster, each x stage is one TMA multicast to
    all the cluster's CTAs (their weight tiles differ, their x stages are the same), so x
    crosses L2 once per cluster instead of once per CTA."""
    return ("c",) if cluster > 1 else ()


def _y_type(t):
    """y's dtype and bits for ``t`` tokens: bf16, or f32 below 16 (swizzled rows of 32 bytes)."""
    import jax.numpy as jnp

    return (jnp.bfloat16, 16) if t >= 16 else (jnp.float32, 32)


def _writer(out_smem, y_dtype):
    """``write(y, slot, dst)``: y through ``out_smem[slot]`` to the GMEM ref ``dst`` (TMA)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def write(y, slot, dst):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        out_smem[slot] = y.astype(y_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[slot], dst)

    return write


def _launch(
    kernel, args, *, n, t, tile_m, m_iters, wgs, out_slots, num_sms, cluster=1, profile_dir="",
):  # fmt: skip
    """Run ``kernel(*gmem refs, out_gmem, out_smem, red_smem, red_bar)``: one CTA per SM (at
    most one per tile) in clusters of ``cluster`` CTAs (axis ``"c"``), ``wgs`` consumer
    warpgroups and the producer; y ``[n, t]``. ``profile_dir``: each call writes a trace of
    the kernel's named scopes (:func:`_scope`) per warpgroup there (Mosaic GPU's on-device
    profiler: SM clock cycles; :func:`summarize_profile` reads it)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas import mosaic_gpu as plgpu

    y_dtype, y_bits = _y_type(t)
    num_sms = num_sms or getattr(jax.devices()[0], "core_count", 132)
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((n, t), y_dtype),
        grid=(min(num_sms, m_iters) // cluster,),
        grid_names=("sm",),
        **(dict(cluster=(cluster,), cluster_names=("c",)) if cluster > 1 else {}),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=compiler_params(profile_dir),
        scratch_types=dict(
            out_smem=plgpu.SMEM(
                (out_slots, tile_m, t), y_dtype, transforms=_transforms(t * y_bits, y_bits, "out")
            ),
            red_smem=plgpu.SMEM(
                (max(wgs - 1, 1), tile_m, t), jnp.float32, transforms=_transforms(t * 32, 32, "out")
            ),
            red_bar=plgpu.Barrier(num_arrivals=wgs),
        ),
    )
    return f(*args)


def mgpu_int4_gemv(
    w_NxK, x, *, tile_m=64, tile_k=256, steps=4, wgs=1, split="k", x_tokens_major=False,
    w_tiled=False, num_sms=None, cluster=1, stream_only=False, chunk=None, overlap=False,
    profile_dir="",
):  # fmt: skip
    """``y^T [N, T] = W [N, K] (int4) @ x^T [K, T] (bf16)``: one CTA per weight tile over all
    of K (``steps`` TMA stages of ``[rows, tile_k]``). ``wgs`` consumer warpgroups of
    ``tile_m`` (64) rows each: ``split="k"``: a CTA tile is ``tile_m`` rows and each group takes
    its ``tile_k / wgs`` columns of every stage into its own accumulator (:func:`_finish` adds
    them). ``split="rows"``: a CTA tile is ``wgs * tile_m`` rows, one part per group (the x
    stage is shared: half the x traffic per weight byte, half as many CTAs).
    ``x``: x^T ``[K, T]``, or with ``x_tokens_major`` x ``[T, K]`` (a stage's TMA box is then
    T rows of ``2 tile_k`` bytes instead of ``tile_k`` rows of ``2 T`` bytes; the wgmma reads
    it transposed). y is bf16, f32 below T = 16 (bf16 rows of 16 bytes have no swizzle).
    ``w_tiled``: ``w_NxK`` is :func:`tile_weight`'s ``[N / rows, K / tile_k, rows, tile_k]``
    for the CTA's ``rows``. ``stream_only``: the same TMA pipeline with the upcast and the MMA
    left out (y is 0): the ceiling of this structure's stream. ``chunk``: K columns per
    ``wgmma`` (a group's part of a stage is upcast and issued in chunks, one wait at the end,
    so one chunk's upcast overlaps the previous chunk's MMA; default: the whole part).
    ``overlap``: one stage's ``wgmma`` left in flight while the next stage is upcast (the
    inputs' ``delay_release=1``, ``wgmma_wait(1)``). ``split="stages"``: each group takes
    whole stages in turn (stage ``kk`` to group ``kk % wgs``), so the groups work on different
    stages at once; 3 groups fit the register file this way. 4 groups are refused: the
    pipeline's register split then asks for more registers than a CTA of 5 warpgroups is
    launched with, and the kernel hangs (it did on the H100). ``profile_dir``: see
    :func:`_launch` (ranges "upcast", "mma", "wait" per group part and "finish"; "stage" with
    ``stream_only``)."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if (
        wgs not in (1, 2, 3)
        or split not in ("k", "rows", "stages")
        or (wgs == 3 and split != "stages")
    ):
        raise ValueError(  # (4 groups hang: see the docstring)
            f"wgs must be 1 or 2 (3: split 'stages') and split 'k', 'rows' or 'stages', "
            f"got {wgs}, {split!r}"
        )
    part = tile_k // wgs if split == "k" else tile_k  # K columns of a stage per group
    if split == "stages":
        chunk = chunk or min(tile_k, 256)  # (a whole stage upcast at once: too many registers)
    cta_m = tile_m * wgs if split == "rows" else tile_m  # weight rows per CTA tile
    chunk = chunk or part
    if part % chunk:
        raise ValueError(f"chunk {chunk} must divide a group's {part} columns of a stage")
    a_tr = _transforms(chunk * 4, 4, "lhs")  # (swizzled to the columns one wgmma reads)
    n, k, a_spec, a_at = _weight(w_NxK, w_tiled, cta_m, tile_k, a_tr)
    t = _tokens(x, k, x_tokens_major)
    if n % tile_m or k % tile_k:
        raise ValueError(f"N {n} / K {k} must be multiples of tile_m {tile_m} / tile_k {tile_k}")
    if n % (cta_m * cluster):
        raise ValueError(f"N {n} must be a multiple of {cta_m} rows per CTA x cluster {cluster}")
    x_rows = tile_k if x_tokens_major else t  # elements per row of x's stage tile
    get_pipeline = _pipeline(
        [
            a_spec,
            plgpu.BlockSpec(
                (t, tile_k) if x_tokens_major else (tile_k, t),
                (lambda kk: (0, kk)) if x_tokens_major else (lambda kk: (kk, 0)),
                transforms=_transforms(x_rows * 16, 16, "rhs"),
                memory_space=plgpu.SMEM,
                collective_axes=_multicast(cluster),
            ),
        ],
        k_iters=k // tile_k, wgs=wgs, steps=steps, delay_release=int(overlap),
    )  # fmt: skip

    def kernel(a_gmem, b_gmem, out_gmem, out_smem, red_smem, red_bar):
        def tile(mi, rows, allocs):
            def ctx(eval_pipeline):
                @functools.partial(pl.run_scoped, acc=plgpu.ACC((tile_m, t), jnp.float32))
                def _acc(acc):
                    eval_pipeline(acc)
                    if overlap:  # (the last stage's wgmma is still in flight)
                        plgpu.wgmma_wait(0)
                    wg = lax.axis_index("wg")
                    write = _writer(out_smem, _y_type(t)[0])
                    if split == "rows":  # each group writes its own rows
                        dst = out_gmem.at[rows].at[pl.ds(wg * tile_m, tile_m)]
                        write(acc[...], wg, dst)
                        return
                    with _scope("finish"):
                        _finish(
                            lambda: acc[...], lambda y: write(y, 0, out_gmem.at[rows]), wg,
                            wgs=wgs, red_smem=red_smem, red_bar=red_bar,
                        )  # fmt: skip

            def body(idx, a_smem, b_smem, acc):
                def mma(a_rows, cols):  # upcast a_rows' columns cols, issue their wgmma
                    with _scope("upcast"):
                        a = a_rows.at[:, cols][...].astype(jnp.bfloat16)
                    b = b_smem.at[:, cols] if x_tokens_major else b_smem.at[cols]
                    if x_tokens_major:  # (sliced first: a transposed view takes none)
                        b = b.transpose((1, 0))
                    with _scope("mma"):
                        plgpu.wgmma(acc, a, b)

                if stream_only:  # (an empty range: the stage's arrival, when profiled)
                    with _scope("stage"):
                        lax.axis_index("wg")  # (any equation: the range needs one)
                    return acc
                wg = lax.axis_index("wg")
                if split == "stages":  # group kk % wgs takes stage kk whole
                    (kk,) = idx

                    @pl.when(lax.rem(kk, wgs) == wg)
                    def _own():
                        for c in range(tile_k // chunk):
                            mma(a_smem, pl.ds(c * chunk, chunk))

                    with _scope("wait"):
                        plgpu.wgmma_wait(0)
                    return acc
                for i in range(wgs):  # (static slices: a tile-aligned K part per group)

                    @pl.when(wg == i)
                    def _mma(i=i):
                        for c in range(part // chunk):
                            if split == "rows":
                                mma(a_smem.at[pl.ds(i * tile_m, tile_m)], pl.ds(c * chunk, chunk))
                            else:
                                mma(a_smem, pl.ds(i * part + c * chunk, chunk))

                with _scope("wait"):
                    plgpu.wgmma_wait(int(overlap))
                return acc

            get_pipeline(body, ctx)(a_at(a_gmem, mi, rows), b_gmem, allocations=allocs)

        _over_tiles(
            get_pipeline, (a_gmem, b_gmem), m_iters=n // cta_m, cta_m=cta_m, tile=tile,
            cluster=cluster,
        )  # fmt: skip

    return _launch(
        kernel, (w_NxK, x), n=n, t=t, tile_m=tile_m, m_iters=n // cta_m, wgs=wgs, out_slots=wgs,
        num_sms=num_sms, cluster=cluster, profile_dir=profile_dir,
    )  # fmt: skip


def mgpu_int4_g128_gemv(
    w_NxK, s_GxN, x_TxK, z_GxN=None, *, tile_m=64, tile_k=512, steps=3, wgs=2, w_tiled=False,
    num_sms=None, cluster=1, zero_mode="codes", profile_dir="",
):  # fmt: skip
    """``y^T [N, T] = (W * s) @ x^T`` for symmetric int4 codes ``W [N, K]`` with one bf16 scale
    per 128 K rows of a weight row, ``s [K / 128, N]`` (group-major: a stage's scales are one
    TMA box of ``tile_k / 128`` rows of ``2 tile_m`` bytes), and x tokens-major ``[T, K]``.
    :func:`mgpu_int4_gemv`'s structure (``split="k"``); each consumer warpgroup runs one
    ``wgmma`` per scale group of its part into a fresh accumulator and adds it scaled per
    weight row (a ``[tile_m]`` vector in the accumulator's row layout) into its carried sum.
    ``w_tiled``: as :func:`mgpu_int4_gemv`'s (blocks of ``tile_m`` rows). ``z_GxN``: bf16
    zero points relative to the signed codes (``z - 8`` for 4-bit ``q = code + 8``), laid out as
    ``s``, so ``W = s * (code - z)``. ``zero_mode="codes"``: the group's ``[tile_m]`` vector
    is subtracted from the upcast codes (exact in bf16; a ``[tile_m, 128]`` subtraction per
    group). ``"xsum"``: the group's dot takes ``z ⊗ Σx`` off instead (``Σx [K / 128, T]``, f32,
    summed by XLA in the same jit; a ``[tile_m, T]`` update per group), as int4_tc does.
    ``profile_dir``: see :func:`_launch` (ranges "upcast", "mma", "scale" per group, "finish")."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    a_tr = _transforms(GROUP * 4, 4, "lhs")  # int4 tiles of 128 columns: a scale group each
    n, k, a_spec, a_at = _weight(w_NxK, w_tiled, tile_m, tile_k, a_tr)
    t = _tokens(x_TxK, k, True)
    part = tile_k // wgs
    if n % (tile_m * cluster) or k % tile_k or part % GROUP or wgs not in (1, 2):
        raise ValueError(
            f"N {n} / K {k} must be multiples of tile_m {tile_m} x cluster {cluster} / tile_k "
            f"{tile_k}, and tile_k / wgs ({wgs}; 1 or 2) a multiple of {GROUP}"
        )
    for name, a in (("scales", s_GxN), ("zeros", z_GxN)):
        if a is not None and a.shape != (k // GROUP, n):
            raise ValueError(f"{name} must be [K / {GROUP}, N] = {(k // GROUP, n)}, got {a.shape}")
    if zero_mode not in ("codes", "xsum"):
        raise ValueError(f"zero_mode must be 'codes' or 'xsum', got {zero_mode!r}")
    zeros = z_GxN is not None
    xsum = zeros and zero_mode == "xsum"
    xs_GxT = None
    if xsum:  # Σx per scale group, [K / 128, T] f32
        xs_GxT = x_TxK.astype(jnp.float32).reshape(t, k // GROUP, GROUP).sum(-1).T
    per_group = plgpu.BlockSpec(
        (tile_k // GROUP, tile_m), lambda kk: (kk, 0), memory_space=plgpu.SMEM
    )
    row_layout = plgpu.Layout.WGMMA.reduce(1)  # a [tile_m] vector, broadcast along tokens
    col_layout = plgpu.Layout.WGMMA.reduce(0)  # a [T] vector, broadcast along rows
    get_pipeline = _pipeline(
        [
            a_spec,
            per_group,
            *([per_group] if zeros else []),
            *(
                [plgpu.BlockSpec((tile_k // GROUP, t), lambda kk: (kk, 0), memory_space=plgpu.SMEM)]
                if xsum
                else []
            ),
            plgpu.BlockSpec(
                (t, tile_k), lambda kk: (0, kk), transforms=_transforms(tile_k * 16, 16, "rhs"),
                memory_space=plgpu.SMEM, collective_axes=_multicast(cluster),
            ),
        ],
        k_iters=k // tile_k, wgs=wgs, steps=steps,
    )  # fmt: skip

    def kernel(*refs, out_smem, red_smem, red_bar):
        *gmem, out_gmem = refs
        a_gmem, b_gmem = gmem[0], gmem[-1]

        def tile(mi, rows, allocs):
            def ctx(eval_pipeline):
                zero = plgpu.layout_cast(jnp.zeros((tile_m, t), jnp.float32), plgpu.Layout.WGMMA)
                acc = eval_pipeline(zero)
                wg = lax.axis_index("wg")
                write = _writer(out_smem, _y_type(t)[0])
                with _scope("finish"):
                    _finish(
                        lambda: acc, lambda y: write(y, 0, out_gmem.at[rows]), wg, wgs=wgs,
                        red_smem=red_smem, red_bar=red_bar,
                    )  # fmt: skip

            def body(_, a_smem, s_smem, *rest):
                *zx_smem, b_smem, acc = rest  # (zeros, then Σx with zero_mode "xsum")
                wg = lax.axis_index("wg")
                for g in range(part // GROUP):
                    c = pl.multiple_of(wg * part + g * GROUP, GROUP)
                    gi = wg * (part // GROUP) + g
                    with _scope("upcast"):
                        a = a_smem.at[:, pl.ds(c, GROUP)][...].astype(jnp.bfloat16)
                        if zeros:
                            zr = plgpu.load(zx_smem[0].at[gi], (), layout=row_layout)
                        if zeros and not xsum:
                            a = a - lax.broadcast_in_dim(zr, a.shape, [0])
                    b = b_smem.at[:, pl.ds(c, GROUP)].transpose((1, 0))

                    def mm(acc_ref, a=a, b=b):
                        plgpu.wgmma(acc_ref, a, b)
                        return acc_ref[...]

                    with _scope("mma"):  # (issue and wait)
                        dot = pl.run_scoped(mm, plgpu.ACC((tile_m, t), jnp.float32))
                    with _scope("scale"):
                        if xsum:
                            xs = plgpu.load(zx_smem[1].at[gi], (), layout=col_layout)
                            zb = lax.broadcast_in_dim(zr.astype(jnp.float32), dot.shape, [0])
                            dot = dot - zb * lax.broadcast_in_dim(xs, dot.shape, [1])
                        sc = plgpu.load(s_smem.at[gi], (), layout=row_layout)
                        sc = sc.astype(jnp.float32)
                        acc = acc + dot * lax.broadcast_in_dim(sc, dot.shape, [0])
                return acc

            groups = [g.at[:, rows] for g in gmem[1 : 2 + zeros]]  # scales (and zeros)
            a_tile = a_at(a_gmem, mi, rows)
            xs = gmem[2 + zeros : -1]  # (Σx: all tokens, no rows)
            get_pipeline(body, ctx)(a_tile, *groups, *xs, b_gmem, allocations=allocs)

        _over_tiles(
            get_pipeline, gmem, m_iters=n // tile_m, cta_m=tile_m, tile=tile, cluster=cluster
        )

    return _launch(
        kernel, (w_NxK, s_GxN, *([z_GxN] if zeros else []), *([xs_GxT] if xsum else []), x_TxK),
        n=n, t=t, tile_m=tile_m,
        m_iters=n // tile_m, wgs=wgs, out_slots=1, num_sms=num_sms, cluster=cluster,
        profile_dir=profile_dir,
    )  # fmt: skip


def summarize_profile(path, wgs):
    """Where one profiled call's time goes, per warpgroup role, from the trace Mosaic GPU's
    profiler wrote to ``path`` (Chrome trace JSON; ``tid - 1`` is ``CTA * (wgs + 1) +
    warpgroup``, the producer is group ``wgs``; times are SM clock cycles / 1000, counted
    from each warpgroup's first range). Per role: ``span`` (first range's start to last
    range's end, cycles), per range name the cycles and the count per warpgroup, ``between``
    (the span outside every range: the pipeline's barrier waits and releases), and
    ``before_first`` (the "Init" range's end to the first stage's start). Medians over the
    CTAs."""
    per_role = {}
    for tid, ranges in trace_ranges(path).items():
        role = (tid - 1) % (wgs + 1)
        work = [r for r in ranges if r[0] != "Init"]
        if not work:
            continue
        t0, t1 = work[0][1], max(r[2] for r in work)
        stats = {"span": t1 - t0, "between": t1 - t0 - sum(b - a for _, a, b in work)}
        init_end = [b for name, _, b in ranges if name == "Init"]
        if init_end:
            stats["before_first"] = t0 - init_end[0]
        for name, a, b in work:
            stats[name] = stats.get(name, 0.0) + (b - a)
            stats[name + " n"] = stats.get(name + " n", 0) + 1
        per_role.setdefault(role, []).append(stats)
    return {
        role: {k: float(np.median([s.get(k, 0.0) for s in rows])) for k in rows[0]}
        | {"ctas": len(rows)}
        for role, rows in sorted(per_role.items())
    }


def print_profile(summary, label):
    """:func:`summarize_profile`'s medians as a table: cycles per range and their share."""
    print(f"  profile {label}:")
    for role, st in summary.items():
        span = st["span"]
        parts = ", ".join(
            f"{k} {v:.0f} ({v / span:.0%}, x{st.get(k + ' n', 0):.0f})"
            for k, v in st.items()
            if k not in ("span", "ctas") and not k.endswith(" n")
        )
        print(f"    group {role} ({st['ctas']} CTAs): span {span:.0f} cycles; {parts}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument(
        "--tokens", default="8,16", help="T: rows of x, the wgmma's N side (8 needs x layout tk)"
    )
    ap.add_argument("--tile-k", default="512", help="K rows per TMA stage")
    ap.add_argument("--steps", default="3", help="TMA stages in flight")
    ap.add_argument(
        "--wgs", default="2", help="consumer warpgroups per CTA (1, 2; 3 with --split stages)"
    )
    ap.add_argument(
        "--cluster", default="1", help="CTAs per cluster (1, 2, 4): x is multicast to them"
    )
    ap.add_argument("--chunk", default="0", help="K columns per wgmma (0: a group's whole part)")
    allowed = {}  # a list flag's values: checked by name after parsing

    def list_flag(flag, values, help):
        allowed[flag] = values
        ap.add_argument(flag, default=values[0], help=f"{help} ({' / '.join(values)}, or a list)")

    list_flag("--overlap", ("0", "1"), "1: a stage's wgmma stays in flight over the next")
    list_flag("--split", ("k", "rows", "stages"), "how groups share a CTA")
    list_flag("--mma-k", ("256", "128", "64"), "--w-layout packed: K columns per wgmma")
    list_flag("--x-layout", ("tk", "kt"), "x as [T, K] (tk) or x^T [K, T] (kt)")
    list_flag(
        "--w-layout",
        ("rowmajor", "tiled", "packed", "packed-nosub"),
        "W [N, K], tile_weight's blocks, or probe_mgpu_packed's words (packed-nosub: without"
        " the subtraction of 136, checked against (W + 136) x; bare kernel, split k, x tk)",
    )
    ap.add_argument(
        "--scaled",
        action="store_true",
        help="mgpu_int4_g128_gemv: a bf16 scale per 128 K rows (x tokens-major, split k only)",
    )
    ap.add_argument("--zeros", action="store_true", help="--scaled with zero points (bf16)")
    list_flag(
        "--zero-mode", ("codes", "xsum"), "--zeros off the upcast codes, or as z x Σx off each dot"
    )
    ap.add_argument(
        "--stream-only",
        action="store_true",
        help="the bare kernel's TMA pipeline without upcast or MMA (y = 0): the stream's ceiling",
    )
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument(
        "--untimed",
        action="store_true",
        help="check, then make --calls calls untraced (each on its own weight copy), for ncu:"
        " scripts/ncu_decode.sh with NCU_SCRIPT=scripts/probe_mgpu_int4.py",
    )
    ap.add_argument(
        "--profile",
        default="",
        help="DIR: build each config with Mosaic GPU's on-device profiler, check it, make"
        " --calls calls untimed, and print where the last call's cycles went per warpgroup"
        " (its trace: DIR/<config>/*-trace.json, for Perfetto)",
    )
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    for flag, values in allowed.items():
        for value in getattr(args, flag[2:].replace("-", "_")).split(","):
            if value not in values:
                ap.error(f"{flag} takes {' / '.join(values)}, got {value!r}")
    if args.scaled and (args.split != "k" or args.x_layout != "tk"):
        ap.error("--scaled runs --split k with --x-layout tk only")
    if args.zeros and not args.scaled:
        ap.error("--zeros goes with --scaled")
    if args.zero_mode != "codes" and not args.zeros:
        ap.error("--zero-mode goes with --zeros")
    if args.scaled and (args.stream_only or args.chunk != "0" or args.overlap != "0"):
        ap.error("--stream-only / --chunk / --overlap are the bare kernel's: not with --scaled")
    if "packed" in args.w_layout and (
        args.stream_only or args.split != "k" or args.x_layout != "tk" or args.cluster != "1"
        or args.chunk != "0" or args.overlap != "0" or args.zero_mode != "codes"
    ):  # fmt: skip
        ap.error("--w-layout packed runs --split k --x-layout tk only (zeros: in registers)")
    if args.scaled and "packed-nosub" in args.w_layout:
        ap.error("--w-layout packed-nosub is the bare kernel's")

    import jax
    import jax.numpy as jnp
    from ncu_kernel import benchmark_kernels
    from probe_call_kernels import trace_one
    from probe_mgpu_packed import mgpu_int4_packed_gemv, pack_wgmma_int4

    KB = benchmark_kernels()
    k, n = args.k, args.n
    rng = np.random.default_rng([k, n])
    codes = rng.integers(-8, 8, size=(n, k), dtype=np.int8)
    w = jnp.asarray(codes).astype(jnp.int4)
    scales = rng.uniform(0.5, 1.5, size=(k // GROUP, n)).astype(np.float32)
    s_bf16 = jnp.asarray(scales, jnp.bfloat16)
    z_rel = rng.integers(-8, 8, size=(k // GROUP, n)).astype(np.float32) if args.zeros else None
    z_bf16 = None if z_rel is None else jnp.asarray(z_rel, jnp.bfloat16)
    deq = codes.astype(np.float32) - (0 if z_rel is None else np.repeat(z_rel, GROUP, 0).T)
    dense = deq * np.repeat(np.asarray(s_bf16, np.float32), GROUP, 0).T
    copies = {}

    def weights(layout, cta_m, tile_k):  # the calls' weight copies (one other set kept)
        key = layout if layout in ("rowmajor", "packed") else (cta_m, tile_k)
        if key not in copies:
            for old in [c for c in copies if c != "rowmajor"]:
                del copies[old]  # (GPU memory)
            if key == "packed":  # (scaled: c = 128 + the unsigned zero point, 136 + z_rel)
                wl = jnp.asarray(pack_wgmma_int4(codes))
                if args.scaled:
                    c = 136 + (z_rel if args.zeros else np.zeros(scales.shape, np.float32))
                    wl = (wl, s_bf16, jnp.asarray(c, jnp.bfloat16))
                copies[key] = KB.copies_of(wl, args.calls)
                return copies[key]
            else:  # (tiled: as int8 codes on the host)
                wl = w if key == "rowmajor" else jnp.asarray(tile_weight(codes, cta_m, tile_k))
                wl = wl.astype(jnp.int4)
            copies[key] = KB.copies_of((wl, s_bf16, z_bf16) if args.scaled else wl, args.calls)
        return copies[key]

    on_gpu = jax.default_backend() == "gpu"
    copy = KB.copy_bandwidth().get("copy_tbps") if on_gpu and not args.untimed else None
    rows = []
    for t in (int(v) for v in args.tokens.split(",")):
        xs = [jnp.asarray(rng.standard_normal((k, t)), jnp.bfloat16) for _ in range(args.calls)]
        want = (dense if args.scaled else codes.astype(np.float32)) @ np.asarray(xs[0], np.float32)
        by_layout = {"kt": xs, "tk": [jnp.asarray(x.T) for x in xs]}
        for tile_k in (int(v) for v in args.tile_k.split(",")):
            for steps, wgs, cluster, chunk, overlap, split, xl, wl, zm, mk in itertools.product(
                [int(v) for v in args.steps.split(",")],
                [int(v) for v in args.wgs.split(",")],
                [int(v) for v in args.cluster.split(",")],
                [int(v) for v in args.chunk.split(",")],
                [int(v) for v in args.overlap.split(",")],
                args.split.split(","),
                args.x_layout.split(","),
                args.w_layout.split(","),
                args.zero_mode.split(","),
                [int(v) for v in args.mma_k.split(",")],
            ):
                if wgs == 1 and split == "rows":
                    continue  # (the same kernel as split "k")
                if not wl.startswith("packed") and mk != int(args.mma_k.split(",")[0]):
                    continue  # (--mma-k is the packed kernel's)
                label = f"T={t} tile_k={tile_k} steps={steps} wgs={wgs} cluster={cluster} "
                label += f"chunk={chunk or 'part'} overlap={overlap} "
                label += f"split={split} x={xl} w={wl}" + (f" zeros={zm}" if args.zeros else "")
                label += f" mma_k={mk}" if wl.startswith("packed") else ""
                row = dict(tokens=t, tile_k=tile_k, steps=steps, wgs=wgs, cluster=cluster)
                row.update(split=split, k=k, n=n)
                row.update(x_layout=xl, w_layout=wl, scaled=args.scaled, zeros=args.zeros)
                row.update(stream_only=args.stream_only, chunk=chunk, overlap=overlap, zero_mode=zm)
                row.update(mma_k=mk)
                tiles = dict(tile_k=tile_k, steps=steps, wgs=wgs, split=split, cluster=cluster)
                tiles.update(x_tokens_major=xl == "tk", w_tiled=wl == "tiled")
                cta_m = 64 * wgs if split == "rows" else 64
                prof = ""
                if args.profile:  # (a folder per config: its calls' traces)
                    prof = os.path.join(args.profile, label.replace(" ", "_").replace("=", ""))
                    os.makedirs(prof, exist_ok=True)
                try:

                    def fn(x, w, tiles=tiles, wl=wl, mk=mk):  # (x, w): as build_multi calls it
                        if wl.startswith("packed"):
                            keep = ("tile_k", "steps", "wgs")
                            kw = {a: b for a, b in tiles.items() if a in keep}
                            sub = wl == "packed"
                            wsc = w if args.scaled else (w,)
                            return mgpu_int4_packed_gemv(
                                wsc[0], x, *wsc[1:], sub=sub, mma_k=mk, profile_dir=prof, **kw
                            )
                        if args.scaled:
                            keep = ("tile_k", "steps", "wgs", "w_tiled", "cluster")
                            kw = {a: b for a, b in tiles.items() if a in keep}
                            return mgpu_int4_g128_gemv(
                                w[0], w[1], x, w[2], zero_mode=zm, profile_dir=prof, **kw
                            )
                        return mgpu_int4_gemv(
                            w, x, stream_only=args.stream_only, chunk=chunk or None,
                            overlap=bool(overlap), profile_dir=prof, **tiles,
                        )  # fmt: skip

                    xin, ws = by_layout[xl], weights(wl.split("-")[0], cta_m, tile_k)
                    got = np.asarray(jax.jit(fn)(xin[0], ws[0]), np.float32)
                    if wl == "packed-nosub":  # (136 Σx more, as the kernel leaves it)
                        got = got - 136 * np.asarray(xs[0], np.float32).sum(0)
                    err = float(np.linalg.norm(got - want * (not args.stream_only)))
                    err /= float(np.linalg.norm(want))
                    row["rel_err"] = err
                    if not err < 1e-2:
                        raise ValueError(f"does not match float32 ({err:.2e})")
                    if args.untimed or prof:  # (for a profiler: ncu, or Mosaic GPU's own)
                        for i in range(args.calls):
                            jax.block_until_ready(jax.jit(fn)(xin[i], ws[i]))
                        jax.effects_barrier()  # (the traces are written by callbacks)
                        print(f"{label}: err {err:.1e}, {args.calls} calls more (untimed)")
                        if prof:
                            last = sorted(f for f in os.listdir(prof) if f.endswith(".json"))[-1]
                            row["profile"] = summarize_profile(os.path.join(prof, last), wgs)
                            print_profile(row["profile"], label)
                        rows.append(row)
                        continue
                    exe = KB.build_multi(fn, xin, ws)
                    res = trace_one(exe, xin, ws, args.calls)
                    row.update(res or {})
                except Exception as e:  # a config Mosaic rejects: report it, go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                    print(f"{label}: FAILED {row['error']}", flush=True)
                    rows.append(row)
                    continue
                nbytes = n * k // 2 + 2 * k * t + (2 if t >= 16 else 4) * n * t
                nbytes += 2 * n * (k // GROUP) * (int(args.scaled) + int(args.zeros))
                if res and copy:
                    row["bw_frac"] = nbytes / (res["span_us"] * 1e-6) / (copy * 1e12)
                    print(f"{label}: {res['span_us']:.2f} µs, {row['bw_frac']:.3f} of copy, "
                          f"err {err:.1e}", flush=True)  # fmt: skip
                    for r in res["kernels"]:
                        print(f"    {r['us']:8.2f} µs  x{r['count']:.2f}  {r['name'][:80]}")
                else:
                    print(f"{label}: err {err:.1e} (no device timeline)")
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            out = dict(device=str(jax.devices()[0].device_kind), copy_tbps=copy, rows=rows)
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
