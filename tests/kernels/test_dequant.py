"""Prefill path: the Pallas dequantize kernels (interpret mode) equal the reference
dequantization bit for bit, and dequantize-then-dot equals the reference matmul."""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.kernels import dequant, dispatch
from shrinkjax.kernels import reference as R
from shrinkjax.kernels.fp4_matmul import fp4_matmul
from shrinkjax.kernels.int_matmul import int_matmul
from shrinkjax.kernels.sparse_matmul import sparse24_matmul

from .test_kernels import make_24, make_24_int4, make_int, make_mxfp4, make_nvfp4, rand_x


def bits(a) -> np.ndarray:
    """bf16 array -> its uint16 bit patterns (bit-exact comparison, -0.0 != 0.0)."""
    a = np.asarray(jnp.asarray(a, jnp.bfloat16))
    return a.view(np.uint16)


# (name, builder(rng) -> packed, matmul fn, dequantize tiles). K and N are ragged: not multiples
# of the chunk / block_k nor of block_n, so padding rows/columns and several programs are hit.
CASES = [
    ("int4_asym_g32", lambda r: make_int(r, 160, 200, 4, 32, True)[0], int_matmul, 64),
    ("int4_sym_g128", lambda r: make_int(r, 384, 130, 4, 128, False)[0], int_matmul, 128),
    ("int4_ragged_group", lambda r: ragged_int4(r), int_matmul, 64),
    ("int8_asym_g64", lambda r: make_int(r, 192, 72, 8, 64, True)[0], int_matmul, 128),
    ("mxfp4", lambda r: make_mxfp4(r, 160, 130)[0], fp4_matmul, 128),
    ("nvfp4", lambda r: make_nvfp4(r, 112, 200)[0], fp4_matmul, 64),
    ("24_bf16", lambda r: make_24(r, 130, 100)[0], sparse24_matmul, 256),
    ("24_int4_asym_g64", lambda r: make_24_int4(r, 192, 64, 64, True)[0], sparse24_matmul, 256),
    ("24_int4_sym_g128", lambda r: make_24_int4(r, 256, 136, 128, False)[0], sparse24_matmul, 512),
]


def ragged_int4(rng):
    """K = 100 with g = 32: a short last group (rows past K hold the zero-point code)."""
    from shrinkjax.kernels import layouts as L

    codes = rng.integers(0, 16, (100, 40))
    scales = rng.uniform(0.05, 0.2, (4, 40))
    zeros = rng.integers(0, 16, (4, 40))
    return L.pack_int(codes, scales, zeros, bits=4, group=32)


@pytest.mark.parametrize("name,build,fn,block_k", CASES, ids=[c[0] for c in CASES])
def test_dequantize_kernel_is_bit_exact_and_dequant_dot_matches(name, build, fn, block_k):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    p = build(rng)
    w = dequant.dequantize(p, interpret=True, block_k=block_k, block_n=128)
    assert w.shape == (p.k, p.n) and w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(bits(w), bits(R.dequantize(p)))
    if name == "nvfp4":
        exact = dequant.dequantize(p, interpret=True, tensor_scale=False)
        want = R.dequantize_nvfp4(p, with_tensor_scale=False)
        np.testing.assert_array_equal(bits(exact), bits(want))
    # prefill path: dequantize-then-dot == x @ reference dequantization, up to the summation
    # order of the (padded) GEMM and the final bf16 rounding
    x = rand_x(rng, 7, p.k)
    y = fn(x, p, interpret=True, path="dequant_dot")
    want = R._mm(x, R.dequantize(p))  # NVFP4: tensor scale folded into W like the kernel
    assert y.shape == (7, p.n) and y.dtype == jnp.bfloat16
    y32, w32 = np.asarray(y, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(y32, w32, rtol=2**-7, atol=2**-7 * np.abs(w32).max())
    ref = R.matmul_ref(x, p)
    rel = float(jnp.linalg.norm((y - ref).astype(jnp.float32)) / jnp.linalg.norm(ref))
    assert rel < 1e-2


def test_auto_path_threshold_and_dispatch_path(monkeypatch):
    rng = np.random.default_rng(4)
    p, _ = make_int(rng, 128, 64, 4, 64, True)
    calls = []
    orig = dequant.dequant_matmul_2d
    monkeypatch.setattr(
        dequant, "dequant_matmul_2d", lambda *a, **k: calls.append(1) or orig(*a, **k)
    )
    monkeypatch.setattr(dispatch, "PREFILL_MIN_M", 8)
    assert dispatch.choose_path("auto", 7) == "fused"
    assert dispatch.choose_path("auto", 8) == "dequant_dot"
    with pytest.raises(ValueError, match="path must be one of"):
        dispatch.choose_path("cublas", 8)
    x = rand_x(rng, 4, 128)
    int_matmul(x, p, interpret=True)  # M = 4 < 8: fused
    assert not calls
    x3 = jnp.asarray(rng.standard_normal((2, 5, 128)), jnp.float32)  # M = 10 >= 8, f32 in/out
    y = int_matmul(x3, p, interpret=True)
    assert calls and y.shape == (2, 5, 64) and y.dtype == jnp.float32
    want = R.int_matmul_ref(x3.reshape(10, 128), p).reshape(2, 5, 64)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    calls.clear()
    int_matmul(x3, p, interpret=True, block_n=64)  # explicit tiles imply the fused kernel
    assert not calls
    # dispatch.linear forwards path= (CPU: the reference)
    y = dispatch.linear(x, p, path="dequant_dot")
    np.testing.assert_array_equal(bits(y), bits(R.int_matmul_ref(x, p)))
    # fused and dequant_dot agree
    y1 = int_matmul(x3, p, interpret=True, path="fused")
    y2 = int_matmul(x3, p, interpret=True, path="dequant_dot")
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-5, atol=1e-5)
