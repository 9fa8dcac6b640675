"""QuantizedArray → kernel layouts: same weights, and a quantized model runs through dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.kernels import reference
from shrinkjax.kernels.convert import pack_model_for_kernels, to_kernel_layout
from shrinkjax.models.fuse import fuse_projections
from shrinkjax.models.params import flat_params, model_from_params
from shrinkjax.quant import formats, rtn, rules
from shrinkjax.quant.array import QuantSpec

SPECS = [
    QuantSpec("int4", group_size=32),
    QuantSpec("int4", group_size=64, symmetric=False),
    QuantSpec("int8", granularity="channel"),
    QuantSpec("mxfp4"),
    QuantSpec("nvfp4"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_packed_weight_dequantizes_to_the_same_values(spec):
    w = np.random.default_rng(0).standard_normal((128, 96)).astype(np.float32)
    q = formats.make(spec).quantize(jnp.asarray(w))
    packed = to_kernel_layout(q)
    got = np.asarray(reference.dequantize(packed), np.float32)[:128, :96]
    want = np.asarray(q.dequantize(jnp.float32))
    # the kernels' weights are bf16 (relative 2**-9): int scales are rounded to bf16 at pack time
    # and NVFP4's tensor scale multiplies in; MXFP4 (power-of-two scales × E2M1) stays exact
    tol = 0.0 if spec.format == "mxfp4" else 4e-3
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("fused", [False, True])
def test_quantized_model_runs_through_kernel_dispatch(tiny_llama, fused):
    toks = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 16)))
    spec = QuantSpec("int4", group_size=32)
    q, _ = rtn.quantize_params(flat_params(tiny_llama.model), rules.default_rules(spec))
    model = model_from_params(tiny_llama.model.cfg, q)
    ref = np.asarray(model(toks)[0])
    if fused:  # fuse the quantized q/k/v and gate/up, then pack: 4 linears per block
        model = fuse_projections(model)
    report = pack_model_for_kernels(model, int4_layout="tc")  # (CPU default: split_half)
    assert len(report["converted"]) == (8 if fused else 14) and not report["kept"]
    out = np.asarray(model(toks)[0])
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0 < rel < 2e-2  # bf16 activations/scales on the kernel path


def test_int4_layout_choice():
    from shrinkjax.kernels import int4_tc, layouts

    w = jnp.asarray(np.random.default_rng(4).standard_normal((256, 128)).astype(np.float32))
    q = formats.make(QuantSpec("int4", group_size=128)).quantize(w)
    assert isinstance(to_kernel_layout(q, "tc"), int4_tc.TcInt4)
    assert isinstance(to_kernel_layout(q, "split_half"), layouts.PackedInt)
    assert isinstance(to_kernel_layout(q), layouts.PackedInt)  # "auto" off-GPU
    q96 = formats.make(QuantSpec("int4", group_size=96)).quantize(w[:192])
    assert isinstance(to_kernel_layout(q96, "tc"), layouts.PackedInt)  # tc can't take g96
    with pytest.raises(ValueError, match="int4_layout"):
        to_kernel_layout(q, "marlin")


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_layout_choice(fmt):
    from shrinkjax.kernels import fp4_tc, layouts

    w = jnp.asarray(np.random.default_rng(5).standard_normal((256, 128)).astype(np.float32))
    q = formats.make(QuantSpec(fmt)).quantize(w)
    tc = to_kernel_layout(q, fp4_layout="tc")
    half = to_kernel_layout(q, fp4_layout="split_half")
    assert isinstance(tc, fp4_tc.TcFP4) and tc.fmt == fmt
    assert isinstance(half, layouts.PackedMXFP4 | layouts.PackedNVFP4)
    auto = fp4_tc.TcFP4 if jax.default_backend() == "gpu" else type(half)
    assert type(to_kernel_layout(q)) is auto
    np.testing.assert_array_equal(
        np.asarray(reference.dequantize(tc)).view(np.uint16),
        np.asarray(reference.dequantize(half)).view(np.uint16),
    )
    with pytest.raises(ValueError, match="fp4_layout"):
        to_kernel_layout(q, fp4_layout="marlin")


@pytest.mark.parametrize("values", ["float", "int4"])
@pytest.mark.parametrize("sparse_layout", ["tc", "split_half"])
def test_pruned_model_runs_through_kernel_dispatch(tiny_llama, sparse_layout, values):
    """A 2:4-pruned model (values float, or int4 g64 where K allows): every linear becomes a
    2:4 kernel layout and the logits stay close to the reference path's."""
    from shrinkjax.kernels import layouts, sparse24_tc
    from shrinkjax.sparse.array import NMSparseArray, compress

    toks = jnp.asarray(np.random.default_rng(2).integers(0, 128, (2, 16)))
    int4 = formats.make(QuantSpec("int4", group_size=64))

    def prune(v):
        quant = int4 if values == "int4" and v.shape[0] % 64 == 0 else None
        return compress(v, 2, 4, quant=quant)

    flat = flat_params(tiny_llama.model)
    pruned = {
        k: prune(v) if k.endswith("kernel") and "embed" not in k else v for k, v in flat.items()
    }
    model = model_from_params(tiny_llama.model.cfg, pruned)
    ref = np.asarray(model(toks)[0])
    n_sparse = sum(isinstance(v, NMSparseArray) for v in pruned.values())
    report = pack_model_for_kernels(model, sparse_layout=sparse_layout)
    assert len(report["converted"]) == n_sparse and not report["kept"]
    packed = flat_params(model)[report["converted"][0]]
    want = sparse24_tc.Tc24 if sparse_layout == "tc" else layouts.Packed24
    assert isinstance(packed, want) and packed.is_int4 == (values == "int4")
    out = np.asarray(model(toks)[0])
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0 < rel < 2e-2  # bf16 values/scales and activations on the kernel path


