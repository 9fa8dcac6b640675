"""Gradual pruning (Zhu & Gupta 2017): the cubic schedule, exact masks, and a training loop
that re-applies masks after every update and ends at the final sparsity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shrinkjax.models.llama import LlamaConfig
from shrinkjax.sparse import masks as masklib
from shrinkjax.sparse import schedule
from tests.sparse.helpers import random_model

SCHED = dict(initial_sparsity=0.1, final_sparsity=0.8, begin_step=10, end_step=110, frequency=10)


def test_cubic_schedule_values():
    f = lambda t: schedule.sparsity_at(t, SCHED)
    assert f(0) == f(10) == pytest.approx(0.1)
    assert f(110) == f(500) == pytest.approx(0.8)
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 at t = 60: halfway -> 0.8 - 0.7 / 8
    assert f(60) == pytest.approx(0.8 - 0.7 / 8)
    assert f(61) == f(69) == f(60)  # constant between updates
    vals = [f(t) for t in range(0, 130)]
    assert all(b >= a for a, b in zip(vals, vals[1:], strict=False))
    # cubic: prunes fast early, slowly late
    assert f(20) - f(10) > f(110) - f(100) > 0
    traced = jax.jit(lambda t: schedule.sparsity_at(t, SCHED))
    for t in (0, 37, 60, 109, 110, 200):
        assert float(traced(jnp.int32(t))) == pytest.approx(f(t), abs=1e-6)
    assert schedule.is_update_step(60, SCHED) and not schedule.is_update_step(61, SCHED)
    with pytest.raises(ValueError):
        schedule.sparsity_at(5, dict(SCHED, end_step=5))


def test_update_masks_exact_and_monotone():
    rng = np.random.default_rng(0)
    params = {
        "layers.0.attn.q_proj.kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
        "layers.0.mlp.down_proj.kernel": jnp.asarray(rng.standard_normal((24, 8)), jnp.float32),
        "norm.scale": jnp.ones(8),
    }
    m = schedule.init_masks(params)
    assert sorted(m) == ["layers.0.attn.q_proj.kernel", "layers.0.mlp.down_proj.kernel"]
    prev = m
    for s in (0.25, 0.5, 0.75):
        params = schedule.apply_masks(params, prev)
        m = schedule.update_masks(params, prev, s)
        for k, v in m.items():
            assert int((~np.asarray(v)).sum()) == int(s * v.size)
            assert not np.any(np.asarray(v) & ~np.asarray(prev[k]))  # pruned stays pruned
        prev = m
    out = schedule.apply_masks(params, m)
    assert float(jnp.mean(out["layers.0.attn.q_proj.kernel"] == 0)) == 0.75
    np.testing.assert_array_equal(np.asarray(out["norm.scale"]), 1.0)
    nm = schedule.update_masks(params, m, 0.0, pattern="2:4")
    assert masklib.is_nm(nm["layers.0.mlp.down_proj.kernel"], 2, 4)


def test_training_with_masks_reaches_final_sparsity_on_nnx_state():
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=32)
    model = random_model(cfg, seed=1)
    graphdef, params = nnx.split(model, nnx.Param)
    sched = dict(final_sparsity=0.6, begin_step=0, end_step=8, frequency=2)
    masks, hook = schedule.gradual_hooks(sched, params)
    assert len(masks) == 7
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)

    @jax.jit
    def step(params, opt_state, masks):
        def loss_fn(p):
            logits, _ = nnx.merge(graphdef, p)(tokens)
            lp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        params = schedule.apply_masks(optax.apply_updates(params, upd), masks)
        return params, opt_state, loss

    seen = []
    for t in range(12):
        params, opt_state, loss = step(params, opt_state, masks)
        masks = hook(t + 1, params, masks)
        seen.append(schedule.mask_sparsity(masks))
        params = schedule.apply_masks(params, masks)
    assert seen[0] < seen[4] < seen[-1]
    assert seen[-1] == pytest.approx(0.6, abs=1e-3)
    model = nnx.merge(graphdef, params)
    q = np.asarray(model.layers[0].attn.q_proj.kernel.get_value())
    assert (q == 0).mean() == pytest.approx(0.6, abs=1e-3)
    assert np.isfinite(float(loss))
