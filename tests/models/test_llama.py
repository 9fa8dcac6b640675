"""The model against an independent implementation (transformers, via golden files)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shrinkjax.io.load import load_model
from shrinkjax.models.llama import LlamaConfig, init_model
from tests.conftest import GOLDEN


def test_smollm2_logits_match_transformers(smollm2):
    """scripts/make_golden.py ran transformers' LlamaForCausalLM (f32, CPU) on the same GGUF."""
    g = np.load(os.path.join(GOLDEN, "smollm2_logits.npz"))
    logits = np.asarray(nnx.jit(lambda m, t: m(t)[0])(smollm2.model, jnp.asarray(g["tokens"])))
    picked = np.take_along_axis(logits, g["cols"], -1)
    assert np.abs(picked - g["logits"]).max() <= 1e-3
    # the normaliser covers the whole vocabulary, not just the stored columns
    lse = np.asarray(jax.nn.logsumexp(logits, -1))
    assert np.abs(lse - g["lse"]).max() <= 1e-3


def test_smollm2_tokenizer_matches_transformers(smollm2):
    g = np.load(os.path.join(GOLDEN, "smollm2_logits.npz"))
    assert smollm2.tokenizer.encode(str(g["text"])) == g["all_ids"].tolist()
    assert smollm2.tokenizer.decode(g["all_ids"]) == str(g["text"])


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_tiny_hf_checkpoints_match_transformers(name):
    """Random HF Llama (llama3 RoPE scaling, untied) and Qwen2 (q/k/v bias, tied) in safetensors."""
    loaded = load_model(os.path.join(GOLDEN, name), progress=False)
    g = np.load(os.path.join(GOLDEN, name, "golden_logits.npz"))
    logits = np.asarray(loaded.model(jnp.asarray(g["tokens"]))[0])
    assert np.abs(logits - g["logits"]).max() <= 1e-4


def test_padding_mask_ignores_pad_tokens():
    cfg = LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48)
    m = init_model(cfg, seed=3)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 50, (1, 10))
    full = np.asarray(m(jnp.asarray(toks))[0])
    # right padding with garbage that the mask hides: the real positions are unchanged
    padded = np.concatenate([toks, rng.integers(0, 50, (1, 6))], 1)
    mask = np.arange(16)[None] < 10
    out = np.asarray(m(jnp.asarray(padded), mask_BxL=jnp.asarray(mask))[0])
    np.testing.assert_allclose(out[:, :10], full, atol=1e-5)


def test_bf16_close_to_f32(tiny_llama):
    g = np.load(os.path.join(GOLDEN, "tiny_llama", "golden_logits.npz"))
    bf = load_model(os.path.join(GOLDEN, "tiny_llama"), dtype="bfloat16", progress=False)
    a = np.asarray(bf.model(jnp.asarray(g["tokens"]))[0])
    rel = np.linalg.norm(a - g["logits"]) / np.linalg.norm(g["logits"])
    assert 0 < rel < 3e-2


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(vocab_size=10, dim=32, n_layers=1, n_heads=4, n_kv_heads=3, hidden_dim=8)


def test_param_count_matches_config(smollm2):
    from shrinkjax.models.params import param_count

    assert param_count(smollm2.model) == smollm2.model.cfg.param_count() == 134_515_008


def _deferred(model):
    """The same weights with ``deferred_norm`` on."""
    from shrinkjax.models.params import flat_params, model_from_params

    return model_from_params(model.cfg.replace(deferred_norm=True), flat_params(model))


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_deferred_norm_matches_transformers(name):
    """FlashNorm's 1/rms after the linears (bias added after it: Qwen2) is exact in f32."""
    loaded = load_model(os.path.join(GOLDEN, name), progress=False)
    g = np.load(os.path.join(GOLDEN, name, "golden_logits.npz"))
    logits = np.asarray(_deferred(loaded.model)(jnp.asarray(g["tokens"]))[0])
    assert np.abs(logits - g["logits"]).max() <= 1e-4


def test_deferred_norm_bf16_close_to_plain():
    """In bf16 the deferred path differs from the plain one by roundings only; non-unit norm
    scales, a cache and a decode step included."""
    from shrinkjax.models.kv_cache import init_cache

    cfg = LlamaConfig(
        vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
        tie_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    m = init_model(cfg, seed=1)
    rng = np.random.default_rng(0)
    for blk in m.layers:
        for norm in (blk.attn_norm, blk.mlp_norm):
            norm.scale.value = jnp.asarray(rng.uniform(0.5, 2.0, cfg.dim), jnp.float32)
    d = _deferred(m)
    toks = jnp.asarray(rng.integers(0, 64, (2, 9)))
    outs = []
    for model in (m, d):
        cache = init_cache(model.cfg, 2, 12)
        pre, cache = model(toks[:, :8], cache=cache)
        step, _ = model(toks[:, 8:], cache=cache)
        outs.append(np.concatenate([np.asarray(pre), np.asarray(step)], 1))
    ref = outs[0]
    rel = np.linalg.norm(outs[1] - ref) / np.linalg.norm(ref)
    assert 0 < rel < 2e-2
    # and the two paths pick the same next token almost everywhere
    assert (outs[1].argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_only_o_proj_is_told_its_input_is_opaque(tiny_llama, monkeypatch):
    """The attention output reaches o_proj from a dot or a Pallas kernel (no XLA fusion to
    host int4's sum of x): exactly the o_proj linears trace inside ``opaque_input``."""
    from shrinkjax.kernels import dispatch

    seen = []
    real = dispatch.linear

    def spy(x, w, **kw):
        seen.append((w.shape, dispatch.input_is_opaque()))
        return real(x, w, **kw)

    monkeypatch.setattr(dispatch, "linear", spy)
    cfg = tiny_llama.model.cfg
    tiny_llama.model(jnp.zeros((1, 4), jnp.int32))
    o_shape = (cfg.n_heads * cfg.head_width, cfg.dim)
    opaque = [shape for shape, flag in seen if flag]
    assert len(opaque) == cfg.n_layers and all(s == o_shape for s in opaque)
    assert len(seen) > len(opaque) and not dispatch.input_is_opaque()
