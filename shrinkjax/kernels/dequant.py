"""Pallas dequantize kernels (packed W -> bf16 W[K, N] in HBM) and the prefill path built on
them: ``y = dequantize(W) @ x`` with XLA's cuBLAS GEMM.

Why a separate pass for prefill. At large M a matmul is compute-bound: cuBLAS's bf16 GEMM runs
near tensor-core peak, while a Triton kernel that must also decode the weight in its inner loop
(the fused kernels) measured 2.3-4.7x slower at M = 4096, K = N = 8192 on an H100. Writing the
bf16 weight once costs a bandwidth-bound pass of ``packed + 2 K N`` bytes (about 168 MB ->
~60 µs at 3 TB/s for 8192 x 8192 int4) against a ~0.8 ms GEMM, so the prefill path lands within
~1.1x of a bf16 matmul. Decode (small M) keeps the fused kernels: there the weight stream *is*
the cost and reading 4-bit codes instead of bf16 is the whole gain. The switch is
``shrinkjax.kernels.dispatch.PREFILL_MIN_M`` (``path="auto"``); ``path="fused"`` /
``"dequant_dot"`` force either.

One program per ``[block_k, block_n]`` tile of W calls the format's own chunk decoder (the one
the fused kernel uses: bit layouts live in one place) with a callback that stores each decoded
``[width, block_n]`` tile. 2:4 layouts decode rows ``4j + p`` of in-group position ``p``; they
are stored through a ``[Kp/4, 4, Np]`` view of W (a free reshape). The result equals
:mod:`shrinkjax.kernels.reference`'s dequantization bit for bit (NVFP4 folds its f32
``tensor_scale`` in like ``reference.dequantize``: ``bf16(f32(e2m1 * e4m3) * tensor_scale)``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from shrinkjax.kernels import driver as D
from shrinkjax.kernels.layouts import N_ALIGN

# Default tile of W per program: rows (rounded to the layout chunk) x columns, and warps.
DEQUANT_BLOCK_K = 128
DEQUANT_BLOCK_N = 256
DEQUANT_WARPS = 8


@dataclasses.dataclass(frozen=True)
class Decoder:
    """How a packed format is decoded: ``chunk_fn(mac, w_refs, k, acc)`` over ``arrays``."""

    chunk_fn: Callable
    arrays: list
    name: str
    sparse24: bool = False  # rows come as (group j, position p): W[4j + p]
    tensor_scale: jax.Array | None = None  # NVFP4: f32 scalar folded into W


_DECODERS: dict[type, Callable] = {}


def register(packed_type: type):
    """Decorator for ``fn(packed) -> Decoder`` (each kernel module registers its format)."""

    def deco(fn):
        _DECODERS[packed_type] = fn
        return fn

    return deco


def decoder_for(p) -> Decoder:
    if type(p) not in _DECODERS:  # the format modules register on import
        import shrinkjax.kernels.fp4_matmul  # noqa: F401
        import shrinkjax.kernels.int_matmul  # noqa: F401
        import shrinkjax.kernels.sparse_matmul  # noqa: F401
    for t in type(p).__mro__:
        if t in _DECODERS:
            return _DECODERS[t](p)
    raise TypeError(f"no dequantize kernel for {type(p).__name__}")


@functools.partial(
    jax.jit, static_argnames=("interpret", "block_k", "block_n", "num_warps", "tensor_scale")
)
def dequantize_padded(
    p,
    *,
    interpret: bool,
    block_k: int = DEQUANT_BLOCK_K,
    block_n: int = DEQUANT_BLOCK_N,
    num_warps: int = DEQUANT_WARPS,
    tensor_scale: bool = True,
):
    """bf16 ``W[Kp, Np]`` (padding rows/columns are 0) from one Pallas kernel."""
    dec = decoder_for(p)
    chunk, kp, np_ = p.chunk, p.kp, p.np_
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    bk = D.rows_per_step(block_k, chunk, kp)
    bn = block_n if np_ % block_n == 0 else N_ALIGN
    unit = bk // 4 if dec.sparse24 else bk  # output rows (groups for 2:4) per program
    arrays = list(dec.arrays)
    nw = len(arrays)
    with_ts = tensor_scale and dec.tensor_scale is not None
    if with_ts:
        ts = jnp.asarray(dec.tensor_scale, jnp.float32).reshape(1, 1)
        arrays.append(jnp.broadcast_to(ts, (1, np_)))

    def kernel(*refs):
        w_refs, o_ref = refs[:nw], refs[-1]
        base = pl.program_id(0) * unit

        def store(acc, prefix, k_start, wd, w, s=None, zoff=None):
            w = D.apply_scale(w, s, zoff)
            if with_ts:
                w = (w.astype(jnp.float32) * refs[nw][...]).astype(jnp.bfloat16)
            o_ref[(pl.ds(k_start - base, wd), *prefix, slice(None))] = w
            return acc

        for c in range(bk // chunk):
            k = pl.multiple_of(pl.program_id(0) * bk + c * chunk, chunk)
            dec.chunk_fn(store, w_refs, k, None)

    in_specs = [
        pl.BlockSpec(a.shape[:-1] + (bn,), functools.partial(_w_map, nd=a.ndim)) for a in arrays
    ]
    if dec.sparse24:
        out_shape = jax.ShapeDtypeStruct((kp // 4, 4, np_), jnp.bfloat16)
        out_spec = pl.BlockSpec((unit, 4, bn), lambda i, j: (i, 0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((kp, np_), jnp.bfloat16)
        out_spec = pl.BlockSpec((bk, bn), lambda i, j: (i, j))
    w = D.pallas_gpu_call(
        kernel,
        out_shape=out_shape,
        grid=(kp // bk, np_ // bn),
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=1,
        name=dec.name,
    )(*arrays)
    return w.reshape(kp, np_)


def _w_map(i, j, *, nd):
    return (0,) * (nd - 1) + (j,)


def dequantize(p, *, interpret=None, tensor_scale: bool = True, **tiles):
    """bf16 ``W[K, N]`` of a packed weight through the Pallas dequantize kernel (interpret
    mode on CPU). ``tensor_scale=False`` leaves NVFP4's tensor scale out (the exact bf16
    ``e2m1 * e4m3``). ``tiles``: ``block_k``, ``block_n``, ``num_warps``."""
    w = dequantize_padded(
        p, interpret=D.resolve_interpret(interpret), tensor_scale=tensor_scale, **tiles
    )
    return w[: p.k, : p.n]


@functools.partial(jax.jit, static_argnames=("interpret",))
def dequant_matmul_2d(x2, p, interpret: bool):
    """The prefill path: ``x2[M, K] @ dequantize(W)`` with XLA's GEMM, returns ``x2.dtype``.

    bf16 x gets a bf16-output GEMM (cuBLAS accumulates in f32 and rounds once in its epilogue;
    an f32 output would cost an extra f32 write + read + convert pass over ``M x N``)."""
    w = dequantize_padded(p, interpret=interpret)  # [Kp, Np]
    xb = x2.astype(jnp.bfloat16)
    if p.kp != p.k:
        xb = jnp.pad(xb, ((0, 0), (0, p.kp - p.k)))  # padding rows of W are 0
    if x2.dtype == jnp.bfloat16:
        y = jnp.dot(xb, w, preferred_element_type=jnp.bfloat16)
    else:
        y = jnp.dot(xb, w, preferred_element_type=jnp.float32).astype(x2.dtype)
    return y[:, : p.n] if p.np_ != p.n else y
