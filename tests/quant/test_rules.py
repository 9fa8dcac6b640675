"""Rules (first match wins, skip, unused-rule report) and RTN over flat parameters."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.quant import formats
from shrinkjax.quant.array import QuantizedArray, QuantSpec
from shrinkjax.quant.rtn import quantize_params
from shrinkjax.quant.rules import KEEP_FLOAT, default_rules, match

INT4 = QuantSpec("int4", group_size=32)
INT8 = QuantSpec("int8", granularity="channel")


def _params(d=64, f=96, v=50, layers=2, seed=0):
    rng = np.random.default_rng(seed)
    p = {"embed.embedding": rng.standard_normal((v, d)), "norm.scale": np.ones(d)}
    for i in range(layers):
        p[f"layers.{i}.attn_norm.scale"] = np.ones(d)
        p[f"layers.{i}.attn.q_proj.kernel"] = rng.standard_normal((d, d)) * 0.02
        p[f"layers.{i}.attn.q_proj.bias"] = np.zeros(d)
        p[f"layers.{i}.mlp.down_proj.kernel"] = rng.standard_normal((f, d)) * 0.02
    p["lm_head.kernel"] = rng.standard_normal((d, v)) * 0.02
    return {k: jnp.asarray(a, jnp.float32) for k, a in p.items()}


def test_first_match_wins_and_skip():
    rules = [
        (r"layers\.0\.attn\..*", None),  # keep layer 0 attention in float
        (r".*q_proj\.kernel", INT8),
        (r".*\.kernel", INT4),
        (r".*q_proj\.kernel", QuantSpec("int2")),  # shadowed by the rules above
    ]
    assigned, report = match(rules, _params())
    assert set(assigned) == {
        "layers.1.attn.q_proj.kernel",
        "layers.0.mlp.down_proj.kernel",
        "layers.1.mlp.down_proj.kernel",
        "lm_head.kernel",
    }
    assert assigned["layers.1.attn.q_proj.kernel"] == INT8
    assert assigned["lm_head.kernel"] == INT4  # no KEEP_FLOAT in these rules
    assert report.skipped == ["layers.0.attn.q_proj.kernel"]
    assert report.unmatched == ["embed.embedding"]  # 2-D, but no rule says anything
    assert report.rule_hits == [
        (r"layers\.0\.attn\..*", 1),
        (r".*q_proj\.kernel", 1),
        (r".*\.kernel", 3),
        (r".*q_proj\.kernel", 0),
    ]
    assert report.unused_rules == [r".*q_proj\.kernel"]
    # vectors never match, even a catch-all rule: they are reported as ineligible
    assert "norm.scale" in report.ineligible and "layers.0.attn.q_proj.bias" in report.ineligible


def test_default_rules_keep_embed_and_head_float():
    assigned, report = match(default_rules("int4"), _params())
    assert sorted(assigned) == [
        "layers.0.attn.q_proj.kernel",
        "layers.0.mlp.down_proj.kernel",
        "layers.1.attn.q_proj.kernel",
        "layers.1.mlp.down_proj.kernel",
    ]
    assert all(s == QuantSpec("int4") for s in assigned.values())
    assert report.skipped == ["embed.embedding", "lm_head.kernel"]
    assert report.unused_rules == []
    assert tuple(default_rules(INT4)[:2]) == KEEP_FLOAT


def test_bfloat16_kernels_are_candidates_and_int_arrays_are_not():
    params = {
        "a.kernel": jnp.zeros((32, 8), jnp.bfloat16),
        "b.kernel": jnp.zeros((32, 8), jnp.float16),
        "ids.kernel": jnp.zeros((32, 8), jnp.int32),
        "c.kernel": np.zeros((32, 8), np.float32),
    }
    assigned, report = match([(r".*", INT4)], params)
    assert sorted(assigned) == ["a.kernel", "b.kernel", "c.kernel"]
    assert report.ineligible == ["ids.kernel"]


def test_fullmatch_and_paths_only_mode():
    # "q_proj" alone must not match the full path; with bare paths every path is a candidate
    assigned, report = match(
        [("q_proj", INT4), (r".*norm.*", INT8)], ["a.q_proj.kernel", "norm.scale"]
    )
    assert assigned == {"norm.scale": INT8}
    assert report.unused_rules == ["q_proj"] and report.unmatched == ["a.q_proj.kernel"]


def test_unused_rules_are_logged(caplog):
    with caplog.at_level(logging.WARNING):
        _, report = match([(r"layers\.9\..*", INT4), (r".*", None)], _params())
    assert report.unused_rules == [r"layers\.9\..*"]
    assert any(r"layers\.9\..*" in rec.getMessage() and "matched no" in rec.getMessage()
               for rec in caplog.records)  # fmt: skip


def test_bad_rules_fail_loudly():
    with pytest.raises(ValueError, match=r"rule 1: invalid regex '\(unclosed'"):
        match([(".*", None), ("(unclosed", INT4)], ["a"])
    with pytest.raises(TypeError, match="rule 0 must be a"):
        match([".*"], ["a"])
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        match([(".*", 4)], ["a"])


def test_quantize_params_replaces_matched_kernels():
    params = _params()
    out, report = quantize_params(params, [*KEEP_FLOAT, (r".*q_proj\.kernel", INT8),
                                           (r".*\.kernel", INT4)])  # fmt: skip
    assert set(out) == set(params)
    q = out["layers.0.attn.q_proj.kernel"]
    assert isinstance(q, QuantizedArray) and q.spec == formats.make(INT8).spec
    assert isinstance(out["layers.1.mlp.down_proj.kernel"], QuantizedArray)
    for k in ("embed.embedding", "lm_head.kernel", "norm.scale", "layers.0.attn.q_proj.bias"):
        assert out[k] is params[k]
    # RTN output is exactly the format's quantize
    ref = formats.make(INT4).quantize(params["layers.1.mlp.down_proj.kernel"])
    jax.tree.map(np.testing.assert_array_equal, out["layers.1.mlp.down_proj.kernel"], ref)
    # bytes: 2 q_proj int8 per-channel (64*64 + 64*2 f16 scales), 2 down_proj int4 g32
    # (96*64/2 + 3*64*2)
    assert report.bytes_before == 4 * (2 * 64 * 64 + 2 * 96 * 64)
    assert report.bytes_after == 2 * (64 * 64 + 128) + 2 * (96 * 32 + 384)
    assert report.bits_per_weight == pytest.approx(
        8 * report.bytes_after / (2 * 64 * 64 + 2 * 96 * 64)
    )
    assert report.quantized["layers.0.attn.q_proj.kernel"] == "int8 per-channel sym"


def test_quantize_params_error_names_the_parameter():
    # int-k accept a short last group (K = 100 at g32), not an odd K for packed int4 codes
    params = {"layers.0.mlp.down_proj.kernel": jnp.zeros((101, 8))}
    with pytest.raises(
        ValueError, match=r"layers\.0\.mlp\.down_proj\.kernel.*K=101 is not a multiple of 2"
    ):
        quantize_params(params, [(".*", INT4)])


def test_quantized_llama_runs_and_checkpoints(tmp_path):
    from flax import nnx

    from shrinkjax.io.checkpoint import load_checkpoint, save_checkpoint
    from shrinkjax.models.llama import LlamaConfig, abstract_model
    from shrinkjax.models.params import flat_params, model_from_params

    cfg = LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                      hidden_dim=128, max_seq_len=16)  # fmt: skip
    rng = np.random.default_rng(0)
    flat = {  # random weights without the (slow, eager) nnx initializers
        k: (rng.standard_normal(v.shape) * 0.1 if len(v.shape) == 2 else np.ones(v.shape))
        for k, v in flat_params(abstract_model(cfg)).items()
    }
    flat = {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    forward = nnx.jit(lambda m, t: m(t)[0])
    ref = forward(model_from_params(cfg, flat), tokens)
    rules = [(r".*q_proj.*", QuantSpec("nf4", double_quant=True)), (r".*k_proj.*", "nvfp4"),
             *default_rules(INT8)]  # fmt: skip
    qflat, report = quantize_params(flat, rules)
    assert len(report.quantized) == 7  # q, k, v, o, gate, up, down; embed stays float
    qmodel = model_from_params(cfg, qflat)
    assert isinstance(qmodel.layers[0].attn.q_proj.kernel.value, QuantizedArray)
    got = forward(qmodel, tokens)
    # the quantized weights were really used, and int8 per-channel is close to float
    assert not np.array_equal(got, ref)
    rel_rms = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel_rms < 0.1, rel_rms
    # ... and equal the float model run on the dequantized weights
    deq = {k: (v.dequantize() if isinstance(v, QuantizedArray) else v) for k, v in qflat.items()}
    np.testing.assert_allclose(
        got, forward(model_from_params(cfg, deq), tokens), rtol=1e-5, atol=1e-5
    )
    # shrinkjax checkpoints store the packed arrays and the spec, and restore them exactly
    save_checkpoint(str(tmp_path / "ckpt"), qmodel)
    restored, _ = load_checkpoint(str(tmp_path / "ckpt"))
    rflat = flat_params(restored)
    for k, v in qflat.items():
        if isinstance(v, QuantizedArray):
            assert isinstance(rflat[k], QuantizedArray) and rflat[k].spec == v.spec
            jax.tree.map(np.testing.assert_array_equal, rflat[k], v)
