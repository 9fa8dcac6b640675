"""The output path shared by the tensor-core decode kernels (:mod:`~shrinkjax.kernels.int4_tc`,
:mod:`~shrinkjax.kernels.fp4_tc`, :mod:`~shrinkjax.kernels.sparse24_tc`): :func:`split_k_call`
runs a kernel body on the grid ``(N / bn, split)`` (program ``(j, s)``: output columns ``j *
bn ...`` over K part ``s``) and returns ``y [M, N]``.

With ``split == 1`` the program writes ``y`` in the output dtype. Above, the ``split`` partials
are added one of two ways (``SUM_MODES``):

* ``"xla"``: every program stores its f32 partial into ``[split, M, N]`` and XLA adds them.
  Inside a model XLA fuses that sum into the consumer (the residual add, the activation); a
  standalone call pays one more kernel (H100, 8192² at M = 1: 1.07 µs,
  ``benchmarks/results/probe_stream_ninth.json``).
* ``"kernel"``: the last program of a column tile to finish adds them (the "fixup" of Stream-K,
  Osama et al., 2023, arXiv:2301.03598): each program stores its partial into an f32 workspace,
  waits for its threads (CTA barrier) and increments the tile's arrival counter with one atomic
  (acquire-release, GPU scope); the program that sees ``split - 1`` earlier arrivals reads the
  partials (volatile: L1 is not coherent across SMs), writes ``y`` in the output dtype and
  takes the counter back to 0. The counters are the weight's ``locks`` (:func:`new_locks`,
  made once at packing), not an array made per call: the ninth session made them per call
  (commit 6e6df8e), and their memset cost more than XLA's sum saved. Like Marlin's workspace
  (Frantar et al., 2024), they must be all 0 when a call starts and are all 0 again when it
  ends, so one packed weight must not run in two kernels at once (XLA runs a step's kernels
  in order on one stream) and the counters are not declared as written (an aliased output
  would make XLA copy them every call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from shrinkjax.kernels import driver as D
from shrinkjax.kernels.driver import plgpu

SUM_MODES = ("xla", "kernel")
LOCK_ROWS = 64  # the fewest weight rows a program runs: one arrival counter per 64 columns
# Calls of at most this many rows add the K split in the kernel where the weight has locks
# (default_split_sum); 0: never.
KERNEL_SUM_MAX_M = 0


def new_locks(np_: int) -> jax.Array:
    """int32 zeros: the arrival counters of a packed weight whose padded N is ``np_``, one per
    ``LOCK_ROWS`` columns, rounded up to a power of two (Triton's block sizes); packing
    functions store them as the layout's ``locks``."""
    return jnp.zeros((1 << (max(1, -(-np_ // LOCK_ROWS)) - 1).bit_length(),), jnp.int32)


def default_split_sum(t, m: int, split_k: int) -> str:
    """``"kernel"`` for ``m <= KERNEL_SUM_MAX_M`` rows with a K split and ``t.locks``, else
    ``"xla"``."""
    ok = split_k > 1 and getattr(t, "locks", None) is not None
    return "kernel" if ok and m <= KERNEL_SUM_MAX_M else "xla"


def _token_mask(shape, m):
    return jax.lax.broadcasted_iota(jnp.int32, shape, 0) < m  # rows >= M: padding


def split_k_call(
    body, args, in_specs, *, m, mp, bn, np_, split_k, out_dtype, interpret, num_warps,
    num_stages, name, split_sum="xla", locks=None,
):  # fmt: skip
    """``y [m, np_]``: ``out_dtype`` when the kernel writes it (``split_k == 1`` or
    ``split_sum == "kernel"``), else f32 (XLA's sum of the partials; the caller casts).

    ``body(*refs) -> f32 [mp, bn]``: program ``(j, s)``'s partial, token-major (``mp`` >= m
    rows, rows >= m ignored), from the input refs of ``args`` / ``in_specs`` (grid ``(j, s)``).
    ``locks``: int32 zeros, at least one per program along N (``"kernel"`` only).
    """
    if split_sum not in SUM_MODES:
        raise ValueError(f"split_sum must be one of {SUM_MODES}, got {split_sum!r}")
    if np_ % bn:
        raise ValueError(f"bn {bn} must divide N = {np_}")
    grid = (np_ // bn, split_k)
    common = dict(grid=grid, interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    if split_k == 1 or split_sum == "xla":

        def kern(*refs):
            y = body(*refs[:-1])
            plgpu.store(refs[-1], y.astype(refs[-1].dtype), mask=_token_mask(y.shape, m))

        dtype = out_dtype if split_k == 1 else jnp.float32
        out = D.pallas_gpu_call(
            kern,
            out_shape=jax.ShapeDtypeStruct((split_k, m, np_), dtype),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((getattr(pl, "squeezed", None), mp, bn), lambda j, s: (s, 0, j)),
            name=name,
            **common,
        )(*args)
        return out[0] if split_k == 1 else out.sum(axis=0)

    if locks is None or locks.ndim != 1 or locks.dtype != jnp.int32 or locks.shape[0] < grid[0]:
        got = None if locks is None else f"{locks.dtype} {locks.shape}"
        raise ValueError(
            f'split_sum="kernel" needs int32 locks [>= {grid[0]}] (the packed weight\'s, '
            f"split_k.new_locks), got {got}"
        )

    def kern(*refs):
        *ins, lock_ref, y_ref, ws_ref = refs
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

    n_locks = locks.shape[0]
    y, _ = D.pallas_gpu_call(
        kern,
        out_shape=(
            jax.ShapeDtypeStruct((m, np_), out_dtype),
            jax.ShapeDtypeStruct((split_k, m, np_), jnp.float32),
        ),
        in_specs=[*in_specs, pl.BlockSpec((n_locks,), lambda j, s: (0,))],
        out_specs=(
            pl.BlockSpec((mp, bn), lambda j, s: (0, j)),
            pl.BlockSpec((split_k, mp, bn), lambda j, s: (0, 0, j)),
        ),
        name=name + "_ksum",
        **common,
    )(*args, locks)
    return y
