"""The Mosaic GPU int4 decode kernel (``kernels/int4_mgpu.py``): it lowers for CUDA on this CPU
machine over its tile choices, refuses what it does not take by name, ``int4_tc_matmul`` routes
decode calls to it exactly where it should, and on a Hopper GPU it equals float64 (and the
reference's bf16 weights) on random and ragged shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.kernels import driver as D
from shrinkjax.kernels import int4_mgpu as IM
from shrinkjax.kernels import int4_tc as T

from .test_kernels import make_int, rel_err

SHAPES = [  # (k, n, block_n, zeros): tile_k 512 / 256 / 128 (1 group), ragged N
    (1024, 768, 128, True),
    (1280, 760, 64, True),
    (1152, 256, 128, False),
]


def _tc(rng, k, n, bn, zeros, group=128):
    p, w64 = make_int(rng, k, n, 4, group, zeros)
    return T.pack_tc(p, bn), w64


def _abstract(t):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)


@pytest.mark.parametrize("m", [1, 9, 16])
@pytest.mark.parametrize("k,n,bn,zeros", SHAPES)
def test_lowers_for_cuda(m, k, n, bn, zeros):
    t = _abstract(_tc(np.random.default_rng(0), k, n, bn, zeros)[0])
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    text = jax.jit(IM.int4_mgpu_matmul).trace(x, t).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_tile_k_for_padded_k():
    assert [IM.tile_k_for(kw) for kw in (8192, 1280, 1152, 128)] == [
        (512, 2), (256, 2), (128, 1), (128, 1)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="padded K 200 must be a multiple of 128"):
        IM.tile_k_for(200)


def test_refuses_what_it_does_not_take():
    rng = np.random.default_rng(1)
    t, _ = _tc(rng, 256, 128, 64, True)
    with pytest.raises(ValueError, match=r"x must be \[M <= 16, K = 256\], got \(17, 256\)"):
        IM.int4_mgpu_matmul(jnp.ones((17, 256), jnp.bfloat16), t)
    with pytest.raises(ValueError, match=r"got \(2, 128\)"):
        IM.int4_mgpu_matmul(jnp.ones((2, 128), jnp.bfloat16), t)
    t64, _ = _tc(rng, 256, 128, 64, True, group=64)
    with pytest.raises(ValueError, match="needs group 128 and block_n a multiple of 64, got 64"):
        IM.int4_mgpu_matmul(jnp.ones((2, 256), jnp.bfloat16), t64)
    with pytest.raises(ValueError, match="backend must be 'triton', 'mgpu' or None, got 'cuda'"):
        T.int4_tc_matmul(jnp.ones((2, 256), jnp.bfloat16), t, backend="cuda")


def test_not_usable_without_hopper():
    if jax.default_backend() == "gpu":
        pytest.skip("a CPU test")
    t, _ = _tc(np.random.default_rng(2), 256, 128, 64, True)
    assert not IM.usable(t, 1)
    assert T.resolve_backend(t, 1) == "triton"
    with pytest.raises(ValueError, match="backend 'mgpu' needs a Hopper GPU with Mosaic GPU"):
        T.int4_tc_matmul(jnp.ones((1, 256), jnp.bfloat16), t, backend="mgpu")


def test_wave_fill_of_the_8b_shapes():
    fills = {n: IM.wave_fill(n, 132) for n in (8192, 4096, 14336, 128256)}
    got = {n: (w, round(f, 2)) for n, (w, f) in fills.items()}
    assert got == {8192: (1, 0.97), 4096: (1, 0.48), 14336: (2, 0.85), 128256: (16, 0.95)}


@pytest.mark.parametrize(
    "m,group,kw,want",
    [
        (1, 128, {}, "mgpu"),
        (16, 128, {}, "mgpu"),
        (17, 128, {}, "triton"),  # (more rows than the wgmma's 16)
        (4, 64, {}, "triton"),  # (a scale per 64 K rows)
        (4, 128, {"xsum": "sum"}, "triton"),  # (a Triton tuning given)
        (4, 128, {"num_warps": 2}, "triton"),
        (4, 128, {"backend": "triton"}, "triton"),
        (4, 128, {"sms": 3}, "triton"),  # (2 tiles on 3 SMs: a wave 0.67 full)
        (4, 128, {"sms": 1}, "triton"),  # (2 tiles on 1 SM: 2 waves, full)
    ],
)
def test_int4_tc_matmul_routes_decode_to_mosaic_on_hopper(monkeypatch, m, group, kw, want):
    monkeypatch.setattr(IM, "on_hopper", lambda: True)
    monkeypatch.setattr(D, "_num_sms", lambda: 2)  # (the test's 2 tiles fill 2 SMs)
    calls = []

    def fake_mgpu(x2, t):
        calls.append(x2.shape)
        return jnp.zeros((x2.shape[0], t.n), jnp.bfloat16)

    def fake_triton(*a, **k):
        calls.append("triton")
        return jnp.zeros((m, 128), jnp.float32)

    monkeypatch.setattr(IM, "int4_mgpu_matmul", fake_mgpu)
    monkeypatch.setattr(T.D, "call_2d", fake_triton)
    kw = dict(kw)
    if "sms" in kw:
        sms = kw.pop("sms")
        monkeypatch.setattr(D, "_num_sms", lambda: sms)
    t, _ = _tc(np.random.default_rng(3), 256, 128, 64, True, group=group)
    y = T.int4_tc_matmul(jnp.ones((1, m, 256), jnp.float32), t, interpret=False, **kw)
    assert calls == ([(m, 256)] if want == "mgpu" else ["triton"])
    if want == "mgpu":  # (x's leading dims and dtype come back)
        assert y.shape == (1, m, 128) and y.dtype == jnp.float32


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 8, 9, 16])
@pytest.mark.parametrize("k,n,bn,zeros", SHAPES)
def test_gpu_equals_float64_and_the_reference_weights(m, k, n, bn, zeros):
    if not IM.on_hopper():
        pytest.skip("needs Hopper (sm_90)")
    rng = np.random.default_rng([m, k, n])
    t, w64 = _tc(rng, k, n, bn, zeros)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = IM.int4_mgpu_matmul(x, t)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    assert rel_err(y, x64 @ w64) < 1e-2
    w_ref = np.asarray(T.dequantize_tc_ref(t).astype(jnp.float32), np.float64)  # [K, N] bf16
    assert rel_err(y, x64 @ w_ref) < 4e-3  # (y rounded to bf16 once)
    assert rel_err(T.tc_linear(x, t), x64 @ w_ref) < 4e-3  # (the dispatch's auto route)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_tc_linear_runs_a_full_wave_on_mosaic(m):
    """The dispatch entry point on a weight of one 64-row tile per SM (a full wave): routed to
    the Mosaic kernel, inside a jitted function, equal to the reference bf16 weights."""
    if not IM.on_hopper():
        pytest.skip("needs Hopper (sm_90)")
    n = 64 * D._num_sms()
    rng = np.random.default_rng([m, n])
    t, w64 = _tc(rng, 512, n, 64, True)
    assert IM.usable(t, m)
    x = jnp.asarray(rng.standard_normal((m, 512)), jnp.bfloat16)
    assert "mosaic_gpu" in jax.jit(T.tc_linear).lower(x, t).as_text()
    y = jax.jit(T.tc_linear)(x, t)
    w_ref = np.asarray(T.dequantize_tc_ref(t).astype(jnp.float32), np.float64)
    assert y.shape == (m, n) and rel_err(y, np.asarray(x, np.float64) @ w_ref) < 4e-3


def test_chained_tiles_lower_for_cuda_and_refuse_odd_stages(monkeypatch):
    monkeypatch.setattr(D, "_num_sms", lambda: 2)  # (4 tiles: 2 per CTA)
    t = _abstract(_tc(np.random.default_rng(4), 1024, 256, 128, True)[0])
    x = jax.ShapeDtypeStruct((4, 1024), jnp.bfloat16)
    f = functools.partial(IM.int4_mgpu_matmul, chain=True)
    assert "mosaic_gpu" in jax.jit(f).trace(x, t).lower(lowering_platforms=("cuda",)).as_text()
    t5 = _tc(np.random.default_rng(5), 1280, 256, 128, True)[0]  # (5 stages of 256)
    with pytest.raises(ValueError, match=r"K stages \(5\) divisible by 2 or 4, got 4 tiles"):
        IM.int4_mgpu_matmul(jnp.ones((1, 1280), jnp.bfloat16), t5, chain=True)
    assert IM.chain_steps(8192) == 4 and IM.chain_steps(4096) == 4 and IM.chain_steps(1280) is None


def test_several_waves_stay_on_triton_unless_chained(monkeypatch):
    monkeypatch.setattr(IM, "on_hopper", lambda: True)
    monkeypatch.setattr(D, "_num_sms", lambda: 1)  # (2 tiles on 1 SM: 2 waves)
    t = _tc(np.random.default_rng(6), 1024, 128, 64, True)[0]
    assert not IM.usable(t, 1)
    monkeypatch.setattr(IM, "CHAIN_TILES", True)
    assert IM.usable(t, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_chained_tiles_equal_the_reference(m):
    """Written after the fourteenth session's device time ran out (not run yet): every CTA
    streams 2 tiles through one chained pipeline."""
    if not IM.on_hopper():
        pytest.skip("needs Hopper (sm_90)")
    n = 2 * 64 * D._num_sms()
    rng = np.random.default_rng([m, n, 2])
    t, _ = _tc(rng, 1024, n, 128, True)
    x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
    y = IM.int4_mgpu_matmul(x, t, chain=True)
    w_ref = np.asarray(T.dequantize_tc_ref(t).astype(jnp.float32), np.float64)
    assert y.shape == (m, n) and rel_err(y, np.asarray(x, np.float64) @ w_ref) < 4e-3
