"""Fused q/k/v and gate/up projections: the same model outputs, exact concatenation of
compressed weights, and clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.calibrate import calibrate
from shrinkjax.kernels import dispatch
from shrinkjax.models import fuse
from shrinkjax.models.generate import generate
from shrinkjax.models.llama import LlamaConfig, init_model
from shrinkjax.models.params import flat_params
from shrinkjax.quant import formats
from shrinkjax.quant.array import QuantSpec
from shrinkjax.sparse.array import compress

CFG = LlamaConfig(
    vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=32
)


def _quantize_linears(model, spec):
    fmt = formats.make(spec)
    for path, w in flat_params(model).items():
        if path.endswith("_proj.kernel"):
            owner = model
            for part in path.split(".")[:-1]:
                owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
            owner.kernel.value = fmt.quantize(w)
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_fused_model_has_the_same_logits_and_generations(bias):
    model = init_model(CFG.replace(attention_bias=bias), seed=1)
    fused = fuse.fuse_projections(model)
    paths = set(flat_params(fused))
    assert "layers.0.attn.qkv_proj.kernel" in paths and "layers.1.mlp.gate_up_proj.kernel" in paths
    assert not any(p.endswith(("q_proj.kernel", "gate_proj.kernel")) for p in paths)
    assert ("layers.0.attn.qkv_proj.bias" in paths) == bias
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)))
    np.testing.assert_allclose(
        np.asarray(fused(toks)[0]), np.asarray(model(toks)[0]), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(generate(fused, toks, 6), generate(model, toks, 6))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int4", group_size=32, symmetric=False),
        QuantSpec("int8", granularity="channel"),
        QuantSpec("mxfp4", group_size=32),
    ],
    ids=lambda s: s.describe(),
)
def test_compressed_weights_concatenate_exactly(spec):
    model = _quantize_linears(init_model(CFG, seed=2), spec)
    flat = flat_params(model)
    fused = flat_params(fuse.fuse_projections(model))
    for i in range(CFG.n_layers):
        for name, parts in fuse.FUSED_LINEARS.items():
            want = np.concatenate(
                [np.asarray(flat[f"layers.{i}.{p}.kernel"].dequantize()) for p in parts], axis=1
            )
            got = fused[f"layers.{i}.{name}.kernel"]
            assert type(got).__name__ == "QuantizedArray"
            assert got.spec == flat[f"layers.{i}.{parts[0]}.kernel"].spec
            np.testing.assert_array_equal(np.asarray(got.dequantize()), want)


def test_sparse_weights_concatenate_exactly():
    rng = np.random.default_rng(3)
    parts = [jnp.asarray(rng.standard_normal((64, n)), jnp.float32) for n in (32, 16, 16)]
    int4 = formats.make(QuantSpec("int4", group_size=32, symmetric=True))
    for quant in (None, int4):
        sp = [compress(w, 2, 4, quant=quant) for w in parts]
        got = fuse.concat_columns(sp, "qkv")
        assert got.shape == (64, 64) and got.pattern == "2:4"
        want = np.concatenate([np.asarray(s.to_dense(jnp.float32)) for s in sp], axis=1)
        np.testing.assert_array_equal(np.asarray(got.to_dense(jnp.float32)), want)
        x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
        np.testing.assert_allclose(
            np.asarray(dispatch.linear(x, got)), np.asarray(x) @ want, rtol=1e-5, atol=1e-4
        )


def test_fuse_errors_name_the_weight():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    q4 = formats.make(QuantSpec("int4", group_size=32)).quantize(w)
    q8 = formats.make(QuantSpec("int8", group_size=32)).quantize(w)
    with pytest.raises(
        TypeError, match="at layers.3.attn.qkv_proj.kernel: a mix of dense and compressed"
    ):
        fuse.concat_columns([w, q4], "layers.3.attn.qkv_proj.kernel")
    with pytest.raises(ValueError, match="settings differ"):
        fuse.concat_columns([q4, q8])
    with pytest.raises(ValueError, match="K differ"):
        fuse.concat_columns([w, w[:32]])
    nv = formats.make(QuantSpec("nvfp4", group_size=16))
    a, b = nv.quantize(w), nv.quantize(3 * w)  # tensor-wide scales differ
    with pytest.raises(ValueError, match="tensor-wide"):
        fuse.concat_columns([a, b])
    model = init_model(CFG, seed=5)
    fused = fuse.fuse_projections(model)
    with pytest.raises(ValueError, match="fused already"):
        fuse.fuse_projections(fused)
    with pytest.raises(ValueError, match="calibrate the unfused model"):
        calibrate(fused, jnp.zeros((1, 8), jnp.int32), method=None, progress=False)


def test_fused_quantized_checkpoint_round_trip(tmp_path):
    from shrinkjax.io.checkpoint import load_checkpoint, save_checkpoint

    spec = QuantSpec("int4", group_size=32, symmetric=False)
    fused = fuse.fuse_projections(_quantize_linears(init_model(CFG, seed=6), spec))
    save_checkpoint(str(tmp_path / "ck"), fused)
    restored, _ = load_checkpoint(str(tmp_path / "ck"))
    assert restored.cfg.fused_projections
    toks = jnp.asarray(np.random.default_rng(6).integers(0, 64, (1, 7)))
    np.testing.assert_array_equal(np.asarray(restored(toks)[0]), np.asarray(fused(toks)[0]))
