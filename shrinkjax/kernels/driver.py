"""The Pallas driver shared by every packed-weight kernel: tile configurations, the fused tiled
matmul loop, and :func:`run_packed`, the entry point that picks the GPU path per call.

Two paths (chosen by :func:`shrinkjax.kernels.dispatch.choose_path` from the rows ``M`` of x):

* **fused** (decode, small M): :func:`run_tiled_matmul` streams the packed weight once and
  dequantizes each tile in registers right before its tensor-core dot (or CUDA-core FMAs).
  Memory-bound; tiles come from :func:`choose_config` (measured table in
  :mod:`shrinkjax.kernels.tuned` for M <= 16, heuristics otherwise).
* **dequant_dot** (prefill, M >= ``dispatch.PREFILL_MIN_M``): :mod:`shrinkjax.kernels.dequant`
  writes the bf16 weight to HBM with a bandwidth-bound Pallas kernel and cuBLAS multiplies.
  Compute-bound GEMMs are cuBLAS's strength; a Triton kernel that also decodes in its inner
  loop measured 2.3-4.7x slower than bf16 cuBLAS at M = 4096.

Both paths decode with the same per-chunk functions of the format modules, so each bit layout
is written once: a chunk function reads one K chunk of the packed weight and hands the decoded
tile to a callback ``mac(acc, prefix, k_start, width, w, s=None, zoff=None)`` whose
dequantized value is ``(w - zoff) * s`` (:func:`apply_scale`). The fused kernel's callback
multiplies it into the accumulator; the dequantize kernel's callback stores it.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from shrinkjax.kernels import dispatch, tuned
from shrinkjax.kernels.layouts import (
    N_ALIGN,
    Packed24,
    PackedInt,
    PackedMXFP4,
    PackedNVFP4,
    packed_nbytes,
    round_up,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # jax 0.11 deprecates the Triton backend (still present)
    try:
        from jax.experimental.pallas import triton as plgpu
    except ImportError:  # pragma: no cover - jax without the Triton backend
        plgpu = None


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int  # K rows per loop step (multiple of the layout chunk)
    split_k: int
    num_warps: int
    num_stages: int
    fma: bool = False  # CUDA-core GEMV accumulation instead of tensor-core dots (M <= 8)
    # Tensor-core path: dot the raw decoded codes and apply the group scale / zero point to the
    # [bm, bn] dot result (``s * (x @ w_raw - zoff * sum(x))``) instead of to every weight:
    # fewer ALU ops per weight when bm < the rows per scale (int4 g128: 16 vs 64).
    late_scale: bool = False


# The tensor-core decode kernels' MMA token side (N, x's rows padded) at least: 8 with 2 warps
# (mma.sync m16n8k16: M <= 8 tokens in one n8 tile), 16 with 4 (wgmma). H100, 8192², N = 8
# against 16 (ninth session): M = 1 int4 17.4 / 18.0 µs, 2:4-int4 20.4 / 22.2; M = 4 MXFP4
# 18.2 / 20.7; M = 8 NVFP4 23.5 / 27.9. With wgmma N = 8 was slower (int4 M = 8: 29.1 / 20.9).
MMA_SYNC_MIN_N, WGMMA_MIN_N = 8, 16
FMA_MAX_M = 0  # default to the FMA decode path for M <= this (0: tensor-core path always)


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0) or 132)
    except Exception:  # pragma: no cover
        return 132


def kernel_kind(p) -> str:
    """The name of a packed weight's kernel in :mod:`~shrinkjax.kernels.tuned` and benchmarks."""
    if isinstance(p, PackedInt):
        return f"int{p.bits}_g{p.group}"
    if isinstance(p, PackedMXFP4):
        return "mxfp4"
    if isinstance(p, PackedNVFP4):
        return "nvfp4"
    if isinstance(p, Packed24):
        return "2:4_int4" if p.is_int4 else "2:4_bf16"
    return type(p).__name__


