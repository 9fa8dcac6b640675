"""AWQ: activation-aware weight quantization (scale search and clipping search).

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024 (arXiv:2306.00978), §3.

Salient weight channels are those that see large activations. AWQ protects them by scaling
input channel k of the weight up by ``s_k`` and the activation down by the same factor
(``Y = (X diag(s)⁻¹) Q(diag(s) W)``), with ``s = mean_t |x_k|^α`` and α picked from a grid of
``n_grid`` points in [0, 1) by minimising the output error of the quantized layer group on
calibration activations (paper eq. 4-5; the reference normalises ``s`` by
``sqrt(max s · min s)``). ``diag(s)⁻¹`` is folded into whatever produces the input (the
preceding RMSNorm scale, or the output columns of the previous linear), so the float function
is unchanged; only the rounding changes. An optional clipping search then shrinks, per group
and output column, the range the weights are quantized over (``max |w| · (1 - i / n_grid)``,
i < ``max_shrink · n_grid``), again minimising the group's partial-output error.

This module is pure math over arrays; :mod:`shrinkjax.quant.methods` drives it block by block.
Any :mod:`shrinkjax.quant.formats` format can be the target: rounding is the format's
``fit``/``fake_quant`` (round-to-nearest).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def fake_quant(fmt, w_KxN):
    """Round-to-nearest quantize-dequantize of a whole kernel with ``fmt`` (jittable)."""
    w = w_KxN.astype(jnp.float32)
    return fmt.fake_quant(w, fmt.fit(w, tensor_amax=jnp.max(jnp.abs(w))))


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


def group_output(mode: str, x_TxK, w_KxN, extra):
    """The output AWQ compares: ``x @ w`` ("linear"), or the SwiGLU MLP with gate/up
    concatenated along N and the float down kernel ``extra`` ("mlp")."""
    if mode == "linear":
        return _mm(x_TxK, w_KxN)
    if mode == "mlp":
        f = w_KxN.shape[1] // 2
        h = _mm(x_TxK, w_KxN)
        return _mm(jax.nn.silu(h[:, :f]) * h[:, f:], extra)
    raise ValueError(f"unknown AWQ output mode {mode!r}")


def candidate_scales(x_mean_K, alpha):
    """``s = mean|x|^α`` clamped at 1e-4 and normalised by sqrt(max · min) (reference)."""
    s = jnp.maximum(jnp.asarray(x_mean_K, jnp.float32) ** alpha, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("fmts", "splits", "n_grid", "mode"))
def _scale_losses(x, w, x_mean, extra, *, fmts, splits, n_grid, mode):
    y_ref = group_output(mode, x, w, extra)

    def loss(alpha):
        s = candidate_scales(x_mean, alpha)
        ws = w * s[:, None]
        parts = jnp.split(ws, splits, axis=1) if splits else [ws]
        wq = jnp.concatenate([fake_quant(f, p) for f, p in zip(fmts, parts, strict=True)], axis=1)
        y = group_output(mode, x, wq / s[:, None], extra)
        return jnp.mean((y - y_ref) ** 2)

    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    return alphas, jax.lax.map(loss, alphas)


def search_scale(
    x_TxK, ws_KxN: list, fmts: list, x_mean_K, *, n_grid: int = 20, mode: str = "linear", extra=None
):
    """Best AWQ scale ``s [K]`` for linears ``ws`` sharing the input ``x``.

    ``fmts[i]`` quantizes ``ws[i]``; ``x_mean_K`` is mean |x| over all calibration tokens
    (``x_TxK`` may be a subsample). Returns ``(s, best_alpha, losses [n_grid])``; α = 0 gives
    s = 1, i.e. plain RTN, so the search never does worse than RTN on ``x``."""
    w = jnp.concatenate([jnp.asarray(a, jnp.float32) for a in ws_KxN], axis=1)
    splits = tuple(int(i) for i in jnp.cumsum(jnp.array([a.shape[1] for a in ws_KxN]))[:-1])
    alphas, losses = _scale_losses(
        jnp.asarray(x_TxK, jnp.float32),
        w,
        jnp.asarray(x_mean_K, jnp.float32),
        extra,
        fmts=tuple(fmts),
        splits=splits,
        n_grid=n_grid,
        mode=mode,
    )
    best = int(jnp.argmin(losses))
    return candidate_scales(x_mean_K, alphas[best]), float(alphas[best]), losses


@functools.partial(jax.jit, static_argnames=("fmt", "n_grid", "max_shrink"))
def search_clip(x_TxK, w_KxN, *, fmt, n_grid: int = 20, max_shrink: float = 0.5):
    """AWQ clipping search: ``(w clipped [K, N], chosen shrink ratio [ceil(K/G), N])``.

    For each group of G input rows and output column, ``max|w|`` shrinks by ``i / n_grid``
    (i < max_shrink · n_grid); the ratio minimising the mean squared partial output
    ``x_g (w_g - Q(clip(w_g)))`` over the tokens is kept. A short last group (G not dividing
    K, int-k) is searched on its own rows: the padding rows are zero in both x and w."""
    x = x_TxK.astype(jnp.float32)
    w = w_KxN.astype(jnp.float32)
    k, n = w.shape
    g = fmt.group_rows(k)
    ng = -(-k // g)
    pad = ng * g - k
    xg = jnp.pad(x, ((0, 0), (0, pad))).reshape(-1, ng, g)
    wg = jnp.pad(w, ((0, pad), (0, 0))).reshape(ng, g, n)
    amax = jnp.max(jnp.abs(wg), axis=1)  # [ng, N]
    steps = max(1, int(max_shrink * n_grid))

    def err(i):
        ratio = 1.0 - i / n_grid
        mx = (amax * ratio)[:, None, :]
        wc = jnp.clip(wg, -mx, mx).reshape(ng * g, n)[:k]
        q = jnp.pad(fake_quant(fmt, wc), ((0, pad), (0, 0))).reshape(ng, g, n)
        d = jnp.einsum("tgk,gkn->tgn", xg, q - wg, precision=HIGHEST)
        return jnp.mean(d * d, axis=0)  # [ng, N]

    errs = jax.lax.map(err, jnp.arange(steps, dtype=jnp.float32))  # [steps, ng, N]
    best = jnp.argmin(errs, axis=0)
    ratio = 1.0 - best.astype(jnp.float32) / n_grid
    mx = (amax * ratio)[:, None, :]
    return jnp.clip(wg, -mx, mx).reshape(ng * g, n)[:k], ratio


def tie_heads(x_mean_NH, n_heads: int, n_kv_heads: int, head_dim: int):
    """Pool per-channel statistics of the attention output (o_proj input, channel
    ``n * H + h`` for query head n) over the query heads of each KV head, so the scale can be
    folded into v_proj's output columns under GQA: returns (per-v-channel ``[K*H]``,
    expanded back to ``[N*H]``)."""
    g = n_heads // n_kv_heads
    m = jnp.asarray(x_mean_NH, jnp.float32).reshape(n_kv_heads, g, head_dim).mean(axis=1)
    return m.reshape(-1), jnp.repeat(m, g, axis=0).reshape(-1)


__all__ = [
    "candidate_scales",
    "fake_quant",
    "group_output",
    "search_clip",
    "search_scale",
    "tie_heads",
]
