"""Packed-weight matmul kernels: exact bit layouts, errors, and kernel == reference == float64.

Kernels run in Pallas interpret mode on CPU (small shapes; explicit small blocks exercise
several programs, split-K, ragged M/K/N and masked row stores).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from shrinkjax.kernels import dequant, dispatch, driver
from shrinkjax.kernels import layouts as L
from shrinkjax.kernels import reference as R
from shrinkjax.kernels.fp4_matmul import (
    e2m1_to_bf16_scaled,
    e4m3_scale_row,
    e8m0_scale_row,
    fp4_matmul,
    mxfp4_matmul,
    nvfp4_matmul,
)
from shrinkjax.kernels.int_matmul import int_matmul
from shrinkjax.kernels.sparse_matmul import sparse24_matmul

TOL = 1e-2


def rel_err(y, ref64) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    return float(np.linalg.norm(y - ref64) / np.linalg.norm(ref64))


def bf16_exact(a) -> np.ndarray:
    """float64 copy of ``a`` rounded to bf16 (so float64 math sees the stored values)."""
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)


def rand_x(rng, m, k, dtype=jnp.bfloat16):
    return jnp.asarray(rng.standard_normal((m, k)), dtype)


def x64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def check(y, x, w64, ref, *, tol=TOL):
    """Kernel output vs float64 math and vs the jnp reference."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    r64 = x64(x) @ w64
    assert np.linalg.norm(r64) > 0
    e_math, e_ref = rel_err(y, r64), rel_err(y, x64(ref))
    assert e_math < tol, e_math
    assert e_ref < tol, e_ref
    assert rel_err(ref, r64) < tol


