"""Each divergence against a float64 NumPy reference (random logits, masks, τ), chunking,
finite gradients, and the loss blend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.distill import losses


def _ls(x, tau):
    x = x.astype(np.float64) / tau
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_terms(s, t, tau, beta=0.5, top_k=0):
    """Per-token forward KL, reverse KL, JSD(β) in float64 (unscaled)."""
    t = t.astype(np.float64)
    if top_k:
        kth = np.sort(t, -1)[..., -top_k][..., None]
        t = np.where(t >= kth, t, -np.inf)
    ls, lt = _ls(s, tau), _ls(t, tau)
    ps, pt = np.exp(ls), np.exp(lt)
    with np.errstate(invalid="ignore", divide="ignore"):
        fkl = np.where(pt > 0, pt * (lt - ls), 0.0).sum(-1)
        rkl = (ps * (ls - lt)).sum(-1)
        m = beta * pt + (1 - beta) * ps
        lm = np.log(m)
        jsd = beta * np.where(pt > 0, pt * (lt - lm), 0.0).sum(-1) + (1 - beta) * (
            ps * (ls - lm)
        ).sum(-1)
    return fkl, rkl, jsd


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    b, l, v = 3, 7, 50
    s = (rng.normal(size=(b, l, v)) * 3).astype(np.float32)
    t = (rng.normal(size=(b, l, v)) * 3).astype(np.float32)
    mask = rng.random((b, l)) < 0.7
    labels = rng.integers(0, v, (b, l))
    return s, t, mask, labels


@pytest.mark.parametrize("tau,chunk", [(1.0, 0), (2.0, 4), (0.7, 5)])
def test_divergences_match_float64(data, tau, chunk):
    s, t, mask, _ = data
    fkl, rkl, jsd = ref_terms(s, t, tau, beta=0.3)
    got_f = losses.forward_kl(s, t, mask, tau=tau, chunk=chunk)
    got_r = losses.reverse_kl(s, t, mask, tau=tau, chunk=chunk)
    got_j = losses.generalized_jsd(s, t, mask, beta=0.3, tau=tau, chunk=chunk)
    np.testing.assert_allclose(got_f, tau**2 * masked_mean(fkl, mask), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got_r, tau**2 * masked_mean(rkl, mask), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got_j, tau**2 * masked_mean(jsd, mask), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("beta,chunk", [(0.5, 0), (0.2, 4)])
def test_normalized_jsd_matches_float64_and_kl_curvature(data, beta, chunk):
    s, t, mask, _ = data
    _, _, jsd = ref_terms(s, t, 1.3, beta=beta)
    got = losses.generalized_jsd(s, t, mask, beta=beta, tau=1.3, chunk=chunk, normalize=True)
    want = 1.3**2 * masked_mean(jsd, mask) / (beta * (1 - beta))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    # near p_S = p_T the normalised JSD equals KL to second order (the unnormalised one is
    # β(1 − β) times smaller)
    eps = (np.random.default_rng(5).normal(size=t.shape) * 1e-2).astype(np.float32)
    near = t + eps
    kl = float(losses.forward_kl(near, t, mask))
    nj = float(losses.generalized_jsd(near, t, mask, beta=beta, normalize=True))
    assert abs(nj / kl - 1) < 0.05
    assert (
        abs(float(losses.generalized_jsd(near, t, mask, beta=beta)) / kl - beta * (1 - beta)) < 0.02
    )


def test_ce_mask_scores_cross_entropy_on_a_subset(data):
    s, t, mask, labels = data
    ce_mask = mask & (np.random.default_rng(7).random(mask.shape) < 0.5)
    cfg = losses.LossConfig(alpha=0.3, divergence="jsd", beta=0.5, chunk=4)
    sums = losses.loss_sums(
        lambda a, b, y: (a, b, y),
        (s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), labels.reshape(-1)),
        mask,
        cfg,
        ce_mask=ce_mask,
    )
    ce_tok = -np.take_along_axis(_ls(s, 1.0), labels[..., None], -1)[..., 0]
    _, _, jsd = ref_terms(s, t, 1.0, beta=0.5)
    np.testing.assert_allclose(sums["ce"], (ce_tok * ce_mask).sum(), rtol=2e-5)
    np.testing.assert_allclose(sums["jsd"], (jsd * mask).sum(), rtol=2e-5)  # D on all of mask
    assert int(sums["count"]) == int(mask.sum())


def test_jsd_endpoints_are_kls(data):
    s, t, mask, _ = data
    np.testing.assert_allclose(
        losses.generalized_jsd(s, t, mask, beta=0.0), losses.forward_kl(s, t, mask), rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.generalized_jsd(s, t, mask, beta=1.0), losses.reverse_kl(s, t, mask), rtol=1e-6
    )
    # strictly inside, JSD is bounded by the KLs' mixture and positive
    j = float(losses.generalized_jsd(s, t, mask, beta=0.5))
    assert 0 < j < max(float(losses.forward_kl(s, t, mask)), float(losses.reverse_kl(s, t, mask)))


def test_cross_entropy_and_top_k(data):
    s, t, mask, labels = data
    ce_ref = -np.take_along_axis(_ls(s, 1.0), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        losses.cross_entropy(s, labels, mask, chunk=4), masked_mean(ce_ref, mask), rtol=1e-5
    )
    fkl_k, _, jsd_k = ref_terms(s, t, 1.5, beta=0.4, top_k=5)
    np.testing.assert_allclose(
        losses.forward_kl(s, t, mask, tau=1.5, teacher_top_k=5, chunk=3),
        1.5**2 * masked_mean(fkl_k, mask),
        rtol=2e-5,
    )
    np.testing.assert_allclose(
        losses.generalized_jsd(s, t, mask, beta=0.4, tau=1.5, teacher_top_k=5, chunk=3),
        1.5**2 * masked_mean(jsd_k, mask),
        rtol=2e-5,
    )
    with pytest.raises(ValueError, match="reverse KL"):
        losses.LossConfig(divergence="reverse_kl", teacher_top_k=5)


def test_extreme_logits_are_finite():
    rng = np.random.default_rng(1)
    s = (rng.normal(size=(2, 5, 40)) * 80).astype(np.float32)
    t = (rng.normal(size=(2, 5, 40)) * 80).astype(np.float32)
    mask = np.ones((2, 5), bool)
    for fn in (losses.forward_kl, losses.reverse_kl, losses.generalized_jsd):
        v = float(fn(s, t, mask))
        assert np.isfinite(v) and v >= -1e-4
    fkl, rkl, jsd = ref_terms(s, t, 1.0)
    np.testing.assert_allclose(losses.forward_kl(s, t, mask), fkl.mean(), rtol=1e-4)
    np.testing.assert_allclose(losses.generalized_jsd(s, t, mask), jsd.mean(), rtol=1e-4)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_gradients_finite_and_match_unchunked(data, div):
    s, t, mask, labels = data
    cfg = losses.LossConfig(alpha=0.3, divergence=div, tau=2.0, beta=0.5, chunk=4)
    cfg0 = losses.LossConfig(alpha=0.3, divergence=div, tau=2.0, beta=0.5, chunk=0)
    f = lambda x, c: losses.distill_loss(x, t, labels, mask, c)[0]
    g = jax.grad(f)(jnp.asarray(s), cfg)
    g0 = jax.grad(f)(jnp.asarray(s), cfg0)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-7)
    # masked-out tokens get no gradient
    assert np.all(np.asarray(g)[~mask] == 0)
    # the gradient of forward KL at τ=1 wrt the logits is (p_S - p_T)/N
    if div == "forward_kl":
        c1 = losses.LossConfig(divergence=div, chunk=3)
        g1 = np.asarray(jax.grad(lambda x: losses.distill_loss(x, t, labels, mask, c1)[0])(s))
        want = (np.exp(_ls(s, 1.0)) - np.exp(_ls(t, 1.0))) * mask[..., None] / mask.sum()
        np.testing.assert_allclose(g1, want, atol=1e-6)


def test_blend_and_parts(data):
    s, t, mask, labels = data
    cfg = losses.LossConfig(alpha=0.25, divergence="jsd", tau=1.5, beta=0.2, chunk=4)
    loss, parts = losses.distill_loss(s, t, labels, mask, cfg)
    ce = float(losses.cross_entropy(s, labels, mask))
    jsd = float(losses.generalized_jsd(s, t, mask, beta=0.2, tau=1.5))
    np.testing.assert_allclose(loss, 0.25 * ce + 0.75 * jsd, rtol=1e-5)
    np.testing.assert_allclose(parts["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(parts["jsd"], jsd, rtol=1e-5)
    np.testing.assert_allclose(parts["kl"], float(losses.forward_kl(s, t, mask)), rtol=1e-5)
    assert int(parts["tokens"]) == int(mask.sum())
    # a dynamic weight vector reproduces the static blend
    w = losses.weight_vector(cfg)
    loss_d, _ = losses.distill_loss(s, t, labels, mask, cfg, weights=w)
    np.testing.assert_allclose(loss_d, loss, rtol=1e-5)


def test_loss_from_hidden_equals_logits_path():
    rng = np.random.default_rng(3)
    hs = rng.normal(size=(2, 6, 8)).astype(np.float32)
    ht = rng.normal(size=(2, 6, 10)).astype(np.float32)
    ws = rng.normal(size=(8, 30)).astype(np.float32)
    wt = rng.normal(size=(10, 30)).astype(np.float32)
    labels = rng.integers(0, 30, (2, 6))
    mask = rng.random((2, 6)) < 0.8
    cfg = losses.LossConfig(alpha=0.5, divergence="forward_kl", tau=2.0, chunk=5)
    a, _ = losses.loss_from_hidden(hs, ht, labels, mask, lambda h: h @ ws, lambda h: h @ wt, cfg)
    b, _ = losses.distill_loss(hs @ ws, ht @ wt, labels, mask, cfg)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_hidden_mse_and_targets():
    h = np.ones((1, 3, 4), np.float32)
    assert float(losses.hidden_mse(h, h * 2, np.ones((1, 3), bool))) == pytest.approx(1.0)
    proj = np.eye(4, 6, dtype=np.float32)
    v = float(losses.hidden_mse(h, np.zeros((1, 3, 6), np.float32), np.ones((1, 3), bool), proj))
    assert v == pytest.approx(4 / 6)
    toks = jnp.asarray([[5, 6, 7, 8]])
    labels, m = losses.next_token_targets(toks, jnp.asarray([[True, True, False, True]]))
    assert labels.tolist() == [[6, 7, 8, 0]]
    assert m.tolist() == [[True, False, True, False]]