@pytest.mark.parametrize("k", [256, 576], ids=["K256", "K576_ragged"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pruned_int4_weight_packs_to_the_same_values(symmetric, k):
    """2:4 with int4 g128 values (g64 on the compressed axis): the kernel layout dequantizes to
    the NMSparseArray's own dense weight (bf16 scales: two roundings) and the kernel (interpret
    mode) matches the reference matmul; symmetric codes go to the tensor-core layout, asymmetric
    ones to Packed24. K = 576 (SmolLM2's hidden size) ends in a short group of 64 rows."""
    from shrinkjax.kernels import layouts, sparse24_tc
    from shrinkjax.kernels.sparse_matmul import sparse24_matmul
    from shrinkjax.sparse.array import compress

    w = np.random.default_rng(3).standard_normal((k, 128)).astype(np.float32)
    w[512:] *= 0.05  # a neighbour's scale on the short group would show
    spec = QuantSpec("int4", group_size=128, symmetric=symmetric)
    q24 = compress(jnp.asarray(w), 2, 4, quant=formats.make(spec))
    packed = to_kernel_layout(q24, sparse_layout="tc")
    want_t = sparse24_tc.Tc24 if symmetric else layouts.Packed24
    assert isinstance(packed, want_t) and packed.is_int4 and packed.shape == (k, 128)
    got = np.asarray(reference.dequantize(packed), np.float32)
    want = np.asarray(q24.to_dense(jnp.float32))
    for rows in (slice(0, 512), slice(512, k)) if k > 512 else (slice(0, k),):
        a, b = got[rows], want[rows]
        np.testing.assert_allclose(a, b, rtol=8e-3, atol=4e-3 * np.abs(b).max())
    assert not got[want == 0].any()  # pruned rows stay exactly zero
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, k)), jnp.bfloat16)
    matmul = sparse24_tc.tc24_linear if symmetric else sparse24_matmul
    y = np.asarray(matmul(x, packed, interpret=True), np.float32)
    y_ref = np.asarray(x.astype(jnp.float32) @ want)
    np.testing.assert_allclose(y, y_ref, rtol=2e-2, atol=2e-2 * np.abs(y_ref).max())
    q3 = compress(w, 2, 4, quant=formats.make(QuantSpec("int3", group_size=128)))
    assert to_kernel_layout(q3) is None  # no 2:4 int3 kernel: kept on the reference path


def test_unsupported_formats_are_kept():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32))
    assert to_kernel_layout(formats.make(QuantSpec("nf4")).quantize(w)) is None
    assert to_kernel_layout(w) is None


@pytest.mark.parametrize("int4_layout", ["tc", "split_half"])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int4", group_size=128),
        QuantSpec("int4", group_size=128, symmetric=False),
        QuantSpec("int8", group_size=128, symmetric=False),
    ],
    ids=lambda s: s.describe(),
)
def test_ragged_groups_pack_with_zero_padding(spec, int4_layout):
    """K = 576 at g128 (4 x 128 + 64): the short group is padded with zero-point codes, so the
    padding rows dequantize to exactly 0; the real rows and the kernel's matmul are unchanged."""
    import dataclasses

    from shrinkjax.kernels import int4_tc
    from shrinkjax.kernels.int_matmul import int_matmul

    if spec.format == "int8" and int4_layout == "tc":
        pytest.skip("int8 has one layout")

    k, n = 576, 96
    w = np.random.default_rng(2).standard_normal((k, n)).astype(np.float32)
    w[512:] *= 0.05  # a neighbour's scale on the short group would show
    q = formats.make(spec).quantize(jnp.asarray(w))
    assert q.scales.shape == (5, n)
    packed = to_kernel_layout(q, int4_layout)
    assert packed is not None and packed.shape == (k, n) and packed.kp >= 640
    tc = isinstance(packed, int4_tc.TcInt4)
    assert tc == (int4_layout == "tc" and spec.format == "int4")
    got = np.asarray(reference.dequantize(packed), np.float32)[:k, :n]
    want = np.asarray(q.dequantize(jnp.float32))
    for rows in (slice(0, 512), slice(512, k)):  # bf16 scales and weights: 2 roundings
        a, b = got[rows], want[rows]
        np.testing.assert_allclose(a, b, rtol=8e-3, atol=4e-3 * np.abs(b).max())
    whole = reference.dequantize(dataclasses.replace(packed, k=packed.kp, n=packed.np_))
    assert not np.asarray(whole, np.float32)[k:].any()  # padding rows are exactly zero
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, k)), jnp.bfloat16)
    matmul = int4_tc.tc_linear if tc else int_matmul
    y = np.asarray(matmul(x, packed, interpret=True), np.float32)
    y_ref = np.asarray(reference.matmul_ref(x, packed), np.float32)
    np.testing.assert_allclose(y, y_ref, rtol=2e-2, atol=2e-2 * np.abs(y_ref).max())
