"""The output path shared by the tensor-core decode kernels (:mod:`~shrinkjax.kernels.int4_tc`,
:mod:`~shrinkjax.kernels.fp4_tc`, :mod:`~shrinkjax.kernels.sparse24_tc`): :func:`split_k_call`
runs a kernel body on the grid ``(N / bn, split)`` (program ``(j, s)``: output columns ``j *
bn ...`` over K part ``s``) and returns ``y [M, N]``.

With ``split == 1`` the program writes ``y`` in the output dtype. Above, every program stores
its f32 partial into ``[split, M, N]`` and XLA adds them: inside a model XLA fuses that sum into
the consumer (the residual add, the activation); a standalone call pays one more kernel (H100,
8192² at M = 1: 1.07 µs, ``benchmarks/results/probe_stream_ninth.json``).

Measured and removed (commit 6e6df8e): the Stream-K "fixup" (Osama et al., 2023), where the
last program of a column tile to finish adds the partials (arrival counters: one atomic per
program after a CTA barrier, zeroed per call). Correct on the H100, but slower for every kernel
at 8192² and M = 1, 4, 16: 0.2-0.7 µs at M = 1, up to 2.7 µs at M = 16 (counter memset, the
atomic's round trip at each program's end, the last program's reads;
``benchmarks/results/split_sum_ninth.json``). The twelfth session took the memset away (the
counters kept in the packed weight, reset by the last program: commit c25d511): still slower
in 13 of 15 kernel x M cells, level in the other two (int4 at M = 1: 17.4 against 16.5 µs).
The fence, atomic and reads at each program's end put ~2.1 µs on the kernel's tail (15.6 ->
17.7 µs), more than XLA's whole sum kernel (1.4 µs;
``benchmarks/results/split_sum_locks_twelfth.json``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from shrinkjax.kernels import driver as D
from shrinkjax.kernels.driver import plgpu


def split_k_call(
    body, args, in_specs, *, m, mp, bn, np_, split_k, out_dtype, interpret, num_warps,
    num_stages, name,
):  # fmt: skip
    """``y [m, np_]``: ``out_dtype`` when ``split_k == 1`` (written by the kernel), else f32
    (XLA's sum of the partials; the caller casts).

    ``body(*refs) -> f32 [mp, bn]``: program ``(j, s)``'s partial, token-major (``mp`` >= m
    rows, rows >= m ignored), from the input refs of ``args`` / ``in_specs`` (grid ``(j, s)``).
    """
    if np_ % bn:
        raise ValueError(f"bn {bn} must divide N = {np_}")

    def kern(*refs):
        y = body(*refs[:-1])
        tokens = jax.lax.broadcasted_iota(jnp.int32, y.shape, 0) < m  # rows >= M: padding
        plgpu.store(refs[-1], y.astype(refs[-1].dtype), mask=tokens)

    dtype = out_dtype if split_k == 1 else jnp.float32
    out = D.pallas_gpu_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((split_k, m, np_), dtype),
        grid=(np_ // bn, split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((getattr(pl, "squeezed", None), mp, bn), lambda j, s: (s, 0, j)),
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        name=name,
    )(*args)
    return out[0] if split_k == 1 else out.sum(axis=0)