def check_tc_dispatch(rng, p, t, w64, linear, max_m, m):
    """A tensor-core layout ``t`` (packed from ``p``) through ``dispatch.linear`` (the CPU
    reference path: equal to ``p``'s reference) and its entry point ``linear`` on every path
    that applies at ``m`` rows, with leading axes kept."""
    from shrinkjax.kernels import dispatch

    k, n = t.k, t.n
    x = jnp.asarray(rng.standard_normal((2, m, k)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(dispatch.linear(x, t)), np.asarray(R.matmul_ref(x, p)))
    for path in ("fused", "dequant_dot") if m <= max_m else ("auto",):
        y = linear(x, t, path=path, interpret=True)
        assert y.shape == (2, m, n)
        assert rel_err(y.reshape(-1, n), x64(x).reshape(-1, k) @ w64) < TOL


def check_tc_errors(pack, p, matmul, t):
    """The errors every tensor-core layout shares: a program tile that does not divide N
    (``pack(p, 96)``), more than 128 rows of x, a split not dividing the K steps, a wrong K."""
    with pytest.raises(ValueError, match="block_n 96"):
        pack(p, 96)
    x = jnp.ones((129, t.k), jnp.bfloat16)
    with pytest.raises(ValueError, match="M <= 128"):
        matmul(x, t, interpret=True)
    with pytest.raises(ValueError, match="split_k 3"):
        matmul(x[:1], t, split_k=3, interpret=True)
    with pytest.raises(ValueError, match="x has K=100"):
        matmul(jnp.ones((1, 100), jnp.bfloat16), t, interpret=True)


# ------------------------------------------------------------------------------------------
# random problem builders (plain arrays -> packed, float64 dequantized W)
# ------------------------------------------------------------------------------------------


def make_int(rng, k, n, bits, group, asym):
    """Random int weight; K need not be a multiple of the group (the last group is short)."""
    g = -(-k // group)
    codes = rng.integers(0, 2**bits, (k, n))
    scales = bf16_exact(rng.uniform(0.2, 1.0, (g, n)) / 2 ** (bits - 1))
    zeros = rng.integers(0, 2**bits, (g, n)) if asym else None
    p = L.pack_int(codes, scales, zeros, bits=bits, group=group)
    z = zeros if asym else np.full((g, n), 2 ** (bits - 1))
    w64 = (codes - np.repeat(z, group, 0)[:k]) * np.repeat(scales, group, 0)[:k]
    return p, w64


def make_mxfp4(rng, k, n):
    codes = rng.integers(0, 16, (k, n))
    e = rng.integers(120, 134, (k // 32, n)).astype(np.uint8)
    p = L.pack_mxfp4(codes, e)
    w64 = L.E2M1_VALUES[codes].astype(np.float64) * np.repeat(2.0 ** (e - 127.0), 32, 0)
    return p, w64


def make_nvfp4(rng, k, n, ts=0.37):
    codes = rng.integers(0, 16, (k, n))
    s = rng.uniform(0.01, 3.0, (k // 16, n)).astype(ml_dtypes.float8_e4m3fn)
    p = L.pack_nvfp4(codes, s, ts)
    w64 = (
        L.E2M1_VALUES[codes].astype(np.float64)
        * np.repeat(s.astype(np.float64), 16, 0)
        * float(np.float32(ts))
    )
    return p, w64


def mask_24(rng, k, n, min_keep=0):
    return L.random_mask_24(rng, k, n, min_keep)


def make_24(rng, k, n):
    keep = mask_24(rng, k, n)
    dense = np.where(keep, bf16_exact(rng.standard_normal((k, n))), 0.0)
    return L.pack_24(dense), dense


def make_24_int4(rng, k, n, group, asym):
    keep = mask_24(rng, k, n)
    codes = rng.integers(0, 16, (k, n))
    scales = bf16_exact(rng.uniform(0.05, 0.2, (k // group, n)))
    zeros = rng.integers(0, 16, (k // group, n)) if asym else None
    p = L.pack_24_int4(codes, scales, zeros, group=group, keep_KxN=keep)
    z = zeros if asym else np.full((k // group, n), 8)
    w = (codes - np.repeat(z, group, 0)) * np.repeat(scales, group, 0)
    return p, np.where(keep, w, 0.0)


# ------------------------------------------------------------------------------------------
# exact bit layouts (hand-worked)
# ------------------------------------------------------------------------------------------


def test_split_half_nibble_order_hand_worked():
    # D = 2: rows k0..k3 -> byte0 = k0 | k2 << 4, byte1 = k1 | k3 << 4.
    codes = np.array([[1], [2], [3], [4], [5], [6], [7], [8]], np.uint8)
    packed = L.pack_nibbles_split_half(codes, pair=2)
    assert packed[:, 0].tolist() == [0x31, 0x42, 0x75, 0x86]
    np.testing.assert_array_equal(L.unpack_nibbles_split_half(packed, 2), codes)


def test_pack_int4_bit_layout():
    k, n, g = 32, 3, 16  # group 16 -> pair D = 16, chunk = 32
    codes = np.zeros((k, n), np.int64)
    codes[3, 0], codes[19, 0] = 5, 10  # same byte: row 3 low nibble, row 3 + 16 high
    codes[31, 2] = 15
    p = L.pack_int(codes, np.ones((k // g, n)), None, bits=4, group=g)
    assert p.pair == 16 and p.qweight.dtype == jnp.uint8
    assert p.qweight.shape == (16, 128) and p.scales.shape == (2, 128) and p.zeros is None
    q = np.asarray(p.qweight)
    assert q[3, 0] == 0xA5 and q[15, 2] == 0xF0
    assert np.count_nonzero(q) == 2
    # group 128 -> D = 64: rows r and r + 64 of each 128-row chunk share a byte
    codes = np.zeros((256, 1), np.int64)
    codes[130, 0], codes[194, 0] = 7, 9
    p = L.pack_int(codes, np.ones((2, 1)), np.full((2, 1), 3), bits=4, group=128)
    q = np.asarray(p.qweight)
    assert p.pair == 64 and q.shape == (128, 128) and q[66, 0] == 0x97
    assert np.asarray(p.zeros)[:, 0].tolist() == [3, 3]


def test_pack_int8_is_plain_bytes():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (64, 5))
    p = L.pack_int(codes, np.ones((1, 5)), np.zeros((1, 5)), bits=8, group=64)
    np.testing.assert_array_equal(np.asarray(p.qweight)[:64, :5], codes)
    assert p.qweight.shape == (64, 128) and not np.asarray(p.qweight)[:, 5:].any()


def test_pack_fp4_bit_layout():
    codes = np.zeros((64, 1), np.int64)
    codes[0, 0], codes[32, 0] = 1, 15  # MXFP4 pairs rows r and r + 32
    e = np.full((2, 1), 127, np.uint8)
    e[1, 0] = 130
    p = L.pack_mxfp4(codes, e)
    assert np.asarray(p.codes)[0, 0] == 0xF1
    assert np.asarray(p.scales)[:, 0].tolist() == [127, 130]
    codes = np.zeros((32, 1), np.int64)
    codes[5, 0], codes[21, 0] = 6, 9  # NVFP4 pairs rows r and r + 16
    s = np.full((2, 1), 1.5, np.float32)
    p = L.pack_nvfp4(codes, s, 2.0)
    assert np.asarray(p.codes)[5, 0] == 0x96
    assert np.asarray(p.scales)[0, 0] == 0x3C  # e4m3: 0 0111 100 = 1.5
    assert float(p.tensor_scale) == 2.0


def test_pack_24_bit_layout():
    k, n = 256, 2
    w = np.zeros((k, n), np.float32)
    w[1, 0], w[3, 0] = 1.5, -2.0  # group 0 -> positions (1, 3): nibble 0b1101 = 13
    w[4, 0] = 3.0  # group 1 -> (0, lowest free 1): nibble 0 | 1 << 2 = 4
    w[130, 0], w[131, 0] = 0.25, 0.5  # group 32 -> (2, 3): nibble 14; pairs with group 0
    p = L.pack_24(w)
    meta, vals = np.asarray(p.meta), np.asarray(p.values.astype(jnp.float32))
    assert p.pair == 32 and meta.shape == (32, 128) and vals.shape == (2, 64, 128)
    assert meta[0, 0] == 0xED  # 13 | 14 << 4
    assert meta[1, 0] == 0x44  # group 1 (4) | group 33 (all zero -> 0, 1 -> 4) << 4
    assert meta[0, 1] == 0x44  # all-zero column
    assert vals[:, 0, 0].tolist() == [1.5, -2.0]
    assert vals[:, 1, 0].tolist() == [3.0, 0.0]
    assert vals[:, 32, 0].tolist() == [0.25, 0.5]
    np.testing.assert_array_equal(np.asarray(R.dequantize_24(p), np.float32), w)


def test_pack_24_int4_bit_layout():
    k, n, g = 128, 1, 128
    codes = np.full((k, n), 8)  # symmetric zero point 8 -> dequantizes to 0
    codes[0, 0], codes[2, 0] = 3, 12
    keep = np.zeros((k, n), bool)
    keep[0, 0] = keep[2, 0] = True
    p = L.pack_24_int4(codes, np.ones((1, 1)), None, group=g, keep_KxN=keep)
    assert p.pair == 32
    assert np.asarray(p.values)[0, 0] == 3 | 12 << 4
    assert np.asarray(p.meta)[0, 0] & 0xF == 0 | 2 << 2
    # unused slots of empty groups hold the zero point (8)
    assert np.asarray(p.values)[1, 0] == 0x88
    w = np.asarray(R.dequantize_24(p), np.float32)
    assert w[0, 0] == -5 and w[2, 0] == 4 and np.count_nonzero(w) == 2


def test_in_kernel_decoders_are_exact():
    codes = jnp.arange(16, dtype=jnp.uint8)
    v = np.asarray(e2m1_to_bf16_scaled(codes).astype(jnp.float32)) * 2.0**14
    np.testing.assert_array_equal(v, L.E2M1_VALUES)
    e = jnp.arange(L.MAX_E8M0 + 1, dtype=jnp.uint8)
    s = np.asarray(e8m0_scale_row(e).astype(jnp.float32), np.float64)
    np.testing.assert_array_equal(s, 2.0 ** (np.arange(L.MAX_E8M0 + 1) - 127.0 + 14))
    b = np.array([i for i in range(256) if i & 0x7F != 0x7F], np.uint8)
    got = np.asarray(e4m3_scale_row(jnp.asarray(b)).astype(jnp.float32), np.float64)
    want = b.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * 2.0**14
    np.testing.assert_array_equal(got, want)


def test_widened_bits_round_trip_exactly():
    """driver.widen_bits (loads carried a step ahead as uint32) and its decoders: every bf16 and
    f16 bit pattern comes back exactly (NaNs as the same bits), bytes zero-extended; int4_tc's
    zero point -(128 + z) through the f32 exponent is exact for every uint8."""
    from shrinkjax.kernels import int4_tc

    bits = jnp.arange(2**16, dtype=jnp.uint32).astype(jnp.uint16)
    bf = jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
    w = driver.widen_bits(bf)
    assert w.dtype == jnp.uint32 and int(w.max()) == 2**16 - 1
    back = jax.lax.bitcast_convert_type(driver.bf16_bits_to_f32(w), jnp.uint32) >> 16
    np.testing.assert_array_equal(np.asarray(back), np.arange(2**16))
    f16 = jax.lax.bitcast_convert_type(bits, jnp.float16)
    h = driver.f16_bits_to_f16(driver.widen_bits(f16))
    np.testing.assert_array_equal(np.asarray(h).view(np.uint16), np.arange(2**16, dtype=np.uint16))
    z = jnp.arange(256, dtype=jnp.uint32).astype(jnp.uint8)
    np.testing.assert_array_equal(np.asarray(driver.widen_bits(z)), np.arange(256))
    np.testing.assert_array_equal(np.asarray(int4_tc._neg_zero(z)), -(128.0 + np.arange(256)))
    with pytest.raises(ValueError, match="8/16/32-bit values, got float64"):
        driver.widen_bits(np.zeros(2, np.float64))


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def test_clear_errors():
    rng = np.random.default_rng(1)
    # a short last group is allowed (K=100 at g32: 4 groups), but the scales must cover it
    with pytest.raises(ValueError, match=r"scales must have shape \[ceil\(K/g\), N\] = \(4, 8\)"):
        L.pack_int(np.zeros((100, 8), int), np.ones((3, 8)), bits=4, group=32)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        L.pack_int(np.zeros((64, 8), int), np.ones((1, 8)), bits=3, group=64)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        L.pack_int(np.full((64, 8), 16), np.ones((1, 8)), bits=4, group=64)
    with pytest.raises(ValueError, match="multiple of 16"):
        L.pack_int(np.zeros((24, 8), int), np.ones((1, 8)), bits=4, group=24)
    with pytest.raises(ValueError, match="zeros must be integers"):
        L.pack_int(np.zeros((64, 8), int), np.ones((1, 8)), np.full((1, 8), 2.5), group=64)
    with pytest.raises(ValueError, match=r"scales must have shape"):
        L.pack_int(np.zeros((64, 8), int), np.ones((2, 8)), bits=4, group=64)
    with pytest.raises(ValueError, match=r"multiple of 32.*\(48, 8\)"):
        L.pack_mxfp4(np.zeros((48, 8), int), np.zeros((1, 8), np.uint8))
    with pytest.raises(ValueError, match="255 is NaN"):
        L.pack_mxfp4(np.zeros((32, 8), int), np.full((1, 8), 255, np.uint8))
    with pytest.raises(ValueError, match=r"multiple of 16.*\(40, 8\)"):
        L.pack_nvfp4(np.zeros((40, 8), int), np.ones((2, 8)))
    bad = np.ones((8, 2), np.float32)
    with pytest.raises(ValueError, match="not 2:4 sparse.*rows 0..3 of column 0"):
        L.pack_24(bad)
    with pytest.raises(ValueError, match="multiple of 64"):
        L.pack_24_int4(np.zeros((64, 8), int), np.ones((2, 8)), group=32)
    p, _ = make_int(rng, 64, 8, 4, 64, False)
    with pytest.raises(ValueError, match=r"x has K=32 .*weight has K=64"):
        int_matmul(jnp.ones((2, 32), jnp.bfloat16), p)
    with pytest.raises(ValueError, match="block_n"):
        int_matmul(jnp.ones((2, 64), jnp.bfloat16), p, block_n=48)
    with pytest.raises(TypeError):
        mxfp4_matmul(jnp.ones((2, 64), jnp.bfloat16), p)


# ------------------------------------------------------------------------------------------
# kernels == reference == float64 math (interpret mode)
# ------------------------------------------------------------------------------------------

BLOCKS = dict(block_m=16, block_n=64)


@pytest.mark.parametrize(
    "bits,group,asym,shape,kw",
    [
        (4, 128, True, (3, 256, 200), dict(block_n=64, split_k=2)),  # decode, split-K, ragged N
        (4, 32, False, (37, 96, 130), BLOCKS),  # ragged M (masked rows), K, N
        (4, 64, True, (1, 320, 64), dict(block_k=64)),  # K padded to the chunk lcm
        (8, 64, True, (5, 192, 72), dict(block_n=64, block_k=64, split_k=3)),
        (8, 128, False, (20, 256, 128), dict(block_m=16)),
    ],
)
def test_int_matmul(bits, group, asym, shape, kw):
    rng = np.random.default_rng(hash((bits, group, asym, shape)) % 2**32)
    m, k, n = shape
    p, w64 = make_int(rng, k, n, bits, group, asym)
    x = rand_x(rng, m, k)
    y = int_matmul(x, p, interpret=True, **kw)
    check(y, x, w64, R.int_matmul_ref(x, p))
    np.testing.assert_array_equal(np.asarray(R.dequantize_int(p), np.float64), bf16_exact(w64))


def test_int4_random_shapes():
    """Hypothesis-drawn ragged shapes (M, K = 32 * kg, N) with fresh random data."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=4, deadline=None, database=None, derandomize=True)
    @hyp.given(
        m=st.integers(1, 40),
        kg=st.integers(1, 5),
        n=st.integers(1, 150),
        seed=st.integers(0, 2**31 - 1),
    )
    def run(m, kg, n, seed):
        rng = np.random.default_rng(seed)
        p, w64 = make_int(rng, 32 * kg, n, 4, 32, True)
        x = rand_x(rng, m, 32 * kg)
        check(int_matmul(x, p, interpret=True, **BLOCKS), x, w64, R.int_matmul_ref(x, p))

    run()


@pytest.mark.parametrize("shape", [(1, 128, 96), (19, 160, 130)])
def test_mxfp4_matmul(shape):
    rng = np.random.default_rng(shape[0])
    m, k, n = shape
    p, w64 = make_mxfp4(rng, k, n)
    x = rand_x(rng, m, k)
    check(mxfp4_matmul(x, p, interpret=True, **BLOCKS), x, w64, R.mxfp4_matmul_ref(x, p))
    np.testing.assert_array_equal(np.asarray(R.dequantize_mxfp4(p), np.float64), w64)


@pytest.mark.parametrize("shape", [(2, 112, 64), (33, 64, 200)])
def test_nvfp4_matmul(shape):
    rng = np.random.default_rng(shape[0] + 7)
    m, k, n = shape
    p, w64 = make_nvfp4(rng, k, n)
    x = rand_x(rng, m, k)
    check(nvfp4_matmul(x, p, interpret=True, **BLOCKS), x, w64, R.nvfp4_matmul_ref(x, p))


@pytest.mark.parametrize("shape", [(1, 256, 64), (21, 130, 100)])
def test_sparse24_bf16_matmul(shape):
    rng = np.random.default_rng(shape[0] + 11)
    m, k, n = shape
    p, w64 = make_24(rng, k, n)
    x = rand_x(rng, m, k)
    check(sparse24_matmul(x, p, interpret=True, **BLOCKS), x, w64, R.sparse24_matmul_ref(x, p))
    np.testing.assert_array_equal(np.asarray(R.dequantize_24(p), np.float64), w64)


@pytest.mark.parametrize(
    "group,asym,shape", [(128, True, (3, 256, 72)), (64, False, (18, 192, 64))]
)
def test_sparse24_int4_matmul(group, asym, shape):
    rng = np.random.default_rng(group + shape[0])
    m, k, n = shape
    p, w64 = make_24_int4(rng, k, n, group, asym)
    x = rand_x(rng, m, k)
    y = sparse24_matmul(x, p, interpret=True, **BLOCKS)
    check(y, x, w64, R.sparse24_matmul_ref(x, p))
    np.testing.assert_array_equal(np.asarray(R.dequantize_24(p), np.float64), bf16_exact(w64))


@pytest.mark.parametrize("kind", ["int4", "int8", "mxfp4", "nvfp4", "24", "24_int4"])
def test_fma_decode_path(kind):
    """The CUDA-core GEMV variant (fma=True, M <= 8) computes the same product."""
    rng = np.random.default_rng(len(kind))
    m, k, n = (3, 256, 72) if kind != "24" else (2, 250, 64)
    if kind in ("int4", "int8"):
        p, w64 = make_int(rng, k, n, 4 if kind == "int4" else 8, 128, True)
    elif kind == "mxfp4":
        p, w64 = make_mxfp4(rng, k, n)
    elif kind == "nvfp4":
        p, w64 = make_nvfp4(rng, k, n)
    elif kind == "24":
        p, w64 = make_24(rng, k, n)
    else:
        p, w64 = make_24_int4(rng, k, n, 128, False)
    x = rand_x(rng, m, k)
    fn = {"int4": int_matmul, "int8": int_matmul, "mxfp4": fp4_matmul, "nvfp4": fp4_matmul}
    y = fn.get(kind, sparse24_matmul)(x, p, interpret=True, fma=True, block_n=64)
    check(y, x, w64, R.matmul_ref(x, p))
    with pytest.raises(ValueError, match="M <= 8"):
        driver.config_for(p, 9, fma=True)


def test_default_configs_decode_and_prefill():
    """Default (auto-tuned) tiles: decode M=1 with split-K, prefill M=256 with 128x128 tiles."""
    big = 8192 * 8192 // 2
    cfg = driver.choose_config(1, 8192, 8192, 128, big)
    assert cfg.block_m == 16 and cfg.split_k > 1 and 8192 // cfg.block_n * cfg.split_k >= 264
    cfg = driver.choose_config(4096, 8192, 8192, 128, big)
    assert (cfg.block_m, cfg.block_n, cfg.split_k) == (128, 128, 1)
    rng = np.random.default_rng(5)
    p, w64 = make_int(rng, 512, 256, 4, 128, True)
    for m in (1, 256):
        x = rand_x(rng, m, 512)
        check(int_matmul(x, p), x, w64, R.int_matmul_ref(x, p))  # interpret picked on CPU


@pytest.mark.parametrize(
    "m,warps,want", [(1, 2, 8), (8, 2, 8), (9, 2, 16), (1, 4, 16), (16, 4, 16), (17, 4, 32)]
)
def test_mma_token_side_is_8_only_for_mma_sync(m, warps, want):
    """The tc decode kernels' MMA N: a power of two >= M; n8 tiles with 2 warps (mma.sync),
    16 with wgmma (4 warps), where N = 8 measured slower."""
    assert driver.mma_tokens(m, warps) == want


@pytest.mark.gpu
@pytest.mark.parametrize("kind,m", [("int4", 1), ("int4", 3), ("mxfp4", 3), ("nvfp4", 6),
                                    ("2:4_bf16", 1), ("2:4_int4", 5)])  # fmt: skip
def test_gpu_8_wide_mma_gives_the_16_wide_bits(monkeypatch, kind, m):
    """Padding x to 8 instead of 16 MMA columns (2 warps, mma.sync) changes no sum: every
    output bit is the same (the same K chain per output element)."""
    from shrinkjax.kernels import fp4_tc, int4_tc, sparse24_tc

    rng = np.random.default_rng([m, len(kind)])
    k, n = 1024, 384
    if kind == "int4":
        p, _ = make_int(rng, k, n, 4, 128, True)
        t, fn = int4_tc.pack_tc(p), int4_tc.int4_tc_matmul
    elif kind in ("mxfp4", "nvfp4"):
        p, _ = (make_mxfp4 if kind == "mxfp4" else make_nvfp4)(rng, k, n)
        t = fp4_tc.pack_fp4_tc(p)
        fn = functools.partial(fp4_tc.fp4_tc_matmul, scale_mode="late")
    else:
        p = make_24_int4(rng, k, n, 128, False)[0] if kind == "2:4_int4" else None
        if p is None:
            p = L.pack_24(np.where(mask_24(rng, k, n), rng.standard_normal((k, n)), 0.0))
        t, fn = sparse24_tc.pack_24_tc(p), sparse24_tc.tc24_matmul
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    ys = []
    for least in (16, 8):
        monkeypatch.setattr(driver, "MMA_SYNC_MIN_N", least)
        jax.clear_caches()  # (the kernels are jitted; the token side is read when traced)
        ys.append(np.asarray(fn(x, t, num_warps=2)).view(np.uint16))
    np.testing.assert_array_equal(ys[1], ys[0])


def test_leading_dims_f32_input_and_dispatch():
    rng = np.random.default_rng(9)
    p, w64 = make_mxfp4(rng, 64, 40)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    y = fp4_matmul(x, p, interpret=True, **BLOCKS)
    assert y.shape == (2, 3, 40) and y.dtype == jnp.float32
    xb = x.astype(jnp.bfloat16)
    r64 = x64(xb).reshape(6, 64) @ w64
    assert rel_err(y.reshape(6, 40), r64) < TOL
    # dispatch.linear: the reference on CPU, same answer
    for make in (
        lambda: make_int(rng, 128, 40, 4, 64, True),
        lambda: make_nvfp4(rng, 64, 40),
        lambda: make_24(rng, 64, 40),
    ):
        pk, w = make()
        xx = rand_x(rng, 4, w.shape[0])
        y = dispatch.linear(xx, pk)
        assert y.shape == (4, 40)
        assert rel_err(y, x64(xx) @ w) < TOL


def test_jit_and_pytree():
    rng = np.random.default_rng(3)
    p, w64 = make_int(rng, 128, 64, 8, 128, False)
    x = rand_x(rng, 4, 128)
    f = jax.jit(lambda x, p: int_matmul(x, p, interpret=True, **BLOCKS))
    check(f(x, p), x, w64, R.int_matmul_ref(x, p))
    leaves = jax.tree_util.tree_leaves(p)
    assert len(leaves) == 2  # qweight, scales (zeros=None)
    assert L.packed_nbytes(p) == 128 * 128 + 128 * 2


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int4", "int8", "mxfp4", "nvfp4", "24", "24_int4"])
@pytest.mark.parametrize(
    "m,kw",
    [
        (1, dict(fma=False)),
        (1, dict(fma=True)),
        (1, dict(late_scale=True)),
        (16, dict(block_n=256, split_k=2)),
        (300, dict(fma=False)),
        (600, dict(path="dequant_dot")),
    ],
)
@pytest.mark.parametrize("k,n,group", [(1024, 768, 128), (1088, 760, 64)], ids=["even", "ragged"])
def test_gpu_native_matches_reference(kind, m, kw, k, n, group):
    """Real Triton lowering on the GPU; the "ragged" shape has K, N off the 128/256 blocks
    (K = 17 chunks of 64: an explicit split_k=2 would be rejected, so it picks its own)."""
    if group != 128:
        kw = {key: v for key, v in kw.items() if key != "split_k"}
    native_case(kind, m, kw, k, n, group, interpret=False)


def native_case(kind, m, kw, k, n, group, interpret):
    rng = np.random.default_rng(0)
    if kind in ("int4", "int8"):
        p, w64 = make_int(rng, k, n, 4 if kind == "int4" else 8, group, True)
    elif kind == "mxfp4":
        p, w64 = make_mxfp4(rng, k, n)
    elif kind == "nvfp4":
        p, w64 = make_nvfp4(rng, k, n)
    elif kind == "24":
        p, w64 = make_24(rng, k, n)
    else:
        p, w64 = make_24_int4(rng, k, n, group, True)
    x = rand_x(rng, m, k)
    fn = {"int4": int_matmul, "int8": int_matmul, "mxfp4": fp4_matmul, "nvfp4": fp4_matmul}
    y = fn.get(kind, sparse24_matmul)(x, p, interpret=interpret, **kw)
    check(y, x, w64, R.matmul_ref(x, p))
    if kw.get("path") == "dequant_dot":  # the Pallas dequantize pass is bit-exact on GPU too
        w = np.asarray(dequant.dequantize(p, interpret=interpret)).view(np.uint16)
        np.testing.assert_array_equal(w, np.asarray(R.dequantize(p)).view(np.uint16))


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_mixed_matmul_forward_and_low_precision_gradients(out_dtype):
    """Dense bf16 linear: the forward equals the f32-accumulated dot; the gradients are the
    float64 reference's up to bf16 rounding, and the backward dots run in bf16 (no f32 dot
    in the gradient's jaxpr)."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(2, 5, 48)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(48, 40)) * 0.2, jnp.bfloat16)
    ct = rng.normal(size=(2, 5, 40))
    with dispatch.low_precision_backward():
        y = dispatch.dense_matmul(x, w, out_dtype)
    want = jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(out_dtype)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    assert y.dtype == jnp.dtype(out_dtype)

    def loss(x, w, on=True):
        with dispatch.low_precision_backward(on):
            y = dispatch.dense_matmul(x, w, out_dtype)
        return jnp.sum(y.astype(jnp.float32) * ct)

    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(dx, np.float64), ct @ w64.T, rtol=0.03, atol=0.05)
    dw_ref = x64.reshape(-1, 48).T @ ct.reshape(-1, 40)
    np.testing.assert_allclose(np.asarray(dw, np.float64), dw_ref, rtol=0.03, atol=0.1)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr
    bwd_dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(bwd_dots) == 2  # dx and dw, outside the forward's custom_vjp call
    assert all(v.aval.dtype == jnp.bfloat16 for e in bwd_dots for v in e.invars)
    # outside the context: plain autodiff, whose backward dots take the f32 cotangent
    plain = jax.make_jaxpr(jax.grad(lambda x, w: loss(x, w, False), argnums=(0, 1)))(x, w)
    dots = [e for e in plain.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert any(v.aval.dtype == jnp.float32 for e in dots for v in e.invars)
