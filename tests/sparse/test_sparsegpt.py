"""SparseGPT's algebra on synthetic layers: OBS reconstruction, lazy blocks, joint
quantization, dead inputs and the Cholesky fallback."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.quant import formats
from shrinkjax.quant.array import QuantSpec
from shrinkjax.sparse import masks, sparsegpt

K, N, T = 64, 16, 256


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((K, K)).astype(np.float32) / np.sqrt(K)
    x = rng.standard_normal((T, K)).astype(np.float32) @ (np.eye(K, dtype=np.float32) + 2 * mix)
    x *= rng.uniform(0.2, 3.0, K).astype(np.float32)  # correlated, uneven features
    w = rng.standard_normal((K, N)).astype(np.float32)
    st = sparsegpt.update_stats(sparsegpt.init_stats(K), x)
    return jnp.asarray(w), st


def test_zero_sparsity_leaves_weights_unchanged(layer):
    w, st = layer
    r = sparsegpt.prune(w, sparsegpt.hessian(st), 0.0)
    np.testing.assert_allclose(np.asarray(r.weight), np.asarray(w), atol=1e-5)
    assert r.loss == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_reconstruction_beats_masking_alone(layer, pattern):
    w, st = layer
    r = sparsegpt.prune(w, sparsegpt.hessian(st), pattern)
    assert masks.sparsity_of(r.mask) == 0.5
    assert float(jnp.mean(r.weight == 0)) == 0.5  # pruned entries are exact zeros
    if pattern == "2:4":
        assert masks.is_nm(r.mask, 2, 4)
    err = sparsegpt.output_error(w, r.weight, st["xtx"])
    masked_only = sparsegpt.output_error(w, jnp.where(r.mask, w, 0.0), st["xtx"])
    assert err < 0.7 * masked_only  # (≈0.6 here; 1.0 without the OBS update)


def test_lazy_blocks_do_not_change_nm_result(layer):
    w, st = layer
    h = sparsegpt.hessian(st)
    a = sparsegpt.prune(w, h, "2:4", blocksize=16)
    b = sparsegpt.prune(w, h, "2:4", blocksize=64)
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    np.testing.assert_allclose(np.asarray(a.weight), np.asarray(b.weight), rtol=1e-4, atol=1e-4)


def test_joint_quantization_beats_rtn(layer):
    w, st = layer
    fmt = formats.make(QuantSpec("int4", group_size=32, symmetric=False))
    r = sparsegpt.prune(w, sparsegpt.hessian(st), 0.0, quant=fmt)
    deq = fmt.from_groups(r.weight, r.qparams).dequantize()
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(r.weight))  # on the grid
    rtn = fmt.quantize(w).dequantize()
    assert sparsegpt.output_error(w, r.weight, st["xtx"]) < 0.8 * sparsegpt.output_error(
        w, rtn, st["xtx"]
    )


def test_dead_inputs_are_zeroed_not_nan(layer):
    w, _ = layer
    x = np.random.default_rng(1).standard_normal((T, K)).astype(np.float32)
    x[:, 5] = 0.0
    st = sparsegpt.update_stats(sparsegpt.init_stats(K), x)
    r = sparsegpt.prune(w, sparsegpt.hessian(st), "2:4")
    assert np.isfinite(np.asarray(r.weight)).all()
    assert not np.asarray(r.weight)[5].any()


def test_cholesky_fallback_raises_dampening():
    # rank-deficient Hessian (fewer tokens than inputs) without dampening: fails at damp=0,
    # succeeds after the automatic increase, and the used value is reported
    x = np.random.default_rng(2).standard_normal((8, K)).astype(np.float32)
    h = sparsegpt.hessian(sparsegpt.update_stats(sparsegpt.init_stats(K), x))
    upper, _, used = sparsegpt.inverse_cholesky(h, damp=0.0)
    assert used > 0.0
    assert np.isfinite(np.asarray(upper)).all()


def test_cholesky_errors_name_the_layer():
    with pytest.raises(sparsegpt.CholeskyError, match="layers.3.mlp.down_proj.*non-finite"):
        sparsegpt.inverse_cholesky(jnp.full((4, 4), jnp.nan), name="layers.3.mlp.down_proj")
    with pytest.raises(sparsegpt.CholeskyError, match="layers.7.attn.*Cholesky"):
        sparsegpt.inverse_cholesky(-jnp.eye(4), name="layers.7.attn")


def test_joint_quantization_with_ragged_groups_and_nm_storage():
    # K = 96 with int4 groups of 64: groups of 64 + 32 rows (ragged, as SmolLM2's K = 576 at
    # g128); the quantized 2:4 weights must be exactly representable in NMSparseArray storage
    from shrinkjax.sparse.array import compress

    rng = np.random.default_rng(4)
    k = 96
    x = rng.standard_normal((256, k)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((k, N)).astype(np.float32))
    st = sparsegpt.update_stats(sparsegpt.init_stats(k), x)
    fmt = formats.make(QuantSpec("int4", group_size=64, symmetric=False))
    r = sparsegpt.prune(w, sparsegpt.hessian(st), "2:4", quant=fmt)
    assert r.qparams["scales"].shape == (2, N)
    assert masks.is_nm(r.mask, 2, 4)
    np.testing.assert_array_equal(
        np.asarray(fmt.from_groups(r.weight, r.qparams).dequantize()), np.asarray(r.weight)
    )
    a = compress(r.weight, 2, 4, r.mask, quant=fmt, qparams=r.qparams)
    np.testing.assert_array_equal(np.asarray(a.to_dense()), np.asarray(r.weight))


def _reference_entered_fits(w, upper, pattern, fmt, blocksize):
    """Row-by-row SparseGPT (no lazy batching) with joint quantization: the qparams of each
    quantization group, fitted (under the provisional mask) on exactly that group's rows as
    updated when the sweep enters it, and those rows."""
    pat = masks.parse_pattern(pattern)
    w = np.array(w, np.float32)
    u = np.asarray(upper, np.float32)
    k, g, d = w.shape[0], fmt.group_rows(w.shape[0]), np.diag(u)
    amax = jnp.max(jnp.abs(jnp.asarray(w)))
    mask = np.ones_like(w, bool)
    fits, entered = [], []
    for i in range(k):
        step = pat.m if pat.is_nm else blocksize
        if i % step == 0:  # N:M groups / unstructured blocks are decided on entry
            sal = w[i : i + step] ** 2 / (d[i : i + step] ** 2)[:, None]
            sel = masks.nm_mask(sal, pat.n, pat.m) if pat.is_nm else None
            if sel is None:
                sel = masks.rank_mask(sal, pat.sparsity, axis=None)
            mask[i : i + step] = np.asarray(sel)
        if i % g == 0:
            rows = w[i : i + g].copy()  # the short last group: its real rows only
            sal = rows**2 / (d[i : i + g] ** 2)[:, None]
            if pat.is_nm:
                prov = masks.nm_mask(sal, pat.n, pat.m)
            else:
                prov = masks.rank_mask(sal, pat.sparsity, axis=None)
            qp = fmt.fit(jnp.where(prov, rows, 0.0), tensor_amax=amax)
            fits.append(qp)
            entered.append(rows)
        q = np.where(mask[i], w[i], 0.0)
        q = np.where(mask[i], np.asarray(fmt.fake_quant(jnp.asarray(q)[None], qp))[0], 0.0)
        e = (w[i] - q) / d[i]
        w[i:] -= u[i, i:][:, None] * e[None]
        w[i] = q
    return fits, entered


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("pattern", ["2:4", "50%"])
def test_joint_quantization_fits_short_last_group_on_its_rows(pattern, symmetric):
    # K = 576 at int4 g128 (SmolLM2's hidden size): groups 4 x 128 + 64 (ragged); the sweep
    # uses blocks of 64, so the last group is entered by one block. Its rows are down-scaled
    # (x0.05); its qparams must be fitted on its rows 512..575 alone, as updated (by the OBS
    # compensation of rows 0..511) when the sweep enters it.
    from shrinkjax.sparse.array import compress

    rng = np.random.default_rng(5)
    k, t = 576, 2048
    x = rng.standard_normal((t, k)).astype(np.float32)
    w = rng.standard_normal((k, N)).astype(np.float32)
    w[512:] *= 0.05
    st = sparsegpt.update_stats(sparsegpt.init_stats(k), x)
    upper, dead, _ = sparsegpt.inverse_cholesky(sparsegpt.hessian(st))
    fmt = formats.make(QuantSpec("int4", group_size=128, symmetric=symmetric))
    r = sparsegpt.reconstruct(jnp.asarray(w), upper, dead, pattern, quant=fmt)
    scales = np.asarray(r.qparams["scales"], np.float32)
    assert scales.shape == (5, N)

    fits, entered = _reference_entered_fits(w, upper, pattern, fmt, blocksize=64)
    assert entered[-1].shape[0] == 64
    want = np.concatenate([np.asarray(f["scales"], np.float32) for f in fits])
    np.testing.assert_allclose(scales, want, rtol=1e-3)
    if not symmetric:
        want_z = np.concatenate([np.asarray(f["zeros"]) for f in fits])
        assert np.abs(np.asarray(r.qparams["zeros"], np.int32) - want_z).max() <= 1
    assert np.median(scales[4] / scales[3]) < 0.5  # far below the previous group's
    # the kept weights of every group, the short one included, lie on its grid
    deq = fmt.from_groups(r.weight, r.qparams).dequantize()
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(r.weight))
    last = np.asarray(r.weight)[512:]
    codes = last / scales[4]
    if symmetric:
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    if pattern == "2:4":  # compressed: 288 rows = int4 g64 groups 4 x 64 + 32, same scales
        a = compress(r.weight, 2, 4, r.mask, quant=fmt, qparams=r.qparams)
        assert a.values.spec.group_size == 64 and a.values.scales.shape == (5, N)
        np.testing.assert_array_equal(np.asarray(a.values.scales), np.asarray(r.qparams["scales"]))
        np.testing.assert_array_equal(np.asarray(a.to_dense()), np.asarray(r.weight))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("pattern", ["2:4", "50%"])
def test_short_last_group_scale_ignores_rows_outside_it(pattern, symmetric):
    # Uncorrelated inputs (orthogonal columns: diagonal H, no OBS compensation), so each group
    # is entered with its original rows. The short last group (rows 512..575 of K = 576, int4
    # g128) is down-scaled x0.05 and holds an outlier row 520 whose input is nearly inactive:
    # lowest saliency, so it is pruned and must not widen the group's scale, which must be the
    # fit of exactly rows 512..575 under the mask.
    rng = np.random.default_rng(6)
    k, t = 576, 1024
    q, _ = np.linalg.qr(rng.standard_normal((t, k)))
    x = (np.sqrt(t) * q).astype(np.float32)
    x[:, 520] *= 0.01
    w = rng.standard_normal((k, N)).astype(np.float32)
    w[512:] *= 0.05
    w[520] = 0.3
    st = sparsegpt.update_stats(sparsegpt.init_stats(k), x)
    fmt = formats.make(QuantSpec("int4", group_size=128, symmetric=symmetric))
    r = sparsegpt.prune(jnp.asarray(w), sparsegpt.hessian(st), pattern, damp=1e-4, quant=fmt)
    mask = np.asarray(r.mask)
    assert not mask[520].any()  # the outlier is pruned
    scales = np.asarray(r.qparams["scales"], np.float32)
    assert scales.shape == (5, N)
    amax = jnp.max(jnp.abs(jnp.asarray(w)))
    want = fmt.fit(jnp.where(mask[512:], w[512:], 0.0), tensor_amax=amax)
    np.testing.assert_allclose(scales[4], np.asarray(want["scales"], np.float32)[0], rtol=1e-6)
    orig = np.asarray(fmt.fit(jnp.asarray(w[512:]))["scales"], np.float32)
    assert np.all(scales[4] <= 2 * orig)
    assert np.all(scales[4] < 0.2 * scales[3])
    deq = fmt.from_groups(r.weight, r.qparams).dequantize()
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(r.weight))
