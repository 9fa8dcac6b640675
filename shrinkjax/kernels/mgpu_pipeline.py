"""Building blocks of the Pallas *Mosaic GPU* (Hopper) decode kernels: a warp-specialized TMA
pipeline over K (a producer warpgroup issues the copies, ``wgs`` consumer warpgroups compute),
the loop of a CTA over its weight tiles, the sum of the consumer groups' partial results, and
named ranges for Mosaic GPU's on-device profiler.

Used by :mod:`shrinkjax.kernels.int4_mgpu` and the probes ``scripts/probe_mgpu_int4.py`` /
``scripts/probe_mgpu_packed.py``. Mosaic GPU needs jax >= 0.10 and an sm_90 GPU; on this
project's CPU CI its kernels are only lowered (``jax.jit(f).trace(...).lower(
lowering_platforms=("cuda",))``), since its interpret mode has no ``wgmma`` with a register
operand.
"""

from __future__ import annotations

import dataclasses
import functools

PROFILE_RANGES = 320  # named ranges one warpgroup may record in a profiled call


def scope(name):
    """A named range of a kernel's code (``jax.named_scope``): recorded per warpgroup, with SM
    clock stamps, when the kernel is built with a ``profile_dir`` (:func:`compiler_params`); no
    code otherwise. Only innermost code should be scoped: a range is a run of equations with
    the same name stack."""
    import jax

    return jax.named_scope(name)


def trace_ranges(path):
    """``{tid: [(name, start, end), ...]}`` from a trace the profiler wrote (Chrome trace
    JSON, optionally gzipped): each warpgroup's ranges in SM clock cycles (the file's
    ``ts`` is cycles / 1000 on top of the warpgroup's start time), in order, "Init"
    included. ``tid - 1`` is ``CTA * warpgroups + warpgroup``."""
    import gzip
    import json

    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "traceEvents" not in data:
        raise ValueError(f"{path}: not a profiler trace (no 'traceEvents' key)")
    events = data["traceEvents"]
    out = {}
    for tid in sorted({e["tid"] for e in events}):
        open_at, ranges = {}, []
        for e in (e for e in events if e["tid"] == tid):  # (ranges do not nest: scope())
            cycles = e["ts"] * 1e3
            if e["ph"] == "B":
                open_at[e["name"]] = cycles
            else:
                ranges.append((e["name"], open_at.pop(e["name"]), cycles))
        out[tid] = ranges
    return out


def compiler_params(profile_dir=""):
    """Warpgroup-semantics compiler parameters; with ``profile_dir``, each call writes a trace
    of the kernel's :func:`scope` ranges per warpgroup there (Chrome trace JSON, SM cycles)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    prof = dict(profile_space=PROFILE_RANGES, profile_dir=profile_dir) if profile_dir else {}
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup, **prof)


def smem_transforms(row_bits, elem_bits, kind):
    """Tiling + swizzle (Mosaic GPU's choice for rows of ``row_bits``) of a shared-memory tile
    of ``elem_bits`` elements; ``kind``: ``"lhs"``, ``"rhs"`` or ``"out"``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    sw = plgpu.find_swizzle(row_bits, kind)
    return (plgpu.TilingTransform((8, sw * 8 // elem_bits)), plgpu.SwizzleTransform(sw))


def warp_specialized(in_specs, *, k_iters, wgs, steps, delay_release=0):
    """``get_pipeline(body, ctx, state=None)``: the warp-specialized TMA pipeline over
    ``k_iters`` K stages, ``steps`` of them in flight (``delay_release``: a stage's buffers are
    freed that many steps after its body). The producer keeps 40 registers per thread; the
    consumers share the rest. ``state``: Pallas' "pipeline of pipelines"
    (``plgpu.PipelinePipeline`` START / STEADY / STOP, see :func:`over_tiles`'s ``chained``):
    the producer goes on to the next pipeline's first stages while the consumers finish this
    one's (needs ``k_iters % steps == 0``)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    in_specs = [dataclasses.replace(s, delay_release=delay_release) for s in in_specs]

    def get_pipeline(body, ctx, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=in_specs,
            wg_axis="wg",
            num_compute_wgs=wgs,
            max_concurrent_steps=steps,
            compute_context=ctx,
            pipeline_state=state,
        )

    return get_pipeline


def over_tiles(get_pipeline, gmem, *, m_iters, cta_m, tile, cluster=1, chained=False):
    """A kernel's loop: this CTA's weight tiles (``tile(mi, rows, allocs)`` each: the tile's
    index and its rows' ``pl.ds``), over pipeline buffers allocated once; then the last y copy
    is awaited. With a ``cluster`` of CTAs (axis ``"c"``), the loop runs over groups of
    ``cluster`` adjacent tiles, one per CTA of the cluster. ``chained``: the tiles' pipelines
    run as one (``tile(mi, rows, allocs, state)``, ``state`` START for the CTA's first tile,
    STOP for its last, STEADY between), so a tile's first stages load while the previous
    tile's last are computed. Every CTA must get at least 2 tiles (a first and a last)."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    ignore = lambda *_, **__: None  # noqa: E731  (functions do not change the allocations)

    @functools.partial(
        pl.run_scoped,
        allocs=get_pipeline(ignore, ignore).get_allocations(*gmem),
        collective_axes="wg",
    )
    def _scope(allocs):
        @plgpu.nd_loop((m_iters // cluster,), collective_axes="sm")
        def _tiles(info):
            (mi,) = info.index
            if cluster > 1:
                mi = mi * cluster + lax.axis_index("c")
            if not chained:
                tile(mi, pl.ds(mi * cta_m, cta_m), allocs)
                return
            i, last = info.local_index, info.num_local_steps - 1
            pp = plgpu.PipelinePipeline
            state = jnp.where(
                i == 0, int(pp.START), jnp.where(i == last, int(pp.STOP), int(pp.STEADY))
            )
            tile(mi, pl.ds(mi * cta_m, cta_m), allocs, state)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def finish_groups(read_acc, write, wg, *, wgs, red_smem, red_bar):
    """y from the consumer warpgroups' sums: ``write(read_acc())`` with one group; with more,
    groups 1.. park their sums in ``red_smem[g - 1]`` and group 0 adds them and writes (two
    CTA-local barrier rounds; the second frees ``red_smem`` for the next tile)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if wgs == 1:
        write(read_acc())
        return
    for g in range(1, wgs):

        @pl.when(wg == g)
        def _park(g=g):
            red_smem[g - 1] = read_acc()

    plgpu.barrier_arrive(red_bar)
    plgpu.barrier_wait(red_bar)  # the other groups' sums are in red_smem

    @pl.when(wg == 0)
    def _out():
        y = read_acc()
        for g in range(1, wgs):
            y = y + red_smem[g - 1]
        write(y)

    plgpu.barrier_arrive(red_bar)
    plgpu.barrier_wait(red_bar)  # red_smem read: free for the next tile
