"""The tensor-core int4 decode kernel (``kernels/int4_tc.py``): the exact bit layout, bit-exact
dequantization, the kernel (interpret mode; natively on a GPU) against float64 on ragged shapes,
both ``sum x`` modes, the dispatch entry point, the chained-dot primitive and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.kernels import driver as D
from shrinkjax.kernels import int4_tc as T
from shrinkjax.kernels import layouts as L
from shrinkjax.kernels import reference as R
from shrinkjax.kernels.triton_ext import dot_acc

from .test_kernels import check_tc_dispatch, check_tc_errors, make_int, rel_err

TOL = 1e-2


def _problem(rng, k, n, group, zeros, block_n=64):
    p, w64 = make_int(rng, k, n, 4, group, zeros)
    return p, T.pack_tc(p, block_n), w64


def test_word_layout_puts_each_code_at_its_documented_nibble():
    """K offset 16 j + 2 u + b of chunk t, row n -> tile n // bn, word 2 u + j // 4 of the
    chunk, bits 4 (j % 4) + 16 b (module docstring)."""
    k, n, bn = 256, 128, 64
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (k, n))
    t = T.pack_tc(L.pack_int(codes, np.ones((2, n), np.float32), bits=4, group=128), bn)
    words = np.asarray(t.words)
    assert words.shape == (n // bn, k // 128, bn, 16) and words.dtype == np.uint32
    for kk, nn in [(0, 0), (1, 0), (17, 5), (127, 63), (128 + 64 + 3, 64 + 7), (255, 127)]:
        c, off = divmod(kk, 128)
        j, rest = divmod(off, 16)
        u, b = divmod(rest, 2)
        word = words[nn // bn, c, nn % bn, 2 * u + j // 4]
        assert (int(word) >> (4 * (j % 4) + 16 * b)) & 0xF == codes[kk, nn]


def test_decode_gives_128_plus_code_per_slab():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (128, 64))
    t = T.pack_tc(L.pack_int(codes, np.ones((1, 64), np.float32), bits=4, group=128), 64)
    tiles = T._decode_jnp(t.words[0, 0])
    for j, tile in enumerate(tiles):  # slab j holds K rows 16 j .. 16 j + 15, rows = N
        np.testing.assert_array_equal(
            np.asarray(tile, np.float32), 128 + codes[16 * j : 16 * j + 16].T
        )


@pytest.mark.parametrize(
    "k,n,group,zeros",
    [(256, 128, 128, True), (300, 200, 32, False), (520, 130, 64, True), (1000, 256, 256, True)],
)
def test_dequantize_is_bit_exact(k, n, group, zeros):
    rng = np.random.default_rng([k, n])
    p, t, _ = _problem(rng, k, n, group, zeros)
    want = np.asarray(R.dequantize(p)).view(np.uint16)
    np.testing.assert_array_equal(np.asarray(R.dequantize(t)).view(np.uint16), want)
    w = np.asarray(T.dequantize_tc(t, interpret=True))  # the prefill path's Pallas kernel
    np.testing.assert_array_equal(w[:k, :n].view(np.uint16), want)
    assert not w[k:].astype(np.float32).any()  # padded K rows are exactly zero


@pytest.mark.parametrize("xsum", ["none", "xla", "sum", "mma"])
@pytest.mark.parametrize(
    "k,n,group,zeros,m,split",
    [
        (256, 128, 128, False, 1, 1),
        (300, 200, 128, True, 3, 1),  # ragged K, N
        (256, 384, 32, False, 16, 2),  # 4 groups per chunk, split K
        (520, 130, 64, True, 17, 1),  # 32-wide token side
        (1024, 256, 256, True, 40, 4),  # a group spans 2 chunks
    ],
)
def test_kernel_equals_float64_and_reference(xsum, k, n, group, zeros, m, split):
    rng = np.random.default_rng([k, n, m])
    p, t, w64 = _problem(rng, k, n, group, zeros)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = T.int4_tc_matmul(x, t, split_k=split, xsum=xsum, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    r64 = np.asarray(x.astype(jnp.float32), np.float64) @ w64
    assert rel_err(y, r64) < TOL
    y32 = T._tc_2d(x, t, split_k=split, num_warps=4, num_stages=1, xsum=xsum, interpret=True)
    assert rel_err(y32, r64) < 1e-5  # f32 result: exact codes, scales applied in f32
    assert rel_err(y, np.asarray(R.matmul_ref(x, p).astype(jnp.float32), np.float64)) < TOL


@pytest.mark.parametrize("m", [3, 300])
def test_dispatch_routes_tc_weights(m):
    rng = np.random.default_rng(m)
    p, t, w64 = _problem(rng, 384, 128, 128, True)
    check_tc_dispatch(rng, p, t, w64, T.tc_linear, T.MAX_M, m)


def test_dot_acc_accumulates():
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.standard_normal((64, 16)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((16, 16)), jnp.bfloat16)
    acc = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    want = np.asarray(acc, np.float64) + np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    for f in (dot_acc, jax.jit(dot_acc)):
        np.testing.assert_allclose(np.asarray(f(a, b, acc)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dot_acc shapes"):
        dot_acc(a, b, acc[:, :8])


def test_clear_errors():
    rng = np.random.default_rng(6)
    p8 = L.pack_int(rng.integers(0, 256, (128, 128)), np.ones((1, 128)), bits=8, group=128)
    with pytest.raises(ValueError, match="bits=4 and a group size"):
        T.pack_tc(p8)
    p96 = L.pack_int(rng.integers(0, 16, (192, 128)), np.ones((2, 128)), bits=4, group=96)
    assert not T.supports(p96)
    with pytest.raises(ValueError, match="group=96"):
        T.pack_tc(p96)
    p, t, _ = _problem(rng, 256, 128, 128, False)
    check_tc_errors(T.pack_tc, p, T.int4_tc_matmul, t)
    with pytest.raises(ValueError, match="xsum"):
        T.int4_tc_matmul(jnp.ones((1, 256), jnp.bfloat16), t, xsum="host", interpret=True)
    with pytest.raises(ValueError, match='xsum="none" needs num_warps >= 4'):
        T.int4_tc_matmul(jnp.ones((1, 256), jnp.bfloat16), t, xsum="none", num_warps=2)


@pytest.mark.gpu
@pytest.mark.parametrize("xsum", ["none", "xla", "sum", "mma"])
@pytest.mark.parametrize("m", [1, 8, 12, 16, 32, 64, 600])
@pytest.mark.parametrize("k,n,group", [(1024, 768, 128), (1088, 760, 64)], ids=["even", "ragged"])
def test_gpu_native_matches_float64(xsum, m, k, n, group):
    """Real Triton lowering (inline-PTX decode, chained wgmma) on the GPU; M = 600 runs the
    Pallas dequantize + cuBLAS path, bit-exact against the reference weights."""
    rng = np.random.default_rng([m, k])
    p, t, w64 = _problem(rng, k, n, group, True, block_n=128 if n % 128 == 0 else 64)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = T.tc_linear(x, t, xsum=xsum) if m <= T.MAX_M else T.tc_linear(x, t)
    assert rel_err(y, np.asarray(x, np.float64) @ w64) < TOL
    if m > T.MAX_M:
        w = np.asarray(T.dequantize_tc(t))[:k, :n]
        np.testing.assert_array_equal(
            w.view(np.uint16), np.asarray(R.dequantize(p)).view(np.uint16)
        )


@pytest.mark.gpu
@pytest.mark.parametrize("warps", [2, 4], ids=["mma_sync", "wgmma"])
@pytest.mark.parametrize("rows", [64, 128])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_gpu_warps_and_rows(warps, rows, m):
    """Both MMA paths Triton picks on Hopper (2 warps: mma.sync; 4: wgmma), programs over a
    whole 128-row packed tile or half of it, at the split-K of either M regime, against
    float64 on a K that is not a multiple of 128."""
    rng = np.random.default_rng([warps, rows, m])
    p, t, w64 = _problem(rng, 1088, 768, 64, True, block_n=128)
    x = jnp.asarray(rng.standard_normal((m, 1088)), jnp.bfloat16)
    y = T.int4_tc_matmul(x, t, num_warps=warps, rows=rows)
    assert rel_err(y, np.asarray(x, np.float64) @ w64) < TOL


@pytest.mark.parametrize("split", [1, 3])
def test_half_tile_programs_match_whole_tile(split):
    """rows=64 on a 128-row packing reads each program's half of every chunk block: the same
    product as whole-tile programs (interpret mode, ragged N), and a clear error otherwise."""
    rng = np.random.default_rng(11 + split)
    p, t, w64 = _problem(rng, 384, 200, 128, True, block_n=128)
    x = jnp.asarray(rng.standard_normal((3, 384)), jnp.bfloat16)
    kw = dict(split_k=split, num_warps=4, num_stages=1, interpret=True)
    half = T._tc_2d(x, t, rows=64, **kw)
    whole = T._tc_2d(x, t, rows=None, **kw)
    np.testing.assert_allclose(np.asarray(half), np.asarray(whole), rtol=1e-6, atol=1e-6)
    assert rel_err(half, np.asarray(x, np.float64) @ w64) < TOL
    with pytest.raises(ValueError, match="rows 96 must be a multiple of 64 dividing"):
        T._tc_2d(x, t, rows=96, **kw)


@pytest.mark.parametrize(
    "k,n,m,want,stages",
    [(8192, 8192, 1, 8, 3), (4096, 28672, 1, 2, 3), (14336, 4096, 1, 16, 3)]
    + [(4096, 6144, 4, 8, 3), (4096, 4096, 1, 16, 2), (8192, 8192, 16, 8, 3)]
    + [(4096, 4096, 16, 8, 3), (8192, 8192, 8, 8, 3)],  # M = 8: the few-token tiles
)
def test_default_split_is_the_measured_rule(monkeypatch, k, n, m, want, stages):
    """128-row packing on an H100's 132 SMs: the rows and splits that won at M = 1 on the five
    Llama-3-8B shapes (64-row programs, probe_int4_warps.json) and at M = 16 (whole tiles, two
    programs per SM, >= 4 chunks each; probe_int4_m16.json)."""
    monkeypatch.setattr(D, "_num_sms", lambda: 132)
    words = jax.ShapeDtypeStruct((n // 128, k // T.CHUNK, 128, 16), jnp.uint32)
    t = T.TcInt4(words, None, None, k=k, n=n, group=128, block_n=128)
    assert T.default_rows(t, m) == (64 if m <= T.FEW_TOKENS else 128)
    assert T.default_split(t, m) == want
    assert T.default_stages(t, want) == stages  # 2 where a program runs 2 chunks
    short = k // T.CHUNK <= 2 * want  # programs of at most 2 chunks
    assert T.default_stages(t, want, "sum", m) == (3 if m == 1 and not short else 2)
    assert T.default_warps(m) == (2 if m <= T.FEW_TOKENS else 4)  # mma.sync / wgmma
    assert T.default_warps(m, "none") == 4
    assert T.default_warps(m, "mma") == 2  # batch 9-32: mma.sync with the ones-tile sums
    assert T.default_xsum(m) == ("mma" if T.FEW_TOKENS < m <= T.MID_TOKENS else "xla")


def test_opaque_input_sums_x_in_the_kernel():
    """Inside ``dispatch.opaque_input`` the default ``sum_k x`` moves into the kernel
    (``OPAQUE_XSUM``) for up to ``FEW_TOKENS`` rows; the product is the same. At 9-32 rows the
    tensor core sums x either way, above that XLA does."""
    from shrinkjax.kernels import dispatch

    rng = np.random.default_rng(21)
    p, t, w64 = _problem(rng, 256, 128, 128, True)
    x = jnp.asarray(rng.standard_normal((2, 256)), jnp.bfloat16)

    def plain(x):
        return T.int4_tc_matmul(x, t, interpret=True)

    def opaque(x):
        with dispatch.opaque_input():
            return T.int4_tc_matmul(x, t, interpret=True)

    assert "int4_tc_xla" in str(jax.make_jaxpr(plain)(x))
    assert "int4_tc_sum" in str(jax.make_jaxpr(opaque)(x))
    x16 = jnp.tile(x, (8, 1))  # 9-32 rows: sums on the tensor core, opaque or not
    assert "int4_tc_mma" in str(jax.make_jaxpr(opaque)(x16))
    assert "int4_tc_mma" in str(jax.make_jaxpr(plain)(x16))
    x34 = jnp.tile(x, (17, 1))  # above MID_TOKENS (32): XLA's, opaque or not (wgmma)
    assert "int4_tc_xla" in str(jax.make_jaxpr(opaque)(x34))
    assert not dispatch.input_is_opaque()
    np.testing.assert_allclose(
        np.asarray(opaque(x), np.float32), np.asarray(plain(x), np.float32), rtol=2e-2, atol=2e-2
    )
    assert rel_err(opaque(x), np.asarray(x, np.float64) @ w64) < TOL
