"""The Pallas TPU kernels (int4/int8/MXFP4/NVFP4/2:4), on CPU: TPU interpret mode equals float64
math and the reference (ragged shapes, several K steps and groups, zero points or not), each
format lowers to a Mosaic custom call for the ``tpu`` platform, and ``dispatch.linear`` routes
to it on a TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shrinkjax.kernels.fp4_matmul  # noqa: F401  (register the formats with dispatch)
import shrinkjax.kernels.int_matmul  # noqa: F401
import shrinkjax.kernels.sparse_matmul  # noqa: F401
from shrinkjax.kernels import dispatch
from shrinkjax.kernels import driver as D
from shrinkjax.kernels import layouts as L
from shrinkjax.kernels import reference as R
from shrinkjax.kernels import tpu_matmul as T

TOL = 1e-2


def _int_problem(rng, bits, k, n, group, zeros):
    codes = rng.integers(0, 2**bits, (k, n))
    g = -(-k // group)
    s = rng.uniform(0.01, 0.05, (g, n)).astype(np.float32)
    z = rng.integers(0, 2**bits, (g, n)) if zeros else None
    p = L.pack_int(codes, s, z, bits=bits, group=group)
    sb = np.asarray(jnp.asarray(p.scales[:g, :n], jnp.float32), np.float64)  # stored bf16
    zz = np.full((g, n), 2 ** (bits - 1)) if z is None else z
    return p, (codes - np.repeat(zz, group, 0)[:k]) * np.repeat(sb, group, 0)[:k]


def _fp4_problem(rng, fmt, k, n):
    codes = rng.integers(0, 16, (k, n))
    e2m1 = L.E2M1_VALUES.astype(np.float64)[codes]
    if fmt == "mxfp4":
        e = rng.integers(118, 130, (k // 32, n))
        p = L.pack_mxfp4(codes, e.astype(np.uint8))
        return p, e2m1 * np.repeat(np.exp2(e - 127.0), 32, 0)
    s = rng.uniform(0.1, 2.0, (k // 16, n)).astype(np.float32)
    p = L.pack_nvfp4(codes, s, 0.01)
    s64 = np.asarray(R.e4m3_to_f32(p.scales), np.float64)[: k // 16, :n]  # stored e4m3
    return p, e2m1 * np.repeat(s64, 16, 0) * float(p.tensor_scale)


def _sparse_problem(rng, fmt, k, n):
    keep = L.random_mask_24(rng, k, n)
    if fmt == "2:4_bf16":
        dense = np.where(keep, rng.standard_normal((k, n)), 0.0)
        p = L.pack_24(dense)
        return p, np.asarray(jnp.asarray(dense, jnp.bfloat16).astype(jnp.float32), np.float64)
    codes = rng.integers(0, 16, (k, n))
    s = rng.uniform(0.01, 0.05, (k // 128, n)).astype(np.float32)
    z = rng.integers(0, 16, (k // 128, n))
    p = L.pack_24_int4(codes, s, z, group=128, keep_KxN=keep)
    sb = np.asarray(jnp.asarray(p.scales[: k // 128, :n], jnp.float32), np.float64)
    w = (codes - np.repeat(z, 128, 0)) * np.repeat(sb, 128, 0)
    return p, np.where(keep, w, 0.0)


def problem(rng, fmt, k, n, group=128):
    """(packed weight, float64 W [K, N]) for a format name; int formats: ``int4``/``int8``
    with zero points, ``int4_sym``/``int8_sym`` without."""
    if fmt.startswith("int"):
        return _int_problem(rng, int(fmt[3]), k, n, group, not fmt.endswith("_sym"))
    if fmt.startswith("2:4"):
        return _sparse_problem(rng, fmt, k, n)
    return _fp4_problem(rng, fmt, k, n)


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "fmt,k,n,group,m,tiles",
    [
        ("int4_sym", 256, 256, 128, 1, {}),
        ("int4", 300, 200, 128, 3, dict(block_k=128)),  # ragged K/N, 3 K steps
        ("int4_sym", 384, 256, 192, 2, dict(block_k=128, block_n=128)),  # groups across steps
        ("int8", 384, 256, 128, 17, dict(block_k=128, block_n=128, block_m=16)),  # 2 M tiles
        ("int8_sym", 200, 130, 64, 5, {}),
        ("mxfp4", 256, 256, 32, 1, {}),
        ("mxfp4", 320, 200, 32, 3, dict(block_k=128)),  # ragged N, K padded to the chunk
        ("nvfp4", 256, 384, 16, 5, dict(block_k=64, block_n=128)),
        ("2:4_bf16", 256, 256, 0, 1, {}),
        ("2:4_bf16", 250, 200, 0, 3, dict(block_k=256)),  # K not a multiple of 4, ragged N
        ("2:4_bf16", 512, 128, 0, 18, dict(block_k=256, block_m=16)),  # 2 K steps, 2 M tiles
        ("2:4_int4", 512, 256, 128, 2, dict(block_k=256)),
        ("2:4_int4", 384, 128, 128, 5, {}),
    ],
)
def test_tpu_matmul_equals_float64_and_reference(fmt, k, n, group, m, tiles):
    rng = np.random.default_rng([k, n, m, len(fmt)])
    p, w64 = problem(rng, fmt, k, n, group)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = T.tpu_matmul(x, p, **tiles)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, np.asarray(x.astype(jnp.float32), np.float64) @ w64) < TOL
    ref = np.asarray(R.matmul_ref(x, p).astype(jnp.float32), np.float64)
    assert _rel(y, ref) < 1e-3  # the same bf16 W, f32 accumulation in another order


def test_e2m1_f32_is_the_e2m1_table():
    q = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    got = np.asarray(T.e2m1_f32(q)).reshape(-1)
    np.testing.assert_array_equal(got, L.E2M1_VALUES)
    assert np.signbit(got[8])  # code 8 is -0.0


@pytest.mark.parametrize(
    "fmt", ["int4", "int4_sym", "int8", "mxfp4", "nvfp4", "2:4_bf16", "2:4_int4"]
)
def test_tpu_matmul_lowers_to_mosaic(fmt):
    p, _ = problem(np.random.default_rng(0), fmt, 1024, 512)
    x = jnp.ones((4, 1024), jnp.bfloat16)
    low = jax.jit(lambda x, p: T.tpu_matmul(x, p, interpret=False)).trace(x, p)
    text = low.lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("fmt", ["int4", "mxfp4", "nvfp4", "2:4_int4"])
def test_dispatch_routes_packed_weights_to_the_tpu_kernel_on_tpu(monkeypatch, fmt):
    rng = np.random.default_rng(3)
    p, _ = problem(rng, fmt, 256, 128)
    kind = {"int4": "int4", "mxfp4": "fp4", "nvfp4": "fp4", "2:4_int4": "2:4"}[fmt]
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)
    calls = []

    def spy(real, name):
        def run(*a, **kw):
            calls.append(kw.get("kind", "2:4"))
            return real(*a, **{**kw, "interpret": True})  # no TPU here: interpret it

        monkeypatch.setattr(T, name, run)

    monkeypatch.setattr(D, "on_tpu", lambda: True)
    spy(T._matmul_2d, "_matmul_2d")
    spy(T._matmul24_2d, "_matmul24_2d")
    y = dispatch.linear(x, p)
    assert calls == [kind] and y.shape == (2, 3, 128)
    ref = R.matmul_ref(x.reshape(6, 256), p).reshape(2, 3, 128)
    assert _rel(y, np.asarray(ref.astype(jnp.float32), np.float64)) < 1e-3


def test_tpu_matmul_errors():
    rng = np.random.default_rng(1)
    p, _ = problem(rng, "int4_sym", 256, 256)
    x = jnp.ones((1, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_n 192"):
        T.tpu_matmul(x, p, block_n=192)
    with pytest.raises(ValueError, match="block_m 12"):
        T.tpu_matmul(x, p, block_m=12)
    with pytest.raises(ValueError, match="K=100"):
        T.tpu_matmul(jnp.ones((1, 100), jnp.bfloat16), p)
    with pytest.raises(TypeError, match="no TPU kernel for ndarray"):
        T.tpu_matmul(x, np.ones((256, 256), np.float32))
