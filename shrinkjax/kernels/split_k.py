"""How the tensor-core decode kernels (:mod:`~shrinkjax.kernels.int4_tc`,
:mod:`~shrinkjax.kernels.fp4_tc`, :mod:`~shrinkjax.kernels.sparse24_tc`) turn the partial
results of a K split into ``y``: :func:`split_k_call` runs a kernel body on the grid ``(N /
bn, split)`` (program ``(j, s)``: output columns ``j * bn ...`` over K part ``s``) and writes
``y [M, N]``.

Two ways to add the ``split`` partials (``SUM_MODES``):

* ``"xla"``: every program stores its f32 partial into ``[split, M, N]`` and XLA sums axis 0.
  Inside a model XLA fuses that sum into the consumer (the residual add, the activation); a
  standalone call pays one more kernel launch.
* ``"kernel"``: the last program of a column tile to finish adds them (the "fixup" of
  Stream-K, Osama et al., 2023, arXiv:2301.03598). Each program stores its partial into an f32
  workspace, waits for its threads (CTA barrier), then increments the tile's arrival counter
  with one atomic (acquire-release, GPU scope: the CUTLASS semaphore pattern); the program that
  sees ``split - 1`` earlier arrivals reads all the partials (bypassing L1, which is not
  coherent across SMs), writes ``y`` in the output dtype and resets the counter. The counters
  are int32 zeros made per call and aliased into the kernel (XLA writes them with a memset).

No atomics run with ``split == 1``: the program writes ``y`` directly either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from shrinkjax.kernels import driver as D
from shrinkjax.kernels.driver import plgpu

SUM_MODES = ("xla", "kernel")


def _token_mask(shape, m):
    return jax.lax.broadcasted_iota(jnp.int32, shape, 0) < m  # rows >= M: not real tokens


def split_k_call(
    body, args, in_specs, *, m, mp, bn, np_, split_k, out_dtype, split_sum, interpret,
    num_warps, num_stages, name,
):  # fmt: skip
    """``y [m, np_]``: ``out_dtype`` when the kernel writes it (``split_k == 1`` or
    ``split_sum == "kernel"``), else f32 (XLA's sum of the partials; the caller casts).

    ``body(*refs) -> f32 [mp, bn]``: program ``(j, s)``'s partial, token-major (``mp`` >= m
    rows, rows >= m ignored), from the input refs of ``args`` / ``in_specs`` (grid ``(j, s)``).
    """
    if split_sum not in SUM_MODES:
        raise ValueError(f"split_sum must be one of {SUM_MODES}, got {split_sum!r}")
    if np_ % bn:
        raise ValueError(f"bn {bn} must divide N = {np_}")
    squeezed = getattr(pl, "squeezed", None)
    grid = (np_ // bn, split_k)
    common = dict(grid=grid, interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    if split_k == 1 or split_sum == "xla":

        def kern(*refs):
            y = body(*refs[:-1])
            plgpu.store(refs[-1], y.astype(refs[-1].dtype), mask=_token_mask(y.shape, m))

        out = D.pallas_gpu_call(
            kern,
            out_shape=jax.ShapeDtypeStruct(
                (split_k, m, np_), out_dtype if split_k == 1 else jnp.float32
            ),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((squeezed, mp, bn), lambda j, s: (s, 0, j)),
            name=name,
            **common,
        )(*args)
        return out[0] if split_k == 1 else out.sum(axis=0)

    n_locks = 1 << (grid[0] - 1).bit_length()  # (Triton blocks: powers of two)

    def kern(*refs):
        *ins, _, y_ref, ws_ref, lock_ref = refs
        y = body(*ins)
        j, s = pl.program_id(0), pl.program_id(1)
        tok = _token_mask(y.shape, m)
        plgpu.store(ws_ref.at[s], y, mask=tok)
        if not interpret:
            plgpu.debug_barrier()  # every thread's partial is stored before the arrival
        arrived = plgpu.atomic_add(lock_ref, j, jnp.ones((), jnp.int32))

        @pl.when(arrived == split_k - 1)
        def _last():
            tot = None
            for i in range(split_k):  # (an array index: interpret mode takes no Python int)
                part = ws_ref.at[jnp.asarray(i, jnp.int32)]
                part = plgpu.load(part, mask=tok, other=0.0, volatile=True)
                tot = part if tot is None else tot + part
            plgpu.store(y_ref, tot.astype(y_ref.dtype), mask=tok)
            # back to 0 (all split_k have arrived): an add, as interpret mode has no exchange
            plgpu.atomic_add(lock_ref, j, jnp.asarray(-split_k, jnp.int32))

    full = pl.BlockSpec((n_locks,), lambda j, s: (0,))
    y, _, _ = D.pallas_gpu_call(
        kern,
        out_shape=(
            jax.ShapeDtypeStruct((m, np_), out_dtype),
            jax.ShapeDtypeStruct((split_k, m, np_), jnp.float32),
            jax.ShapeDtypeStruct((n_locks,), jnp.int32),
        ),
        in_specs=[*in_specs, full],
        out_specs=(
            pl.BlockSpec((mp, bn), lambda j, s: (0, j)),
            pl.BlockSpec((split_k, mp, bn), lambda j, s: (0, 0, j)),
            full,
        ),
        input_output_aliases={len(args): 2},
        name=name + "_fix",
        **common,
    )(*args, jnp.zeros((n_locks,), jnp.int32))
    return y
