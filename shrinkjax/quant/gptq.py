"""GPTQ: accurate post-training quantization from second-order information.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323), Algorithm 1.

Our kernels are ``[K, N] = [in, out]``, so GPTQ walks over the K *rows* (the reference walks
over the columns of a torch ``[out, in]`` weight). For a layer with inputs ``X [T, K]`` the
Hessian of ``||X W - X Q||²`` is ``H = 2 XᵀX / T``; every row k is rounded in turn and its
error ``(w_k - q_k) / [H⁻¹]_kk`` is spread over the not-yet-quantized rows through the upper
Cholesky factor of ``H⁻¹``. Details follow the reference implementation:

* dead inputs (``H_kk = 0``): ``H_kk = 1`` and the weight row is zeroed;
* dampening ``λ = percdamp · mean(diag H)`` added to the diagonal (``percdamp = 0.01``);
* ``U = chol(H⁻¹)ᵀ`` (upper), computed once; "lazy batch" updates in blocks of 128 rows: the
  row loop touches only its block, the rest of W receives one matmul per block;
* group qparams are fitted when a row starts a group, from the error-updated weights;
* ``act_order`` visits rows by decreasing ``H_kk``; it always uses *static groups*: qparams of
  every group are fitted up front on the original row order (as the reference's
  ``static_groups=True``), so the stored groups stay contiguous along K and no ``g_idx``
  permutation is needed at inference;
* a failed Cholesky (NaNs: H not positive definite) retries with 10× the damping, and after
  ``damp_retries`` failures falls back to round-to-nearest with a warning;
* ``mse_grid > 0`` (the reference quantizer's ``mse=True`` option): each group's qparams are
  chosen from ``shrink = 1 - i / mse_grid`` (``i < max_shrink · mse_grid``) clipped ranges
  ``[shrink · lo, shrink · hi]`` as the one minimising ``Σ |w - Q(w)|^mse_norm`` over the
  group's rows, per output column (formats whose qparams are per column only).

Any :mod:`shrinkjax.quant.formats` format works (int-k, FP8, NF4, MXFP4, NVFP4): GPTQ only
needs the format's ``fit`` (qparams of one group) and ``fake_quant`` (round rows onto fixed
qparams) and builds the final :class:`~shrinkjax.quant.array.QuantizedArray` with
``from_groups``.

Speed: the whole per-layer solve is one jitted function (``lax.fori_loop`` over blocks and
rows with dynamic slices), compiled once per (shape, format): all 210 linears of SmolLM2-135M
reuse 4 compilations.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """GPTQ knobs (reference defaults)."""

    block_size: int = 128  # rows per lazy-batch block
    percdamp: float = 0.01  # dampening, fraction of mean(diag H)
    act_order: bool = False  # visit rows by decreasing H_kk (implies static groups)
    static_groups: bool = False  # fit all group qparams on the original weight up front
    damp_retries: int = 3  # ×10 damping per retry when Cholesky fails, then RTN
    unroll: int = 1  # lax.fori_loop unroll of the row loop
    mse_grid: int = 0  # > 0: clipping grid search when fitting group qparams (ref.: 100)
    max_shrink: float = 0.8  # smallest range tried = (1 - max_shrink) · min-max range
    mse_norm: float = 2.4  # the search's error norm (reference value)


@dataclasses.dataclass
class GPTQResult:
    qarray: Any  # QuantizedArray (or the RTN one on fallback)
    w_hat: jax.Array  # dequantized weight [K, N], f32
    loss: float  # GPTQ's proxy: sum_k ||w_k - q_k||² / (2 [H⁻¹]_kk²)
    percdamp: float  # damping actually used
    fallback: str | None = None  # "rtn" when Cholesky failed at every damping
    seconds: float = 0.0

    def report(self) -> dict:
        r = {"gptq_loss": self.loss, "percdamp": self.percdamp, "seconds": self.seconds}
        if self.fallback:
            r["fallback"] = self.fallback
        return r


# --------------------------------------------------------------------------------------------
# Hessian statistics (what the calibration engine accumulates per linear).


def hessian_init(k: int) -> dict:
    """Empty Hessian statistics for a K-input linear: sum of xᵀx (f32) and the row count."""
    return {"xtx": jnp.zeros((k, k), jnp.float32), "n": jnp.zeros((), jnp.float32)}


def hessian_update(stats: dict, x_TxK: jax.Array) -> dict:
    """Fold T input rows into the statistics (f32 accumulation, full precision). Jittable."""
    x = x_TxK.reshape(-1, x_TxK.shape[-1]).astype(jnp.float32)
    xtx = jnp.matmul(x.T, x, precision=HIGHEST, preferred_element_type=jnp.float32)
    return {"xtx": stats["xtx"] + xtx, "n": stats["n"] + x.shape[0]}


def hessian(stats: dict) -> jax.Array:
    """H = 2 XᵀX / n (the reference's running average)."""
    return 2.0 * stats["xtx"] / jnp.maximum(stats["n"], 1.0)


# --------------------------------------------------------------------------------------------
# Group qparams: min-max, or the reference's clipping grid search.


def searchable(fmt) -> bool:
    """Whether :func:`fit_mse` applies: qparams strictly per group and output column."""
    return fmt.spec.granularity != "tensor" and set(fmt.qparam_keys) <= {"scales", "zeros"}


def fit_mse(fmt, w_RxN, tensor_amax, *, grid: int, max_shrink: float, norm: float):
    """qparams of the ``R / G`` groups of ``w_RxN`` (R a multiple of the group size G) that
    minimise ``Σ_rows |w - Q(w)|^norm`` per group and column over the clipped ranges
    ``[p · min(w, 0), p · max(w, 0)]``, ``p = 1 - i / grid`` for ``i < max_shrink · grid``
    (``i = 0`` is the plain min-max fit, so the result is never worse than it). Jittable."""
    r, n = w_RxN.shape
    g = min(fmt.group_rows(r), r)
    ng = r // g
    wg = w_RxN.reshape(ng, g, n)
    lo = jnp.minimum(jnp.min(wg, axis=1, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(wg, axis=1, keepdims=True), 0.0)

    def one(p):
        wc = jnp.clip(wg, p * lo, p * hi).reshape(r, n)
        qp = fmt.fit(wc, tensor_amax=tensor_amax)
        d = jnp.abs(fmt.fake_quant(w_RxN, qp) - w_RxN).reshape(ng, g, n)
        return qp, jnp.sum(d**norm, axis=1)  # [ng, N]

    steps = max(1, int(max_shrink * grid))
    qps, errs = jax.lax.map(one, 1.0 - jnp.arange(steps, dtype=jnp.float32) / grid)
    best = jnp.argmin(errs, axis=0)  # [ng, N]; ties -> the widest range
    return jax.tree.map(lambda a: jnp.take_along_axis(a, best[None], axis=0)[0], qps)


def _fit(fmt, w_RxN, tensor_amax, mse: tuple | None):
    if mse is None:
        return fmt.fit(w_RxN, tensor_amax=tensor_amax)
    grid, max_shrink, norm = mse
    return fit_mse(fmt, w_RxN, tensor_amax, grid=grid, max_shrink=max_shrink, norm=norm)


# --------------------------------------------------------------------------------------------
# The solver.


def block_and_padding(k: int, g: int, block: int) -> tuple[int, int]:
    """(effective block size B, padded row count Kp) for K rows in groups of G.

    B divides G or G divides B, so a block never straddles a group boundary mid-way; Kp is a
    multiple of max(B, G). Padding rows are dead inputs decoupled from the real ones."""
    if g <= block:
        b = (block // g) * g
    else:
        b = max(d for d in range(1, block + 1) if g % d == 0)
    unit = max(b, g)
    return b, -(-k // unit) * unit


@jax.jit
def _prepare(w_KxN, h_KxK):
    """Dead-input handling: H_kk = 0 -> H_kk = 1 and the weight row zeroed."""
    h = h_KxK.astype(jnp.float32)
    w = w_KxN.astype(jnp.float32)
    d = jnp.diagonal(h)
    dead = d == 0
    idx = jnp.arange(h.shape[0])
    h = h.at[idx, idx].set(jnp.where(dead, 1.0, d))
    w = jnp.where(dead[:, None], 0.0, w)
    return w, h, dead


@functools.partial(jax.jit, static_argnames=("kp",))
def _inverse_cholesky(h_KxK, perm_K, percdamp, *, kp: int):
    """Upper Cholesky factor U of the (permuted, damped, padded) H⁻¹; ok=False on failure."""
    k = h_KxK.shape[0]
    h = h_KxK[perm_K][:, perm_K]
    damp = percdamp * jnp.mean(jnp.diagonal(h))
    h = h + damp * jnp.eye(k, dtype=jnp.float32)
    if kp > k:  # padding rows: identity block, decoupled from the real rows
        h = jnp.pad(h, ((0, kp - k), (0, kp - k)))
        pad = jnp.arange(k, kp)
        h = h.at[pad, pad].set(1.0)
    lower = jnp.linalg.cholesky(h)
    eye = jnp.eye(kp, dtype=jnp.float32)
    hinv = jax.scipy.linalg.cho_solve((lower, True), eye)
    hinv = 0.5 * (hinv + hinv.T)
    u = jnp.linalg.cholesky(hinv, upper=True)
    ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diagonal(u) > 0)
    return u, ok


def _tree_row(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=True), tree)


def _tree_set_row(tree, row, i):
    return jax.tree.map(lambda a, r: jax.lax.dynamic_update_index_in_dim(a, r[0], i, 0), tree, row)


@functools.partial(jax.jit, static_argnames=("fmt", "g", "b", "k", "static", "unroll", "mse"))
def _solve(
    w_pad,
    u,
    perm_pad,
    qp_static,
    amax,
    *,
    fmt,
    g: int,
    b: int,
    k: int,
    static: bool,
    unroll: int,
    mse: tuple | None = None,
):
    """Blocked GPTQ over the rows of the (permuted, padded) weight ``w_pad [Kp, N]``.

    Returns (q_pad [Kp, N] dequantized, qparams stacked [Kp/G, ...], loss)."""
    kp, n = w_pad.shape
    nb, ng = kp // b, kp // g
    valid = jnp.arange(kp) < k  # padding rows carry no error
    real_groups = -(-k // g)

    def fit_rows(w_GxN, first_row):
        rows = first_row + jnp.arange(w_GxN.shape[0])
        w = jnp.where((rows < k)[:, None], w_GxN, w_GxN[:1])  # pad rows: copy a real row
        return _fit(fmt, w, amax, mse)

    qp_proto = jax.eval_shape(
        lambda w: fmt.fit(w, tensor_amax=amax), jax.ShapeDtypeStruct((g, n), jnp.float32)
    )
    qbuf = jax.tree.map(lambda s: jnp.zeros((ng,) + s.shape[1:], s.dtype), qp_proto)

    def rows(r0, start, count, w1, q1, e1, loss, qp, ub):
        """Quantize rows start..start+count of the block at r0 (row loop of Algorithm 1)."""

        def body(j, c):
            w1, q1, e1, loss = c
            i = start + j
            w = jax.lax.dynamic_index_in_dim(w1, i, 0, keepdims=True)  # [1, N]
            if static:
                gi = jnp.minimum(perm_pad[r0 + i] // g, real_groups - 1)
                qpi = _tree_row(qp_static, gi)
            else:
                qpi = qp
            q = fmt.fake_quant(w, qpi)
            d = ub[i, i]
            ok = valid[r0 + i]
            err = jnp.where(ok, (w - q) / d, 0.0)  # [1, N]
            w1 = w1 - ub[i][:, None] * err  # U is upper triangular: rows < i untouched
            q1 = jax.lax.dynamic_update_index_in_dim(q1, q[0], i, 0)
            e1 = jax.lax.dynamic_update_index_in_dim(e1, err[0], i, 0)
            loss = loss + jnp.where(ok, jnp.sum((w - q) ** 2) / (d * d), 0.0) / 2
            return w1, q1, e1, loss

        return jax.lax.fori_loop(0, count, body, (w1, q1, e1, loss), unroll=unroll)

    def block(bi, carry):
        w, q, loss, qbuf, qp = carry
        r0 = bi * b
        w1 = jax.lax.dynamic_slice_in_dim(w, r0, b, 0)
        ub = jax.lax.dynamic_slice(u, (r0, r0), (b, b))
        q1 = jnp.zeros_like(w1)
        e1 = jnp.zeros_like(w1)
        if static:
            w1, q1, e1, loss = rows(r0, 0, b, w1, q1, e1, loss, qp, ub)
        elif g >= b:  # a group spans whole blocks: fit when the block starts one
            new = (r0 % g) == 0
            qp = jax.lax.cond(
                new,
                lambda: fit_rows(jax.lax.dynamic_slice_in_dim(w, r0, g, 0), r0),
                lambda: qp,
            )
            qbuf = _tree_set_row(qbuf, qp, r0 // g)
            w1, q1, e1, loss = rows(r0, 0, b, w1, q1, e1, loss, qp, ub)
        else:  # several groups per block: fit each from the block's current rows

            def sub(si, c):
                w1, q1, e1, loss, qbuf, qp = c
                s0 = si * g
                qp = fit_rows(jax.lax.dynamic_slice_in_dim(w1, s0, g, 0), r0 + s0)
                qbuf = _tree_set_row(qbuf, qp, (r0 + s0) // g)
                w1, q1, e1, loss = rows(r0, s0, g, w1, q1, e1, loss, qp, ub)
                return w1, q1, e1, loss, qbuf, qp

            w1, q1, e1, loss, qbuf, qp = jax.lax.fori_loop(
                0, b // g, sub, (w1, q1, e1, loss, qbuf, qp)
            )
        # Lazy batch update of every later row: W -= U[block, :]ᵀ E (rows < r0 get zeros,
        # rows inside the block are finished and never read again).
        urows = jax.lax.dynamic_slice(u, (r0, 0), (b, kp))
        w = w - jnp.matmul(urows.T, e1, precision=HIGHEST, preferred_element_type=jnp.float32)
        q = jax.lax.dynamic_update_slice_in_dim(q, q1, r0, 0)
        return w, q, loss, qbuf, qp

    qp0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), qp_proto)
    init = (w_pad, jnp.zeros_like(w_pad), jnp.zeros((), jnp.float32), qbuf, qp0)
    _, q, loss, qbuf, _ = jax.lax.fori_loop(0, nb, block, init)
    return q, (qp_static if static else qbuf), loss


def gptq_quantize(w_KxN, h_KxK, fmt, cfg: GPTQConfig | None = None) -> GPTQResult:
    """GPTQ-quantize one kernel ``w_KxN`` given its input Hessian ``h_KxK`` (:func:`hessian`).

    ``fmt`` is a format object (``shrinkjax.quant.formats.make(spec)``); K must suit it
    (``fmt.check_shape``). Returns the QuantizedArray and the dequantized weight.
    """
    cfg = cfg or GPTQConfig()
    t0 = time.perf_counter()
    k, n = w_KxN.shape
    if h_KxK.shape != (k, k):
        raise ValueError(f"GPTQ: Hessian of shape {h_KxK.shape} for a weight of shape {(k, n)}")
    fmt.check_shape((k, n))
    dtype = jnp.asarray(w_KxN).dtype
    g = fmt.group_rows(k)
    b, kp = block_and_padding(k, g, cfg.block_size)
    w, h, _ = _prepare(jnp.asarray(w_KxN), jnp.asarray(h_KxK))
    amax = jnp.max(jnp.abs(w))
    static = cfg.act_order or cfg.static_groups
    mse = None
    if cfg.mse_grid > 0:
        if searchable(fmt):
            mse = (int(cfg.mse_grid), float(cfg.max_shrink), float(cfg.mse_norm))
        else:
            logging.warning("GPTQ: no clipping search for %s (qparams not per column)", fmt.name)
    if cfg.act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
    else:
        perm = jnp.arange(k)
    percdamp = cfg.percdamp
    for attempt in range(cfg.damp_retries + 1):
        u, ok = _inverse_cholesky(h, perm, jnp.float32(percdamp), kp=kp)
        if bool(ok):
            break
        if attempt < cfg.damp_retries:
            logging.warning(
                "GPTQ: Cholesky failed at percdamp=%g; retrying with %g", percdamp, percdamp * 10
            )
            percdamp *= 10
    else:
        logging.warning(
            "GPTQ: H is not positive definite even at percdamp=%g; falling back "
            "to round-to-nearest for this weight",
            percdamp,
        )
        qa = fmt.quantize(jnp.asarray(w_KxN))
        return GPTQResult(
            qa, qa.dequantize(jnp.float32), float("nan"), percdamp, "rtn", time.perf_counter() - t0
        )
    w_perm = w[perm]
    w_pad = jnp.pad(w_perm, ((0, kp - k), (0, 0)))
    perm_pad = jnp.concatenate([perm, jnp.arange(k, kp)]).astype(jnp.int32)
    groups = -(-k // g)
    if static:  # qparams of every group on the original order (reference static_groups)
        wg = w
        if groups * g > k:  # a short last group: pad with copies of its first row
            pad = jnp.broadcast_to(w[(groups - 1) * g], (groups * g - k, n))
            wg = jnp.concatenate([w, pad])
        qp_static = _fit(fmt, wg, amax, mse)
    else:
        qp_static = None
    q_pad, qp, loss = _solve(
        w_pad,
        u,
        perm_pad,
        qp_static,
        amax,
        fmt=fmt,
        g=g,
        b=b,
        k=k,
        static=static,
        unroll=cfg.unroll,
        mse=mse,
    )
    inv = jnp.argsort(perm)
    w_hat = q_pad[:k][inv]
    qp = jax.tree.map(lambda a: a[:groups], qp)
    qa = fmt.from_groups(w_hat.astype(dtype) if dtype != jnp.float32 else w_hat, qp)
    loss = float(loss)
    return GPTQResult(qa, w_hat, loss, percdamp, None, time.perf_counter() - t0)


def output_error(x_TxK, w_KxN, w_hat_KxN) -> float:
    """Mean squared layer-output error ``||X W - X Ŵ||² / (T N)`` (for tests and reports)."""
    x = jnp.asarray(x_TxK, jnp.float32).reshape(-1, w_KxN.shape[0])
    d = jnp.asarray(w_KxN, jnp.float32) - jnp.asarray(w_hat_KxN, jnp.float32)
    return float(jnp.mean(jnp.matmul(x, d, precision=HIGHEST) ** 2))


def expected_output_error(h_KxK, w_KxN, w_hat_KxN) -> float:
    """The same error from the Hessian alone: tr(ΔWᵀ (H/2) ΔW) / N."""
    d = jnp.asarray(w_KxN, jnp.float32) - jnp.asarray(w_hat_KxN, jnp.float32)
    hd = jnp.matmul(jnp.asarray(h_KxK, jnp.float32) / 2, d, precision=HIGHEST)
    return float(jnp.sum(d * hd) / d.shape[1])


__all__ = [
    "GPTQConfig",
    "GPTQResult",
    "block_and_padding",
    "expected_output_error",
    "gptq_quantize",
    "hessian",
    "hessian_init",
    "hessian_update",
    "fit_mse",
    "output_error",
    "searchable",
]
