"""Masks have exactly the requested sparsity / N:M pattern, and keep the highest scores."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shrinkjax.sparse import magnitude, masks, wanda

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
# few distinct shapes (each new shape compiles), edge cases included
KS = st.sampled_from([1, 7, 16, 33])
NS = st.sampled_from([1, 3, 5])


def _scores(seed, k, n, ties=False):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((k, n)).astype(np.float32)
    if ties:
        s = np.round(s)  # many equal scores
    return s


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    k=KS,
    n=NS,
    sparsity=st.floats(0.0, 0.95),
    ties=st.booleans(),
)
def test_per_output_mask_exact_and_keeps_largest(seed, k, n, sparsity, ties):
    s = _scores(seed, k, n, ties)
    m = np.asarray(masks.rank_mask(s, sparsity, axis=0))
    pruned = math.floor(sparsity * k + 1e-9)
    assert (m.sum(axis=0) == k - pruned).all()
    for j in range(n):
        if 0 < pruned < k:
            assert s[~m[:, j], j].max() <= s[m[:, j], j].min()


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    k=KS,
    n=NS,
    sparsity=st.floats(0.0, 0.95),
    ties=st.booleans(),
)
def test_per_layer_mask_exact_and_keeps_largest(seed, k, n, sparsity, ties):
    s = _scores(seed, k, n, ties)
    m = np.asarray(masks.rank_mask(s, sparsity, axis=None))
    pruned = math.floor(sparsity * k * n + 1e-9)
    assert m.size - m.sum() == pruned
    if 0 < pruned < m.size:
        assert s[~m].max() <= s[m].min()


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    groups=st.sampled_from([1, 4]),
    n=NS,
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (2, 8)]),
    ties=st.booleans(),
)
def test_nm_mask_exact_pattern(seed, groups, n, nm, ties):
    keep, m_ = nm
    s = _scores(seed, groups * m_, n, ties)
    m = np.asarray(masks.nm_mask(s, keep, m_))
    assert masks.is_nm(m, keep, m_)
    g = s.reshape(groups, m_, n)
    gm = m.reshape(groups, m_, n)
    for a in range(groups):
        for j in range(n):
            assert g[a, ~gm[a, :, j], j].max() <= g[a, gm[a, :, j], j].min()


def test_is_nm_rejects_wrong_pattern():
    m = np.ones((8, 3), bool)
    m[::2] = False
    assert masks.is_nm(m, 2, 4)
    m[0, 0] = True
    assert not masks.is_nm(m, 2, 4)
    assert not masks.is_nm(np.ones((6, 2), bool), 2, 4)


def test_nm_needs_k_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of 4"):
        masks.nm_mask(np.ones((6, 2)), 2, 4)


def test_traced_sparsity_matches_python():
    s = _scores(0, 37, 5)
    ref = masks.rank_mask(s, 0.3, axis=0)
    got = jax.jit(lambda x, sp: masks.rank_mask(x, sp, axis=0))(s, jnp.float32(0.3))
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(got))
    assert int((~np.asarray(got)).sum()) == 5 * math.floor(0.3 * 37)


def test_global_masks_exact_count_and_one_threshold():
    rng = np.random.default_rng(1)
    sc = {
        "a": rng.uniform(0, 1, (16, 8)).astype(np.float32),
        "b": rng.uniform(0.5, 3, (24, 4)).astype(np.float32),  # larger: pruned less
    }
    m = masks.global_masks(sc, 0.4)
    total = 16 * 8 + 24 * 4
    pruned = sum(int((~np.asarray(v)).sum()) for v in m.values())
    assert pruned == math.floor(0.4 * total)
    kept_min = min(sc[k][np.asarray(m[k])].min() for k in sc)
    pruned_max = max(sc[k][~np.asarray(m[k])].max() for k in sc if (~np.asarray(m[k])).any())
    assert pruned_max <= kept_min
    # the global threshold prunes the small-magnitude kernel much more than the other
    assert masks.sparsity_of(m["a"]) > 0.6 > 0.2 > masks.sparsity_of(m["b"])


def test_magnitude_global_vs_layer():
    rng = np.random.default_rng(2)
    w = {
        "x": jnp.asarray(rng.standard_normal((32, 8)) * 0.1),
        "y": jnp.asarray(rng.standard_normal((32, 8))),
    }
    new, m = magnitude.global_prune(w, "50%")
    assert masks.sparsity_of(jnp.concatenate([m["x"], m["y"]])) == 0.5
    assert masks.sparsity_of(m["x"]) > 0.8
    assert float(jnp.sum(new["x"] != 0)) == float(jnp.sum(m["x"]))
    pw, pm = magnitude.prune(w["x"], "50%", per="layer")
    assert masks.sparsity_of(pm) == 0.5
    np.testing.assert_array_equal(np.asarray(pw), np.where(np.asarray(pm), w["x"], 0))


def test_wanda_compares_within_output_and_uses_activation_norm():
    # one input feature with a huge activation norm must survive although its weights are small
    w = np.ones((8, 3), np.float32)
    w[2] = 0.1
    sumsq = np.ones(8, np.float32)
    sumsq[2] = 1e4
    pw, m = wanda.prune(w, sumsq, "50%")
    assert np.asarray(m)[2].all()
    assert (np.asarray(m).sum(axis=0) == 4).all()  # exactly half of every output column
    _, mm = magnitude.prune(w, "50%", per="output")
    assert not np.asarray(mm)[2].any()


@pytest.mark.parametrize(
    "text,sp,nm",
    [
        ("50%", 0.5, None),
        ("0.7", 0.7, None),
        (0.25, 0.25, None),
        ("2:4", 0.5, (2, 4)),
        ("4:8", 0.5, (4, 8)),
        ("1:4", 0.75, (1, 4)),
    ],
)
def test_parse_pattern(text, sp, nm):
    p = masks.parse_pattern(text)
    assert p.sparsity == pytest.approx(sp)
    assert (p.n, p.m) == (nm or (0, 0))


@pytest.mark.parametrize("bad", ["4:2", "2:2", "150%", "half", "-0.1"])
def test_parse_pattern_rejects(bad):
    with pytest.raises(ValueError):
        masks.parse_pattern(bad)
