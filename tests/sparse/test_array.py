"""NMSparseArray: exact round trip, dispatch, real byte counts, int4 values, checkpoints."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shrinkjax.kernels import dispatch
from shrinkjax.models.llama import LlamaConfig
from shrinkjax.models.params import flat_params, model_from_params
from shrinkjax.quant import formats
from shrinkjax.quant.array import QuantizedArray, QuantSpec
from shrinkjax.sparse import magnitude, sparsegpt, stage
from shrinkjax.sparse.array import NMSparseArray, compress, stored_nbytes
from tests.sparse.helpers import random_model


def _w(k=64, n=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32))


@pytest.mark.parametrize("nm,bits", [((2, 4), 2), ((4, 8), 3), ((1, 4), 2)])
def test_roundtrip_exact_and_bytes(nm, bits):
    n, m = nm
    w = _w()
    pw, mask = magnitude.prune(w, f"{n}:{m}")
    a = compress(pw, n, m, mask)
    np.testing.assert_array_equal(np.asarray(a.to_dense()), np.asarray(pw))
    np.testing.assert_array_equal(np.asarray(a.mask()), np.asarray(mask))
    kept = 64 // m * n
    # values f32 + b-bit positions, nothing else
    assert a.nbytes == kept * 24 * 4 + kept * 24 * bits // 8
    assert a.nbytes == stored_nbytes(a)
    assert a.shape == (64, 24) and a.size == 64 * 24


def test_compress_without_mask_keeps_nonzeros_and_rejects_bad_masks():
    pw, mask = magnitude.prune(_w(), "2:4")
    a = compress(pw, 2, 4)
    np.testing.assert_array_equal(np.asarray(a.mask()), np.asarray(mask))
    bad = np.asarray(mask).copy()
    bad[0, 0] = ~bad[0, 0]
    with pytest.raises(ValueError, match="not 2:4"):
        compress(pw, 2, 4, bad)


def test_dispatch_linear_matches_dense_under_jit():
    pw, mask = magnitude.prune(_w(), "2:4")
    a = compress(pw, 2, 4, mask)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float32))
    want = np.asarray(x @ pw)
    np.testing.assert_allclose(np.asarray(dispatch.linear(x, a)), want, rtol=1e-5, atol=1e-5)
    got = jax.jit(dispatch.linear)(x, a)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_24_int4_values_carry_sparsegpt_grid_exactly():
    k, n = 256, 32
    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, k)).astype(np.float32)
    w = _w(k, n)
    st = sparsegpt.update_stats(sparsegpt.init_stats(k), x)
    fmt = formats.make(QuantSpec("int4", group_size=128, symmetric=False))
    r = sparsegpt.prune(w, sparsegpt.hessian(st), "2:4", quant=fmt)
    a = compress(r.weight, 2, 4, r.mask, quant=fmt, qparams=r.qparams)
    assert isinstance(a.values, QuantizedArray)
    assert a.values.spec.group_size == 64  # g128 on K is g64 on the compressed axis
    np.testing.assert_array_equal(np.asarray(a.to_dense()), np.asarray(r.weight))
    # int4 codes of the kept half + 2-bit positions + one scale and uint8 zero per 128 rows
    scale_bytes = a.values.scales.dtype.itemsize
    assert a.values.zeros.dtype == jnp.uint8
    assert a.nbytes == (k // 2) * n // 2 + (k // 2) * n // 4 + (k // 128) * n * (scale_bytes + 1)
    assert a.bits_per_weight < 3.3


def test_model_with_sparse_kernels_runs_and_checkpoints(tmp_path):
    from shrinkjax.io.checkpoint import load_checkpoint, save_checkpoint

    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48)
    model = random_model(cfg)
    dense_bytes = stored_nbytes(flat_params(model))
    ref = model_from_params(cfg, flat_params(model))
    stage.magnitude_prune(ref, "2:4", compressed=False)
    stage.magnitude_prune(model, "2:4", compressed=True)
    assert isinstance(model.layers[0].mlp.down_proj.kernel.get_value(), NMSparseArray)
    tokens = jnp.arange(10)[None] % 64
    fwd = nnx.jit(lambda m, t: m(t)[0])
    np.testing.assert_allclose(
        np.asarray(fwd(model, tokens)), np.asarray(fwd(ref, tokens)), rtol=1e-5, atol=1e-5
    )
    linear_dense = sum(v.nbytes for k, v in flat_params(ref).items() if "_proj" in k)
    saved = dense_bytes - stored_nbytes(flat_params(model))
    assert saved == linear_dense - linear_dense * 17 // 32  # 2:4 f32: 17 bits per weight
    save_checkpoint(str(tmp_path / "ck"), model)
    back, _ = load_checkpoint(str(tmp_path / "ck"))
    assert isinstance(back.layers[1].attn.q_proj.kernel.get_value(), NMSparseArray)
    assert stored_nbytes(flat_params(back)) == stored_nbytes(flat_params(model))
    np.testing.assert_array_equal(np.asarray(fwd(back, tokens)), np.asarray(fwd(model, tokens)))
    assert os.path.isfile(tmp_path / "ck" / "shrinkjax_model.json")


def test_24_int4_ragged_groups_on_the_compressed_axis():
    # K = 576 at int4 g128: dense groups 4 x 128 + 64 -> compressed 288 rows in int4 g64
    # groups 4 x 64 + 32, reusing SparseGPT's 5 scales unchanged
    k, n = 576, 16
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1024, k)).astype(np.float32)
    w = _w(k, n)
    st = sparsegpt.update_stats(sparsegpt.init_stats(k), x)
    fmt = formats.make(QuantSpec("int4", group_size=128, symmetric=False))
    r = sparsegpt.prune(w, sparsegpt.hessian(st), "2:4", quant=fmt)
    a = compress(r.weight, 2, 4, r.mask, quant=fmt, qparams=r.qparams)
    assert a.values.shape == (288, n) and a.values.spec.group_size == 64
    np.testing.assert_array_equal(np.asarray(a.values.scales), np.asarray(r.qparams["scales"]))
    np.testing.assert_array_equal(np.asarray(a.values.zeros), np.asarray(r.qparams["zeros"]))
    np.testing.assert_array_equal(np.asarray(a.to_dense()), np.asarray(r.weight))
    # RTN on the compressed axis also has 5 groups
    assert compress(r.weight, 2, 4, r.mask, quant=fmt).values.scales.shape == (5, n)
    # qparams of the wrong grouping are refused with a clear message
    with pytest.raises(ValueError, match="qparams hold 4 groups.*K=576 has 5"):
        compress(
            r.weight,
            2,
            4,
            r.mask,
            quant=fmt,
            qparams={"scales": r.qparams["scales"][:4], "zeros": r.qparams["zeros"][:4]},
        )
