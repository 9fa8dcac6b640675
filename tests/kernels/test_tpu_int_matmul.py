"""The Pallas TPU int4/int8 kernel, on CPU: TPU interpret mode equals float64 math and the
reference (ragged shapes, several K steps and groups, zero points or not), it lowers to a Mosaic
custom call for the ``tpu`` platform, and ``dispatch.linear`` routes to it on a TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shrinkjax.kernels.int_matmul  # noqa: F401  (registers PackedInt with dispatch)
from shrinkjax.kernels import dispatch
from shrinkjax.kernels import driver as D
from shrinkjax.kernels import layouts as L
from shrinkjax.kernels import reference as R
from shrinkjax.kernels import tpu_int_matmul as T

TOL = 1e-2


def _problem(rng, bits, k, n, group, zeros):
    codes = rng.integers(0, 2**bits, (k, n))
    g = -(-k // group)
    s = rng.uniform(0.01, 0.05, (g, n)).astype(np.float32)
    z = rng.integers(0, 2**bits, (g, n)) if zeros else None
    p = L.pack_int(codes, s, z, bits=bits, group=group)
    sb = np.asarray(jnp.asarray(p.scales[:g, :n], jnp.float32), np.float64)  # stored bf16
    zz = np.full((g, n), 2 ** (bits - 1)) if z is None else z
    return p, (codes - np.repeat(zz, group, 0)[:k]) * np.repeat(sb, group, 0)[:k]


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "bits,k,n,group,zeros,m,tiles",
    [
        (4, 256, 256, 128, False, 1, {}),
        (4, 300, 200, 128, True, 3, dict(block_k=128)),  # ragged K/N, 3 K steps
        (4, 384, 256, 192, False, 2, dict(block_k=128, block_n=128)),  # groups across steps
        (8, 384, 256, 128, True, 17, dict(block_k=128, block_n=128, block_m=16)),  # 2 M tiles
        (8, 200, 130, 64, False, 5, {}),
    ],
)
def test_tpu_int_matmul_equals_float64_and_reference(bits, k, n, group, zeros, m, tiles):
    rng = np.random.default_rng([bits, k, n, m])
    p, w64 = _problem(rng, bits, k, n, group, zeros)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = T.tpu_int_matmul(x, p, **tiles)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, np.asarray(x.astype(jnp.float32), np.float64) @ w64) < TOL
    ref = np.asarray(R.int_matmul_ref(x, p).astype(jnp.float32), np.float64)
    assert _rel(y, ref) < 1e-3  # same bf16 W, f32 accumulation in another order


@pytest.mark.parametrize("bits,zeros", [(4, True), (4, False), (8, True)])
def test_tpu_int_matmul_lowers_to_mosaic(bits, zeros):
    rng = np.random.default_rng(0)
    p, _ = _problem(rng, bits, 1024, 512, 128, zeros)
    x = jnp.ones((4, 1024), jnp.bfloat16)
    low = jax.jit(lambda x, p: T.tpu_int_matmul(x, p, interpret=False)).trace(x, p)
    text = low.lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


def test_dispatch_routes_packed_int_to_the_tpu_kernel_on_tpu(monkeypatch):
    rng = np.random.default_rng(3)
    p, _ = _problem(rng, 4, 256, 128, 128, True)
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)
    calls = []
    real = T._matmul_2d

    def spy(*a, **kw):
        calls.append(kw["bits"])
        return real(*a, **{**kw, "interpret": True})  # no TPU here: interpret it

    monkeypatch.setattr(D, "on_tpu", lambda: True)
    monkeypatch.setattr(T, "_matmul_2d", spy)
    y = dispatch.linear(x, p)
    assert calls == [4] and y.shape == (2, 3, 128)
    ref = R.int_matmul_ref(x.reshape(6, 256), p).reshape(2, 3, 128)
    assert _rel(y, np.asarray(ref.astype(jnp.float32), np.float64)) < 1e-3


def test_tpu_int_matmul_errors():
    rng = np.random.default_rng(1)
    p, _ = _problem(rng, 4, 256, 256, 128, False)
    x = jnp.ones((1, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_n 192"):
        T.tpu_int_matmul(x, p, block_n=192)
    with pytest.raises(ValueError, match="block_m 12"):
        T.tpu_int_matmul(x, p, block_m=12)
    with pytest.raises(ValueError, match="K=100"):
        T.tpu_int_matmul(jnp.ones((1, 100), jnp.bfloat16), p)
