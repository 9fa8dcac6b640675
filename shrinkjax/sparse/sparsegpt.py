"""SparseGPT: one-shot pruning with OBS-style reconstruction (Frantar & Alistarh 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", arXiv:2301.00774).

For a linear ``y = x @ W`` (our ``W`` is ``[K, N]`` = ``[in, out]``; the paper's weight is its
transpose) and calibration inputs ``X`` ([T, K]), SparseGPT minimises ``||X W - X W'||^2`` over
pruned ``W'``. With ``H = 2 XᵀX`` (shared by every output), the inverse Hessian's upper
Cholesky factor ``U`` (``H⁻¹ = UᵀU``) lets the input rows be processed in order k = 0..K-1: row k
is pruned (and optionally quantized) and its error, divided by ``U[k, k]``, is propagated into the
rows not yet processed through ``U[k, k:]`` (the OBS update, Algorithm 1). Rows are processed
in blocks of ``blocksize`` (lazy batched updates, as in GPTQ): the error of a block reaches the
later rows in one matmul.

Mask selection is adaptive (Section 3.2): for unstructured sparsity, at the start of each
block the ``floor(s · rows · N)`` weights of the block with the smallest OBS saliency
``w² / U[k, k]²`` are pruned; for N:M, each group of ``m`` rows is decided when the sweep reaches
it, keeping per output the ``n`` of largest saliency. Joint quantization (Section 3.4): each
kept weight is rounded to a quantization grid (any :mod:`shrinkjax.quant.formats` format; its
group scales fitted on the group's not-yet-quantized, masked weights when the sweep reaches the
group) before its error is propagated, so the remaining weights compensate for pruning *and*
rounding.

Hessian math is float32 with ``precision=HIGHEST`` (no TF32) and dampening ``damp · mean(diag H)``
(1% by default); inputs that are never active get ``H[k, k] = 1`` and ``W[k] = 0``. When the
Cholesky factorisation fails the dampening is raised tenfold (up to ``max_damp``) and the used
value is reported; past that a :class:`CholeskyError` names the layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp

from shrinkjax.sparse.masks import nm_mask, parse_pattern, rank_mask

__all__ = [
    "CholeskyError",
    "Result",
    "hessian",
    "init_stats",
    "inverse_cholesky",
    "output_error",
    "prune",
    "reconstruct",
    "update_stats",
]

HIGHEST = jax.lax.Precision.HIGHEST


class CholeskyError(RuntimeError):
    """The (dampened) Hessian of a layer is not positive definite."""


def init_stats(k: int) -> dict:
    """Running ``XᵀX`` [K, K] (f32) and the token count."""
    return {"xtx": jnp.zeros((k, k), jnp.float32), "count": jnp.zeros((), jnp.float32)}


def update_stats(stats: dict, x_TxK) -> dict:
    x = jnp.asarray(x_TxK, jnp.float32)
    xtx = jnp.matmul(x.T, x, precision=HIGHEST)
    return {"xtx": stats["xtx"] + xtx, "count": stats["count"] + x.shape[0]}


def hessian(stats: dict):
    """``H = 2 XᵀX / T`` (the layer-wise squared-error Hessian, averaged over tokens)."""
    return 2.0 * stats["xtx"] / jnp.maximum(stats["count"], 1.0)


def _highest():
    """True-f32 matmuls while tracing (no TF32 inside the triangular solves)."""
    ctx = getattr(jax, "default_matmul_precision", None)
    return ctx("highest") if ctx is not None else contextlib.nullcontext()


@jax.jit
def _chol_inverse(h, damp):
    k = h.shape[0]
    with _highest():
        hd = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
        low = jnp.linalg.cholesky(hd)
        hinv = jax.scipy.linalg.cho_solve((low, True), jnp.eye(k, dtype=h.dtype))
        hinv = 0.5 * (hinv + hinv.T)
        upper = jnp.linalg.cholesky(hinv).T
    ok = jnp.all(jnp.isfinite(upper)) & jnp.all(jnp.diag(upper) > 0)
    return upper, ok


def inverse_cholesky(h_KxK, damp: float = 0.01, max_damp: float = 10.0, name: str = ""):
    """(U, dead, used_damp): ``U`` upper with ``(H + λI)⁻¹ = UᵀU``, ``λ = damp · mean(diag H)``;
    ``dead`` marks inputs never active (their diagonal is set to 1). Raises the dampening
    tenfold while the factorisation fails; raises :class:`CholeskyError` past ``max_damp``."""
    h = jnp.asarray(h_KxK, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(h))):
        raise CholeskyError(
            f"{name or 'layer'}: the Hessian has non-finite entries (NaN/Inf calibration "
            f"activations); check the model's dtype and the calibration data"
        )
    dead = jnp.diag(h) == 0
    h = jnp.where(jnp.diag(dead), 1.0, h)
    d = float(damp)
    while True:
        upper, ok = _chol_inverse(h, jnp.float32(d))
        if bool(ok):
            return upper, dead, d
        nxt = max(d * 10, 1e-4)
        if nxt > max_damp:
            raise CholeskyError(
                f"{name or 'layer'}: Cholesky of the dampened Hessian failed up to "
                f"damp={d:g} (x mean diagonal); the calibration inputs are degenerate - use "
                f"more calibration tokens, a larger prune.damp, or the wanda method"
            )
        d = nxt


@functools.partial(
    jax.jit, static_argnames=("sparsity", "n", "m", "blocksize", "quant", "group_rows")
)
def _reconstruct(w, upper, dead, *, sparsity, n, m, blocksize, quant, group_rows):
    """One compiled block body, scanned over the K / blocksize blocks (K % blocksize == 0)."""
    k_dim, n_out = w.shape
    bs, g = blocksize, group_rows
    w = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))
    amax = jnp.max(jnp.abs(w))
    diag_u = jnp.diag(upper)
    seg = min(g, bs) if quant is not None else bs
    k_last = (k_dim - 1) // g * g  # first row of the last quantization group (static)
    r_last = k_dim - k_last  # its rows: g, or fewer for a ragged last group

    def fit(rows, dd, fixed_mask=None):
        if fixed_mask is None:  # masks decided later: fit under a provisional mask
            sal = rows * rows / (dd * dd)[:, None]
            fixed_mask = nm_mask(sal, n, m) if m else rank_mask(sal, sparsity, axis=None)
        return quant.fit(jnp.where(fixed_mask, rows, 0.0), tensor_amax=amax)

    qp0 = None
    if quant is not None and g > bs:  # a group spans blocks: carry its qparams along
        shapes = jax.eval_shape(fit, w[:g], diag_u[:g])
        qp0 = jax.tree.map(lambda sd: jnp.zeros(sd.shape, sd.dtype), shapes)

    def block(carry, j):
        w, qp = carry
        i1 = j * bs
        w1 = jax.lax.dynamic_slice_in_dim(w, i1, bs, 0)
        u_rows = jax.lax.dynamic_slice_in_dim(upper, i1, bs, 0)  # [bs, K]
        u1 = jax.lax.dynamic_slice_in_dim(u_rows, i1, bs, 1)  # [bs, bs]
        d = jnp.diag(u1)
        if m:
            mask1 = jnp.ones((bs, n_out), bool)
        else:  # adaptive selection: the block's least salient weights, all outputs together
            mask1 = rank_mask(w1 * w1 / (d * d)[:, None], sparsity, axis=None)

        def step(i, c):
            w1, mask1, q1, err1, loss, qp = c
            if m:  # decide the N:M group when the sweep enters it
                g0 = (i // m) * m
                grp = jax.lax.dynamic_slice_in_dim(w1, g0, m, 0)
                dg = jax.lax.dynamic_slice_in_dim(d, g0, m, 0)
                gmask = nm_mask(grp * grp / (dg * dg)[:, None], n, m)
                new = jax.lax.dynamic_update_slice_in_dim(mask1, gmask, g0, 0)
                mask1 = jnp.where(i % m == 0, new, mask1)
            row, keep = w1[i], mask1[i]
            q = jnp.where(keep, row, 0.0)
            if quant is not None:
                q = jnp.where(keep, quant.fake_quant(q[None], qp)[0], 0.0)
            e = (row - q) / d[i]
            w1 = w1 - u1[i][:, None] * e[None, :]  # u1[i, :i] = 0: only rows i.. move
            q1 = q1.at[i].set(q)
            err1 = err1.at[i].set(e)
            return w1, mask1, q1, err1, loss + 0.5 * jnp.sum(e * e), qp

        q1 = jnp.zeros_like(w1)
        err1 = jnp.zeros_like(w1)
        loss = jnp.zeros((), jnp.float32)
        fitted = []
        for s0 in range(0, bs, seg):  # static segments = quantization groups inside the block
            if quant is not None:
                if g <= bs:  # the group starts here: fit on the rows as updated so far
                    fixed = None if m else mask1[s0 : s0 + g]
                    qp = fit(w1[s0 : s0 + g], d[s0 : s0 + g], fixed)
                else:  # a group of several blocks starts at blocks with i1 % g == 0: fit on
                    # exactly its rows as updated so far; the last group may be short (ragged
                    # int-k groups), then it is fitted on its r_last real rows only
                    def fit_at(size):
                        rows = jax.lax.dynamic_slice_in_dim(w, i1, size, 0)
                        return fit(rows, jax.lax.dynamic_slice_in_dim(diag_u, i1, size, 0))

                    branches = [lambda: qp, lambda: fit_at(g)]
                    which = jnp.where(i1 % g == 0, 1, 0)
                    if r_last < g:
                        branches.append(lambda: fit_at(r_last))
                        which = jnp.where(i1 == k_last, 2, which)
                    qp = jax.lax.switch(which, branches)
                fitted.append(qp)
            w1, mask1, q1, err1, loss, _ = jax.lax.fori_loop(
                s0, s0 + seg, step, (w1, mask1, q1, err1, loss, qp)
            )
        # lazy batch update of the later rows: U is upper triangular, so rows before the block
        # get nothing; the block's own rows change too but are never read again
        w = w - jnp.matmul(u_rows.T, err1, precision=HIGHEST)
        qps = None
        if fitted:
            qps = {key: jnp.concatenate([f[key] for f in fitted]) for key in fitted[0]}
        return (w, qp if g > bs else None), (q1, mask1, loss, qps)

    _, (q, mask, loss, qps) = jax.lax.scan(block, (w, qp0), jnp.arange(k_dim // bs))
    qstack = None
    if qps is not None:
        if g > bs:  # one entry per block; keep those of blocks that start a group
            qps = jax.tree.map(lambda a: a[:: g // bs], qps)
        qstack = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), qps)
    return q.reshape(k_dim, n_out), mask.reshape(k_dim, n_out), qstack, jnp.sum(loss)


def _block_size(k: int, want: int, m: int, g: int | None) -> int:
    """The largest block of at most ``want`` rows that divides K, holds whole N:M groups and
    nests with the quantization groups (one divides the other)."""
    for b in range(min(want, k), 0, -1):
        if k % b or (m and b % m):
            continue
        if g is not None and g % b and b % g:
            continue
        return b
    raise ValueError(f"no block size for K={k} with N:M groups of {m} and quant groups of {g}")


@dataclasses.dataclass(frozen=True)
class Result:
    """One pruned kernel."""

    weight: jax.Array  # f32 [K, N]: pruned and, with quant, on the quantization grid
    mask: jax.Array  # bool [K, N], True = kept
    qparams: dict | None  # stacked per-group qparams (joint quantization) or None
    loss: float  # sum of the OBS errors (w - q)^2 / (2 [H^-1]_kk)
    damp: float | None = None  # the dampening used (fraction of mean diag H)


def reconstruct(w_KxN, upper_KxK, dead_K, pattern, *, blocksize: int = 128, quant=None) -> Result:
    """Prune ``w_KxN`` given the inverse-Hessian factor from :func:`inverse_cholesky`.

    ``quant`` is a :mod:`shrinkjax.quant.formats` ``Format`` (``fit``/``fake_quant``/
    ``group_rows``) for joint quantization, or None."""
    pat = parse_pattern(pattern)
    k_dim = w_KxN.shape[0]
    if pat.is_nm and k_dim % pat.m:
        raise ValueError(f"N:M {pat} needs the input dim K={k_dim} to be a multiple of {pat.m}")
    g = None
    if quant is not None:
        quant.check_shape(tuple(w_KxN.shape))
        g = quant.group_rows(k_dim)
        if pat.is_nm and g % pat.m:
            raise ValueError(f"quantization groups of {g} rows do not hold whole {pat} groups")
    blocksize = _block_size(k_dim, blocksize, pat.m, g)
    q, mask, qp, loss = _reconstruct(
        jnp.asarray(w_KxN),
        jnp.asarray(upper_KxK, jnp.float32),
        jnp.asarray(dead_K),
        sparsity=float(pat.sparsity) if not pat.is_nm else 0.0,
        n=pat.n,
        m=pat.m,
        blocksize=int(blocksize),
        quant=quant,
        group_rows=int(g or k_dim),
    )
    return Result(weight=q, mask=mask, qparams=qp, loss=float(loss))


def prune(
    w_KxN,
    h_KxK,
    pattern,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    quant=None,
    name: str = "",
) -> Result:
    """SparseGPT on one kernel from its Hessian ``H = 2XᵀX/T`` (see :func:`hessian`)."""
    upper, dead, used = inverse_cholesky(h_KxK, damp, name=name)
    res = reconstruct(w_KxN, upper, dead, pattern, blocksize=blocksize, quant=quant)
    return dataclasses.replace(res, damp=used)


def output_error(w_ref_KxN, w_KxN, xtx_KxK) -> float:
    """``||X W_ref - X W||_F² / ||X W_ref||_F²`` from ``XᵀX`` (no activations needed)."""
    dw = jnp.asarray(w_ref_KxN, jnp.float32) - jnp.asarray(w_KxN, jnp.float32)
    wr = jnp.asarray(w_ref_KxN, jnp.float32)
    num = jnp.sum(dw * jnp.matmul(xtx_KxK, dw, precision=HIGHEST))
    den = jnp.sum(wr * jnp.matmul(xtx_KxK, wr, precision=HIGHEST))
    return float(num / jnp.maximum(den, 1e-30))
