"""Minitron-style structural pruning: a smaller dense Llama whose parameter count matches its
config, that runs, keeps GQA groups intact, and whose importance ranking beats its reverse."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shrinkjax.eval.perplexity import perplexity
from shrinkjax.models.params import flat_params, param_count
from shrinkjax.sparse import structural


@pytest.fixture(scope="module")
def imp(smollm2, calib_tokens):
    return structural.importance(smollm2.model, calib_tokens, batch_size=4, progress=False)


def _ppl(model, tokens):
    return perplexity(model, tokens, np.ones_like(tokens, bool), 4, progress=False)["ppl"]


def test_width_pruned_model_matches_config_and_importance_beats_reverse(smollm2, calib_tokens, imp):
    teacher = smollm2.model
    small, plan, _ = structural.prune_structure(teacher, None, dim=512, hidden_dim=896, imp=imp)
    assert (small.cfg.dim, small.cfg.hidden_dim, small.cfg.n_layers) == (512, 896, 30)
    assert small.cfg.head_dim == 64  # pinned, not dim // n_heads
    assert param_count(small) == small.cfg.param_count() == 90_077_696
    assert len(plan.embed) == 512 and all(len(v) == 896 for v in plan.mlp.values())
    dense = _ppl(teacher, calib_tokens)
    pruned = _ppl(small, calib_tokens)
    rev = dataclasses.replace(
        imp, heads=-imp.heads, mlp=-imp.mlp, embed=-imp.embed, layers=-imp.layers
    )
    worst, _, _ = structural.prune_structure(teacher, None, dim=512, hidden_dim=896, imp=rev)
    anti = _ppl(worst, calib_tokens)
    assert np.isfinite(pruned) and dense < pruned < 10 * dense
    assert anti > 100 * pruned  # the activation ranking matters, a lot


def test_heads_and_layers_respect_gqa_and_copy_weights(smollm2, calib_tokens, imp):
    teacher = smollm2.model
    small, plan, _ = structural.prune_structure(
        teacher, None, n_layers=27, n_heads=6, n_kv_heads=2, imp=imp
    )
    cfg = small.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.dim) == (27, 6, 2, 576)
    assert param_count(small) == cfg.param_count()
    # the least important blocks by 1 - cos(h_in, h_out) are the ones removed
    dropped = sorted(set(range(30)) - set(plan.layers))
    assert len(dropped) == 3
    assert max(imp.layers[dropped]) <= min(imp.layers[plan.layers])
    for i in plan.layers:
        kv, q = plan.kv_heads[i], plan.q_heads[i]
        assert len(kv) == 2 and len(q) == 6
        # each kept query head serves a kept kv head, grouped in kv order (GQA group = 3)
        np.testing.assert_array_equal(q.reshape(2, 3) // 3, np.repeat(kv[:, None], 3, 1))
    # weights are copies of the surviving rows/columns
    i_new, i_old = 4, plan.layers[4]
    cols = (plan.q_heads[i_old][:, None] * 64 + np.arange(64)).reshape(-1)
    src = flat_params(teacher)[f"layers.{i_old}.attn.q_proj.kernel"]
    got = flat_params(small)[f"layers.{i_new}.attn.q_proj.kernel"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(src)[:, cols])
    logits, _ = nnx.jit(lambda m, t: m(t))(small, jnp.asarray(calib_tokens[:1, :16]))
    assert logits.shape == (1, 16, cfg.vocab_size) and bool(jnp.isfinite(logits).all())


def test_keeping_every_unit_is_the_identity(tiny_llama):
    model = tiny_llama.model
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % model.cfg.vocab_size
    same, _, _ = structural.prune_structure(model, tokens, batch_size=2, progress=False)
    fwd = nnx.jit(lambda m, t: m(t)[0])
    np.testing.assert_allclose(
        np.asarray(fwd(same, tokens)), np.asarray(fwd(model, tokens)), rtol=1e-6, atol=1e-6
    )


def test_target_config_validation(smollm2):
    cfg = smollm2.model.cfg
    with pytest.raises(ValueError, match="grow"):
        structural.target_config(cfg, hidden_dim=4096)
    with pytest.raises(ValueError, match="GQA group size"):
        structural.target_config(cfg, n_heads=5)
    assert structural.target_config(cfg, n_heads=6).n_kv_heads == 2