def _tuned_split(entry: dict, bn: int, np_: int, kp: int, chunk: int) -> int:
    """The tuned split-K rescaled to keep about the tuned number of programs on this shape."""
    programs = max(1, tuned.TUNED_SHAPE[1] // entry.get("block_n", bn)) * entry["split_k"]
    want = max(1, programs // max(1, np_ // bn))
    s = 1 << (want.bit_length() - 1)  # largest power of two <= want
    while s > 1 and (kp // chunk) % s:
        s //= 2
    return s


def choose_config(
    m: int,
    kp: int,
    np_: int,
    chunk: int,
    weight_bytes: int,
    *,
    kind: str | None = None,
    block_m=None,
    block_n=None,
    block_k=None,
    split_k=None,
    num_warps=None,
    num_stages=None,
    fma=None,
    late_scale=None,
) -> TileConfig:
    """Tile configuration (explicit arguments win, then the tuned table, then heuristics).

    * decode (M <= 16): ``tuned.lookup(kind, m)`` when measured; else one 16-row M tile (rows
      >= M are masked, never read), 64-column N tiles and split-K so that ~4 programs per SM
      stream the weight; the f32 partials (at most a quarter of the weight bytes) are summed
      by XLA.
    * M >= 256 (the fused path; large M normally takes dequant_dot): 128x128 tensor-core
      tiles, 8 warps, 3 pipeline stages (64x128 and 4 warps when that gives fewer tiles than
      SMs).
    * in between: 32/64-row tiles, 64-column tiles, split-K for at least 2 programs per SM.
    """
    entry = tuned.lookup(kind, m)
    if entry:
        block_m = block_m or entry.get("block_m")
        block_n = block_n or entry.get("block_n")
        block_k = block_k or entry.get("block_k")
        num_warps = num_warps or entry.get("num_warps")
        num_stages = num_stages or entry.get("num_stages")
        if fma is None and m <= 8 and entry.get("fma"):
            fma = True
        if late_scale is None:
            late_scale = entry.get("late_scale")
    fma = (m <= FMA_MAX_M) if fma is None else bool(fma)
    if fma and m > 8:
        raise ValueError(f"the FMA (GEMV) path supports M <= 8, got M={m}")
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 256, 4, 4
    elif m < 256:
        bm, bn, bk, warps, stages = (32 if m <= 32 else 64), 64, 128, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 128, 8, 3
    if m >= 256 and block_m is None and block_n is None:
        # Too few 128x128 tiles to fill the SMs (e.g. M=256, N=4096): use 64-row tiles.
        if -(-m // bm) * (np_ // bn) < _num_sms():
            bm, warps = 64, 4
    bm = block_m or bm
    if fma:
        bm = 16  # one program row-block holds all M <= 8 rows
    bn = block_n or bn
    bk = block_k or bk
    for name, v in (("block_m", bm), ("block_n", bn)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    bn = min(bn, N_ALIGN) if np_ % bn else bn
    if np_ % bn:
        raise ValueError(f"block_n={bn} does not divide the padded N={np_}")
    if split_k is not None and (split_k < 1 or (kp // chunk) % split_k):
        raise ValueError(
            f"split_k={split_k} must divide the {kp // chunk} K chunks of {chunk} rows (Kp={kp})"
        )
    if split_k is None and entry and "split_k" in entry:
        split_k = _tuned_split(entry, bn, np_, kp, chunk)
    # block_k: a multiple of the layout chunk dividing the K rows of one split.
    ks = kp // (split_k or 1)
    bk = max(chunk, (min(bk, ks) // chunk) * chunk)
    while ks % bk:
        bk -= chunk
    steps = kp // bk
    nm = -(-m // bm)
    nn = np_ // bn
    if split_k is None:
        target = (4 if m <= 16 else 2) * _num_sms()
        s = 1
        while (
            nm * nn * s < target
            and steps % (2 * s) == 0
            and steps // (2 * s) >= 2
            and 2 * s * m * np_ * 4 <= 0.25 * weight_bytes
        ):
            s *= 2
        split_k = s
    assert steps % split_k == 0, (steps, split_k)
    return TileConfig(
        bm, bn, bk, split_k, num_warps or warps, num_stages or stages, fma, bool(late_scale)
    )


def config_for(packed, m: int, **overrides) -> TileConfig:
    """The tile configuration the fused kernel uses for ``m`` rows of x and this weight."""
    if isinstance(packed, Packed24) and overrides.get("num_stages") is None and m > 16:
        # The 8-dot 2:4 chunk stages a lot of x: 4 stages (M tile 64) or 3 (M tile 128)
        # exceed Hopper's 227 KB of shared memory.
        overrides["num_stages"] = 3 if m < 256 else 2
    return choose_config(
        m,
        packed.kp,
        packed.np_,
        packed.chunk,
        packed_nbytes(packed),
        kind=kernel_kind(packed),
        **overrides,
    )


def resolve_interpret(interpret):
    """None -> True on CPU (Pallas interpret mode), False on GPU."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def use_kernel_backend() -> bool:
    """True where the Pallas (Triton) kernels compile natively."""
    return jax.default_backend() == "gpu"


def on_tpu() -> bool:
    """True where the Pallas TPU (Mosaic) kernels compile natively."""
    return jax.default_backend() == "tpu"


TUNING_KEYS = (
    "block_m",
    "block_n",
    "block_k",
    "split_k",
    "num_warps",
    "num_stages",
    "fma",
    "late_scale",
)


def packed_linear(matmul, ref, x, w, path="auto"):
    """The dispatch implementation of a packed layout: ``matmul`` (the public kernel entry
    point) where the Triton kernels compile natively (GPU), the Pallas TPU kernel
    (:mod:`shrinkjax.kernels.tpu_matmul`) on a TPU for the layouts it covers, else the pure-jnp
    ``ref(x2, w)``."""
    if use_kernel_backend():
        return matmul(x, w, path=path)
    if on_tpu():
        from shrinkjax.kernels import tpu_matmul  # imports this module

        if isinstance(w, tpu_matmul.FORMATS):
            return tpu_matmul.tpu_matmul(x, w)
    x2, lead = flatten_x(x, w.k)
    return ref(x2, w).reshape(*lead, w.n)


def register_packed(cls, matmul, ref):
    """Register layout ``cls`` with ``dispatch.linear``: :func:`packed_linear` of its kernel
    entry point ``matmul`` and pure-jnp ``ref``."""
    dispatch.register(cls)(lambda x, w, **kw: packed_linear(matmul, ref, x, w, **kw))


def rows_per_step(block_k: int, chunk: int, kp: int) -> int:
    """K rows per program / grid step: a multiple of the layout chunk, at most ``block_k``
    (at least one chunk), dividing Kp."""
    bk = max(chunk, (min(block_k, kp) // chunk) * chunk)
    while kp % bk:
        bk -= chunk
    return bk


def run_packed(kernel_2d, x, packed, interpret=None, *, path="auto", **tuning):
    """``x[..., K] @ W`` for a packed weight; every public kernel entry point goes through here.

    Flattens the leading dims and picks the path (``dispatch.choose_path``; explicit tile
    arguments in ``tuning`` imply the fused kernel under ``path="auto"``): the fused
    ``kernel_2d(x2, packed, cfg, interpret)`` with :func:`config_for`'s tiles, or
    :func:`shrinkjax.kernels.dequant.dequant_matmul_2d`."""
    unknown = sorted(set(tuning) - set(TUNING_KEYS))
    if unknown:
        raise TypeError(f"unknown tile arguments {unknown}; known: {list(TUNING_KEYS)}")
    x2, lead = flatten_x(x, packed.k)
    if path == "auto" and any(v is not None for v in tuning.values()):
        path = "fused"
    if dispatch.choose_path(path, x2.shape[0]) == "dequant_dot":
        from shrinkjax.kernels import dequant  # dequant imports this module

        y = dequant.dequant_matmul_2d(x2, packed, resolve_interpret(interpret))
    else:
        cfg = config_for(packed, x2.shape[0], **tuning)
        y = _run_fitting_smem(kernel_2d, x2, packed, cfg, resolve_interpret(interpret), tuning)
    return y.reshape(*lead, packed.n)


SMEM_ERROR = "Shared memory size limit exceeded"


def _run_fitting_smem(kernel_2d, x2, packed, cfg, interpret, tuning):
    """Run the fused kernel; when Triton rejects the tiles for shared memory (a large explicit
    ``block_n``/``block_k`` with a deep pipeline), drop pipeline stages unless ``num_stages`` was
    given, else raise a ValueError naming the configuration. (Eager calls only: under an outer
    jit the compilation, and so this error, happens later.)"""
    while True:
        try:
            return kernel_2d(x2, packed, cfg, interpret)
        except Exception as e:  # JaxRuntimeError: RESOURCE_EXHAUSTED at compile time
            if SMEM_ERROR not in str(e):
                raise
            if tuning.get("num_stages") is not None or cfg.num_stages <= 1:
                raise ValueError(
                    f"{type(packed).__name__} {packed.shape}: tiles {cfg} need more shared "
                    f"memory than this GPU has; use a smaller block_n / block_k or fewer "
                    f"num_stages ({str(e).splitlines()[0][:200]})"
                ) from e
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)


def can_mask() -> bool:
    return plgpu is not None and hasattr(plgpu, "store") and hasattr(plgpu, "load")


def token_rows(view, m: int):
    """Load a kernel ref ``view`` whose axis 0 is the token axis (rows of x padded to the MMA's
    width), rows ``>= m`` read as 0: a masked load, or a plain one when the view holds exactly
    ``m`` rows. Shared by the tensor-core decode kernels (int4_tc, fp4_tc, sparse24_tc)."""
    if view.shape[0] == m:
        return view[...]
    rows = jax.lax.broadcasted_iota(jnp.int32, view.shape, 0)
    zero = 0 if jnp.issubdtype(view.dtype, jnp.integer) else 0.0
    return plgpu.load(view, mask=rows < m, other=zero)


def prepare_x(x, kp: int, bm: int):
    """x [M, K] -> bf16 x zero-padded to Kp columns (and to a multiple of ``bm`` rows only if
    masked loads/stores are unavailable)."""
    m, k = x.shape
    xb = x.astype(jnp.bfloat16)
    mp = m if can_mask() else round_up(m, bm)
    if (mp, kp) != (m, k):
        xb = jnp.pad(xb, ((0, mp - m), (0, kp - k)))
    return xb


def apply_scale(w, s=None, zoff=None):
    """The dequantized bf16 tile ``(w - zoff) * s`` (None = absent), in ``w``'s precision
    (bf16 for int4/FP4, f32 for int8) and rounded once to bf16 at the end."""
    if zoff is not None:
        w = w - zoff
    if s is not None:
        w = w * s
    return w.astype(jnp.bfloat16)


def _f32(v):
    return v if isinstance(v, float | int) else v.astype(jnp.float32)


def compiler_params(cfg_warps: int, cfg_stages: int, interpret: bool):
    if interpret or plgpu is None:
        return None
    return plgpu.CompilerParams(num_warps=cfg_warps, num_stages=cfg_stages)


def pallas_gpu_call(kernel, *, num_warps: int, num_stages: int, interpret: bool, **kw):
    """``pl.pallas_call(kernel, **kw)`` for the Triton lowering (``num_warps`` / ``num_stages``;
    none in interpret mode), as a function of the kernel's arrays. Every GPU kernel here goes
    through it. jax's DeprecationWarnings are silenced while it is built and traced: the
    ``None`` block dims that older jax needs for squeezed axes (``pl.squeezed`` is newer) warn
    on newer jax."""

    def run(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            params = compiler_params(num_warps, num_stages, interpret)
            call = pl.pallas_call(kernel, interpret=interpret, compiler_params=params, **kw)
            return call(*args)

    return run


def run_tiled_matmul(
    chunk_fn,
    x_arr,
    w_arrs,
    *,
    m: int,
    kp: int,
    np_: int,
    chunk: int,
    cfg: TileConfig,
    interpret: bool,
    name: str,
    width: int,
    out_dtype=jnp.float32,
):
    """Run ``acc = chunk_fn(mac, w_refs, k_row, acc)`` over K for every (M, N) tile.

    ``chunk_fn`` decodes one K chunk of the weight into ``[width, bn]`` tiles and accumulates
    each with ``acc = mac(acc, prefix, k_start, width, w, s, zoff)``, which multiplies the
    dequantized tile ``(w - zoff) * s`` by ``x[prefix..., :, k_start:k_start+width]``:

    * tensor-core mode: ``acc`` is f32 ``[bm, bn]``; ``mac`` loads the x tile (rows >= M are
      masked to 0, never read) and adds ``jnp.dot(x_tile, w)``; with ``cfg.late_scale`` it
      adds ``s * (x_tile @ w - zoff * rowsum(x_tile))`` instead (``w`` must then be the exact
      bf16 codes).
    * FMA (GEMV) mode (``cfg.fma``, M <= 8): x is transposed to ``[..., Kp, M]``; ``acc`` is a
      tuple of M f32 ``[width, bn]`` tiles, ``acc[r] += x[r, k:k+width, None] * w``, reduced
      over K once at the end. No tensor cores, no shared-memory round trip of W.

    ``x_arr``: activations (from :func:`prepare_x`) with the M axis second to last (``[M, Kp]``
    or ``[4, M, Kp/4]``). ``w_arrs``: weight arrays with ``Np`` last; each block is whole
    except ``block_n`` columns. Grid = (M tiles, N tiles, split-K). Returns f32 ``[S, M, Np]``
    partials for the caller to sum (S > 1) or ``[M, Np]`` in ``out_dtype`` (S = 1: written
    directly, no extra XLA pass).
    """
    bm, bn, bk, nsplit = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k
    fma = cfg.fma
    late = cfg.late_scale and not fma
    mrows = x_arr.shape[-2]  # = m, or m padded to bm when masking is unavailable
    if fma:
        bm = mrows
        x_arr = jnp.swapaxes(x_arr, -1, -2)  # [..., Kp, M]
    nm, nn = -(-mrows // bm), np_ // bn
    ks = kp // nsplit
    steps = ks // bk
    masked = (not fma) and mrows % bm != 0
    n_chunks = bk // chunk
    out_dt = jnp.float32 if nsplit > 1 else out_dtype

    def kernel(x_ref, *refs):
        w_refs, o_ref = refs[:-1], refs[-1]
        i = pl.program_id(0)
        s_id = pl.program_id(2)

        def mac_dot(acc, prefix, k_start, wd, w, s=None, zoff=None):
            idx = (*prefix, slice(None), pl.ds(k_start, wd))
            if masked:
                view = x_ref.at[idx]
                rows = i * bm + jax.lax.broadcasted_iota(jnp.int32, view.shape, 0)
                xs = plgpu.load(view, mask=rows < mrows, other=0.0)
            else:
                xs = x_ref[idx]
            if not late:
                w = apply_scale(w, s, zoff)
                return acc + jnp.dot(xs, w, preferred_element_type=jnp.float32)
            d = jnp.dot(xs, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
            if zoff is not None:
                d = d - jnp.sum(xs.astype(jnp.float32), axis=1, keepdims=True) * _f32(zoff)
            if s is not None:
                d = d * _f32(s)
            return acc + d

        def mac_fma(acc, prefix, k_start, wd, w, s=None, zoff=None):
            wf = apply_scale(w, s, zoff).astype(jnp.float32)
            out = []
            for r in range(mrows):
                xc = x_ref[(*prefix, pl.ds(k_start, wd), pl.ds(r, 1))]  # [wd, 1]
                out.append(acc[r] + xc.astype(jnp.float32) * wf)
            return tuple(out)

        mac = mac_fma if fma else mac_dot

        def body(t, acc):
            k0 = s_id * ks + t * bk
            for c in range(n_chunks):
                acc = chunk_fn(mac, w_refs, pl.multiple_of(k0 + c * chunk, chunk), acc)
            return acc

        if fma:
            acc0 = tuple(jnp.zeros((width, bn), jnp.float32) for _ in range(mrows))
            acc = jax.lax.fori_loop(0, steps, body, acc0)
            for r in range(mrows):
                o_ref[pl.ds(r, 1), :] = jnp.sum(acc[r], axis=0, keepdims=True).astype(out_dt)
            return
        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
        if masked:
            rows = i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
            plgpu.store(o_ref, acc.astype(out_dt), mask=rows < mrows)
        else:
            o_ref[...] = acc.astype(out_dt)

    xnd = x_arr.ndim
    if fma:
        x_block = tuple(x_arr.shape)
    else:
        x_block = tuple(x_arr.shape[:-2]) + (bm, x_arr.shape[-1])

    def x_map(i, j, s):
        return (0,) * (xnd - 2) + ((0, 0) if fma else (i, 0))

    in_specs = [pl.BlockSpec(x_block, x_map)]
    for w in w_arrs:
        in_specs.append(
            pl.BlockSpec(tuple(w.shape[:-1]) + (bn,), functools.partial(_w_map, nd=w.ndim))
        )
    if nsplit > 1:
        out_shape = jax.ShapeDtypeStruct((nsplit, mrows, np_), out_dt)
        squeezed = getattr(pl, "squeezed", None)  # `None` on older jax
        out_spec = pl.BlockSpec((squeezed, bm, bn), lambda i, j, s: (s, i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((mrows, np_), out_dt)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    out = pallas_gpu_call(
        kernel,
        out_shape=out_shape,
        grid=(nm, nn, nsplit),
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        name=f"{name}_k{kp}n{np_}m{mrows}",  # shape: per-shape traces
    )(x_arr, *w_arrs)
    return out[..., :m, :] if mrows != m else out


def _w_map(i, j, s, *, nd):
    return (0,) * (nd - 1) + (j,)


def finish(out, n: int, dtype, scale=None):
    """Sum split-K partials, apply an optional scalar scale, slice padding, cast."""
    y = out.sum(axis=0) if out.ndim == 3 else out
    if scale is not None:
        y = y.astype(jnp.float32) * scale
    if y.shape[-1] != n:
        y = y[:, :n]
    return y.astype(dtype)


def flatten_x(x, k: int):
    if x.ndim < 1 or x.shape[-1] != k:
        xk = x.shape[-1] if x.ndim else None
        raise ValueError(f"x has K={xk} (shape {x.shape}) but the weight has K={k}")
    lead = x.shape[:-1]
    return x.reshape(-1, k), lead


def idiv(a, b: int):
    """Truncating integer division of a traced non-negative int32 scalar by a constant."""
    return jax.lax.div(a, np.int32(b))


def as_bf16_bits(u16):
    return jax.lax.bitcast_convert_type(u16, jnp.bfloat16)


def widen_bits(v):
    """A loaded 8- or 16-bit value (any dtype) -> its bits zero-extended to uint32.

    For values loaded a loop iteration ahead (the decode kernels' scales and x): a loop-carried
    8/16-bit value lives in half a register, and ptxas moves it there with a ``PRMT`` that waits
    for the load in the iteration that issued it; widened at the load (``ld.u8`` / ``ld.u16``
    into a 32-bit register), the value is carried as is (ncu, H100, tenth session)."""
    bits = v.dtype.itemsize * 8
    if bits == 32:
        return jax.lax.bitcast_convert_type(v, jnp.uint32)
    if bits not in (8, 16):
        raise ValueError(f"widen_bits takes 8/16/32-bit values, got {v.dtype}")
    uint = jnp.uint8 if bits == 8 else jnp.uint16
    return jax.lax.bitcast_convert_type(v, uint).astype(jnp.uint32)


def bf16_bits_to_f32(w):
    """uint32 holding bf16 bits in its low half (:func:`widen_bits`) -> the f32 value, exactly."""
    return jax.lax.bitcast_convert_type(w << 16, jnp.float32)


def f16_bits_to_f16(w):
    """uint32 holding f16 bits in its low half (:func:`widen_bits`) -> the f16 value."""
    return jax.lax.bitcast_convert_type(w.astype(jnp.uint16), jnp.float16)


def decode_or_prefill(x, t, matmul, dequantize, *, max_m, path="auto", interpret=None, **tuning):
    """The dispatch entry point of the tensor-core decode layouts (int4_tc, fp4_tc,
    sparse24_tc): ``x[..., K] @ W`` in ``x.dtype``.

    ``path``: ``"fused"`` (``matmul(x2, t, interpret=..., **tuning)``, at most ``max_m`` rows),
    ``"dequant_dot"`` (``dequantize(t, interpret=...)`` -> bf16 ``W [Kw, Np]``, then one cuBLAS
    GEMM with a bf16 output for bf16 x: f32 accumulation, one rounding in its epilogue) or
    ``"auto"`` (fused below ``dispatch.PREFILL_MIN_M`` rows and at most ``max_m``)."""
    from shrinkjax.kernels import dispatch

    x2, lead = flatten_x(x, t.k)
    m = x2.shape[0]
    path = dispatch.choose_path(path, m)
    if path == "fused" and m > max_m:
        path = "dequant_dot"
    interpret = resolve_interpret(interpret)
    if path == "fused":
        y = matmul(x2, t, interpret=interpret, **tuning)
    else:
        w = dequantize(t, interpret=interpret)  # [Kw, Np]
        xb = x2.astype(jnp.bfloat16)
        if t.kw != t.k:
            xb = jnp.pad(xb, ((0, 0), (0, t.kw - t.k)))
        out_t = jnp.bfloat16 if x2.dtype == jnp.bfloat16 else jnp.float32
        y = jnp.matmul(xb, w, preferred_element_type=out_t)[:, : t.n].astype(x.dtype)
    return y.reshape(*lead, t.n)


def mma_tokens(m: int, num_warps: int) -> int:
    """The MMA's token side for ``m`` rows of x: ``m`` rounded up to a power of two, at least
    ``MMA_SYNC_MIN_N`` with 2 warps (``mma.sync``) and ``WGMMA_MIN_N`` otherwise."""
    least = MMA_SYNC_MIN_N if num_warps == 2 else WGMMA_MIN_N
    return max(least, 1 << (m - 1).bit_length())


def split_for(programs: int, steps: int, *, per_sm: int, min_steps: int = 1, at_most=False) -> int:
    """The K split of the tensor-core decode kernels: a power of two dividing ``steps`` that
    leaves each program at least ``min_steps`` loop steps; doubled until ``programs * split``
    reaches ``per_sm`` programs per SM (``at_most=False``), or while doubling stays within
    that (``at_most=True``)."""
    target, split = per_sm * _num_sms(), 1
    while steps % (2 * split) == 0 and steps // (2 * split) >= min_steps:
        if (2 * programs * split > target) if at_most else (programs * split >= target):
            break
        split *= 2
    return split


def call_2d(kernel_2d, x, t, *, interpret=None, **kw):
    """``kernel_2d(x2, t, out_dtype=x.dtype, interpret=..., **kw)`` on bf16 ``x`` flattened to
    ``[M, K]``; the result in ``x.dtype`` with x's leading axes (the tc kernels' wrappers)."""
    x2, lead = flatten_x(x, t.k)
    y = kernel_2d(
        x2.astype(jnp.bfloat16),
        t,
        out_dtype=jnp.dtype(x.dtype),
        interpret=resolve_interpret(interpret),
        **kw,
    )
    return y.astype(x.dtype).reshape(*lead, t.n)


def program_rows(t, rows: int | None) -> tuple[int, int]:
    """``(rows, parts)`` for programs of ``rows`` weight rows (None: the packed tile
    ``t.block_n``) over a tensor-core layout: ``parts`` programs share a packed tile, each
    streaming its contiguous ``rows``-row part of every block. ``rows`` must be a multiple of 64
    dividing ``t.block_n``."""
    rows = t.block_n if rows is None else rows
    if t.block_n % rows or rows % 64:
        raise ValueError(
            f"rows {rows} must be a multiple of 64 dividing the packed block_n {t.block_n}"
        )
    return rows, t.block_n // rows


def row_part_spec(steps: int, rows: int, width: int, parts: int):
    """BlockSpec of a ``[tiles, steps, block_n, width]`` weight array for grid ``(j, s)``:
    program ``j`` reads rows ``(j % parts) * rows ...`` of tile ``j // parts``, all steps."""
    squeezed = getattr(pl, "squeezed", None)
    return pl.BlockSpec((squeezed, steps, rows, width), lambda j, s: (j // parts, 0, j % parts, 0))


class TcLayout:
    """Mixin of the tensor-core decode layouts (``TcInt4``, ``TcFP4``, ``Tc24``): padded sizes
    from the streamed array ``STREAM`` ``[Np/bn, Kw/STEP_ROWS, bn, 16]`` (``kw``: K padded,
    ``np_``: N padded), the logical ``shape`` (K, N) and ``kp``, the padded-K name the other
    layouts use."""

    STREAM = "words"  # the data field streamed one K step per block
    STEP_ROWS = 128  # dense K rows per block of STREAM

    @property
    def kw(self) -> int:
        return getattr(self, self.STREAM).shape[1] * self.STEP_ROWS

    @property
    def np_(self) -> int:
        return getattr(self, self.STREAM).shape[0] * self.block_n

    @property
    def kp(self) -> int:
        return self.kw

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)
