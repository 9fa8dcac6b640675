"""The tensor-core MXFP4/NVFP4 decode kernel (``kernels/fp4_tc.py``): the exact bit layout, the
exact f16 decode and scale factors (every E8M0 / E4M3 value), bit-exact dequantization, the
kernel in both scale modes (interpret mode; natively on a GPU) against float64 on ragged
shapes, dispatch, and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from shrinkjax.kernels import fp4_tc as F
from shrinkjax.kernels import layouts as L
from shrinkjax.kernels import reference as R

from .test_kernels import check_tc_dispatch, check_tc_errors, make_mxfp4, make_nvfp4, rel_err

TOL = 1e-2
FMTS = ["mxfp4", "nvfp4"]


def _problem(rng, fmt, k, n, block_n=64):
    p, w64 = (make_mxfp4 if fmt == "mxfp4" else make_nvfp4)(rng, k, n)
    return p, F.pack_fp4_tc(p, block_n), w64


def test_word_layout_puts_each_code_at_its_documented_bits():
    """K offset 16 j + 2 u + b of chunk t, row n -> tile n // bn, word 2 u + j // 4; pair
    i = j % 4 of half b: magnitude at bits 16 b + 9 - 3 i, sign at bit 16 b + 15 - i."""
    k, n, bn = 256, 128, 64
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (k, n))
    t = F.pack_fp4_tc(L.pack_mxfp4(codes, np.full((k // 32, n), 127, np.uint8)), bn)
    words = np.asarray(t.words)
    assert words.shape == (n // bn, k // 128, bn, 16) and words.dtype == np.uint32
    assert t.scales.shape == (n // bn, k // 32 // 8, bn, 8)  # eight groups per row, contiguous
    for kk, nn in [(0, 0), (1, 0), (17, 5), (127, 63), (128 + 64 + 3, 64 + 7), (255, 127)]:
        c, off = divmod(kk, 128)
        j, rest = divmod(off, 16)
        u, b = divmod(rest, 2)
        word = int(words[nn // bn, c, nn % bn, 2 * u + j // 4])
        mag_at, sign_at = F.word_bits(j % 4, b)
        assert (mag_at, sign_at) == (16 * b + 9 - 3 * (j % 4), 16 * b + 15 - j % 4)
        assert (word >> mag_at) & 7 | ((word >> sign_at) & 1) << 3 == codes[kk, nn]


def test_decode_gives_e2m1_times_2_pow_minus_14_per_slab():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (128, 64))
    t = F.pack_fp4_tc(L.pack_mxfp4(codes, np.full((4, 64), 127, np.uint8)), 64)
    tiles = F._decode_jnp(t.words[0, 0])
    for j, tile in enumerate(tiles):  # slab j holds K rows 16 j .. 16 j + 15, rows = N
        assert tile.dtype == jnp.float16
        want = L.E2M1_VALUES[codes[16 * j : 16 * j + 16].T] * 2.0**-14
        np.testing.assert_array_equal(np.asarray(tile, np.float64), want)


def test_scale_factors_are_exact_for_every_code():
    """E8M0 e -> 2**(e - 127 + 14) (e <= 240), E4M3 bits -> its value times 2**14 (all but
    NaN, subnormals and negatives included): the factors that undo the decode's 2**-14."""
    e = np.arange(241, dtype=np.uint8)
    got = np.asarray(F.scale_f32(jnp.asarray(e), 32), np.float64)
    np.testing.assert_array_equal(got, 2.0 ** (e.astype(np.float64) - 113))
    b = np.array([v for v in range(256) if v & 0x7F != 0x7F], np.uint8)
    got = np.asarray(F.scale_f32(jnp.asarray(b), 16), np.float64)
    want = b.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * 2.0**14
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m,mc", [(1, 1), (3, 4)])
def test_group_columns_spreads_x_by_scale_group(m, mc):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((m, 512)), jnp.float16)
    for group in (16, 32):
        xg = np.asarray(F.group_columns(x, group, mc), np.float32)
        assert xg.shape == (512, 8 * mc)
        for k in (0, 15, 16, 100, 511):
            cols = [8 * t + (k // group) % 8 for t in range(m)]  # token t's column of row k
            np.testing.assert_array_equal(xg[k, cols], np.asarray(x[:, k], np.float32))
            assert not np.delete(xg[k], cols).any()  # other groups and padded tokens: zero


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("k,n", [(256, 128), (320, 200), (1056, 130)])
def test_dequantize_is_bit_exact(fmt, k, n):
    rng = np.random.default_rng([k, n])
    p, t, _ = _problem(rng, fmt, k, n)
    want = np.asarray(R.dequantize(p)).view(np.uint16)
    np.testing.assert_array_equal(np.asarray(R.dequantize(t)).view(np.uint16), want)
    w = np.asarray(F.dequantize_fp4_tc(t, interpret=True))  # the prefill path's Pallas kernel
    np.testing.assert_array_equal(w[:k, :n].view(np.uint16), want)
    assert not w[k:].astype(np.float32).any()  # padded K rows are exactly zero


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(
    "k,n,m,split,mode",
    [
        (256, 128, 1, 1, "auto"),  # "columns"
        (320, 200, 1, 1, "late"),  # ragged K, N
        (992, 200, 1, 2, "columns"),  # ragged, split K
        (320, 200, 3, 1, "auto"),  # "late"
        (320, 200, 3, 1, "columns"),  # 4 tokens' columns (one padded), ragged K and N
        (1024, 256, 8, 2, "columns"),  # 64-wide MMA, split K
        (512, 384, 16, 2, "late"),  # split K
        (544, 130, 17, 1, "late"),  # 32-wide token side
        (1024, 256, 40, 4, "auto"),
    ],
)
def test_kernel_equals_float64_and_reference(fmt, k, n, m, split, mode):
    rng = np.random.default_rng([k, n, m])
    p, t, w64 = _problem(rng, fmt, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = F.fp4_tc_matmul(x, t, split_k=split, scale_mode=mode, interpret=True)
    # x converted (and, in "columns" mode, spread by group) in the kernel: the same y
    y_in = F.fp4_tc_matmul(x, t, split_k=split, scale_mode=mode, x_in="kernel", interpret=True)
    np.testing.assert_array_equal(np.asarray(y_in), np.asarray(y))
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    r64 = np.asarray(x.astype(jnp.float32), np.float64) @ w64
    assert rel_err(y, r64) < TOL
    y32 = F._fp4_tc_2d(
        x, t, split_k=split, num_warps=4, num_stages=1, scale_mode=mode, interpret=True
    )
    assert rel_err(y32, r64) < 1e-5  # f32 result: exact f16 weights and x, f32 accumulation
    assert rel_err(y, np.asarray(R.matmul_ref(x, p).astype(jnp.float32), np.float64)) < TOL
    if mode == "columns":  # x slabs loaded at use instead of a step ahead: the same sums
        y2 = F._fp4_tc_2d(
            x, t, split_k=split, num_warps=4, num_stages=1, scale_mode=mode, x_prefetch=False,
            interpret=True,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(y2), np.asarray(y32))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m", [3, 300])
def test_dispatch_routes_tc_weights(fmt, m):
    rng = np.random.default_rng(m)
    p, t, w64 = _problem(rng, fmt, 384, 128)
    check_tc_dispatch(rng, p, t, w64, F.fp4_tc_linear, F.MAX_M, m)


@pytest.mark.parametrize("fmt", FMTS)
def test_opaque_input_converts_x_in_the_kernel(fmt):
    """Inside ``dispatch.opaque_input`` "late" mode at M <= OPAQUE_MAX_M and "columns" mode at
    M = 1 take bf16 x and convert (and spread) it in the kernel: no f16 copy of x by XLA.
    "columns" above M = 1, larger M and calls outside keep XLA's; same product."""
    from shrinkjax.kernels import dispatch

    rng = np.random.default_rng(22)
    _, t, w64 = _problem(rng, fmt, 256, 128)

    def run(x, opaque, mode="auto"):
        with dispatch.opaque_input(opaque):
            return F.fp4_tc_matmul(x, t, scale_mode=mode, interpret=True)

    def converts_x(x, opaque, mode="auto"):  # an f16 copy of x [M, K] made outside the kernel
        return f"f16[{len(x)},256] = convert_element_type" in str(
            jax.make_jaxpr(lambda x: run(x, opaque, mode))(x)
        )

    x16 = jnp.asarray(rng.standard_normal((16, 256)), jnp.bfloat16)  # "late"
    x1, x2 = x16[:1], x16[:2]  # "columns"
    x17 = jnp.asarray(rng.standard_normal((F.OPAQUE_MAX_M + 1, 256)), jnp.bfloat16)
    assert not converts_x(x16, True) and converts_x(x16, False) and converts_x(x17, True)
    assert not converts_x(x1, True, "columns") and converts_x(x1, False, "columns")
    assert converts_x(x2, True, "columns")
    assert not dispatch.input_is_opaque()
    for x in (x16, x1):
        np.testing.assert_array_equal(np.asarray(run(x, True)), np.asarray(run(x, False)))
        assert rel_err(run(x, True), np.asarray(x, np.float64) @ w64) < TOL
    with pytest.raises(ValueError, match="x_in must be one of"):
        F.fp4_tc_matmul(x1, t, x_in="strided", interpret=True)


def test_clear_errors():
    rng = np.random.default_rng(6)
    p8 = L.pack_int(rng.integers(0, 256, (128, 128)), np.ones((1, 128)), bits=8, group=128)
    with pytest.raises(TypeError, match="PackedMXFP4 or PackedNVFP4, got PackedInt"):
        F.pack_fp4_tc(p8)
    p, t, _ = _problem(rng, "nvfp4", 256, 128)
    check_tc_errors(F.pack_fp4_tc, p, F.fp4_tc_matmul, t)
    x = jnp.ones((9, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="scale_mode must be one of"):
        F.fp4_tc_matmul(x[:1], t, scale_mode="early", interpret=True)
    with pytest.raises(ValueError, match="'columns' takes at most 8 rows of x"):
        F.fp4_tc_matmul(x, t, scale_mode="columns", interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(
    "m,mode",
    [
        (1, "columns"),
        (4, "columns"),
        (8, "columns"),
        (1, "late"),
        (16, "late"),
        (64, "late"),
        (600, "auto"),
    ],
)
@pytest.mark.parametrize("k,n", [(1024, 768), (992, 760)], ids=["even", "ragged"])
def test_gpu_native_matches_float64(fmt, m, mode, k, n):
    """Real Triton lowering (inline-PTX decode, f16 subnormals through wgmma, the 8-wide MMA of
    "columns") on the GPU; M = 600 runs the Pallas dequantize + cuBLAS path, bit-exact weights."""
    rng = np.random.default_rng([m, k])
    p, t, w64 = _problem(rng, fmt, k, n, block_n=128 if n % 128 == 0 else 64)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    if m <= F.MAX_M:
        y = F.fp4_tc_linear(x, t, scale_mode=mode)
        y32 = F._fp4_tc_2d(
            x, t, split_k=2, num_warps=4, num_stages=3, scale_mode=mode, interpret=False
        )
        assert rel_err(y32, np.asarray(x.astype(jnp.float32), np.float64) @ w64) < 1e-5
        for warps in (2, 4):  # both MMA paths, both sources of x: the same sums
            kw = dict(split_k=2, num_warps=warps, num_stages=3, scale_mode=mode)
            for x_in in F.X_IN_MODES:
                y_in = F._fp4_tc_2d(x, t, x_in=x_in, interpret=False, **kw)
                np.testing.assert_allclose(np.asarray(y_in), np.asarray(y32), rtol=1e-6, atol=1e-6)
    else:
        y = F.fp4_tc_linear(x, t)
        w = np.asarray(F.dequantize_fp4_tc(t))[:k, :n]
        np.testing.assert_array_equal(
            w.view(np.uint16), np.asarray(R.dequantize(p)).view(np.uint16)
        )
    assert rel_err(y, np.asarray(x, np.float64) @ w64) < TOL


def test_late_mode_takes_two_warps_up_to_16_rows():
    """ "late" mode: 2 warps (mma.sync) up to LATE_FEW_TOKENS rows, 4 (wgmma) above and in
    "columns" mode (the H100 probe's winners)."""
    assert F.default_warps(False, 3) == F.default_warps(False, 16) == 2
    assert F.default_warps(False, 17) == F.default_warps(True, 1) == F.default_warps(True, 4) == 4


def test_nvfp4_late_mode_doubles_the_split_with_2_stages_up_to_8_rows(monkeypatch):
    """The ninth session's probe (8-wide mma.sync tile): NVFP4 "late" at M <= 8 runs twice the
    K splits with 2 stages; M = 16 and MXFP4 keep the rule (8192²: 8 splits, 3 stages)."""
    from shrinkjax.kernels import driver as D

    monkeypatch.setattr(D, "_num_sms", lambda: 132)
    words = jax.ShapeDtypeStruct((64, 64, 128, 16), jnp.uint32)  # 8192², 128-row tiles
    for fmt, m, split, stages in [("nvfp4", 4, 16, 2), ("nvfp4", 8, 16, 2), ("nvfp4", 16, 8, 3),
                                  ("mxfp4", 4, 8, 3)]:  # fmt: skip
        t = F.TcFP4(words, None, None, k=8192, n=8192, fmt=fmt, block_n=128)
        assert (F.default_split(t, False, m), F.default_stages(t, False, m)) == (split, stages)


def test_resolve_tiles_gives_the_defaults_and_keeps_given_values(monkeypatch):
    """What fp4_tc_matmul runs (and the benchmarks record): "auto" resolved, each default from
    its rule, x read in place only inside dispatch.opaque_input, given values kept."""
    from shrinkjax.kernels import dispatch
    from shrinkjax.kernels import driver as D

    monkeypatch.setattr(D, "_num_sms", lambda: 132)
    words = jax.ShapeDtypeStruct((64, 64, 128, 16), jnp.uint32)  # 8192², 128-row tiles
    t = F.TcFP4(words, None, None, k=8192, n=8192, fmt="nvfp4", block_n=128)
    want = dict(split_k=16, num_warps=2, num_stages=2, scale_mode="late", x_in="xla")
    assert F.resolve_tiles(t, 4) == want
    with dispatch.opaque_input():
        assert F.resolve_tiles(t, 4)["x_in"] == "kernel"
        assert F.resolve_tiles(t, 1) == dict(
            split_k=8, num_warps=4, num_stages=3, scale_mode="columns", x_in="kernel"
        )
    given = F.resolve_tiles(t, 4, scale_mode="columns", split_k=2, num_warps=4, x_in="xla")
    assert given == dict(split_k=2, num_warps=4, num_stages=3, scale_mode="columns", x_in="xla")


def test_auto_scale_mode_and_split_follow_the_probe():
    """ "auto" runs "columns" up to M = 1 (MXFP4) / 2 (NVFP4), "late" above; "columns" takes
    half the K splits from M = 3 on (registers allow two programs per SM there)."""
    rng = np.random.default_rng(8)
    for fmt, last in (("mxfp4", 1), ("nvfp4", 2)):
        assert F.use_columns("auto", last, fmt) and not F.use_columns("auto", last + 1, fmt)
        assert F.use_columns("columns", 8, fmt) and not F.use_columns("late", 1, fmt)
        _, t, _ = _problem(rng, fmt, 8192, 1024)
        full = F.default_split(t, True, 1)
        assert full > 1 and F.default_split(t, True, 2) == full
        assert F.default_split(t, True, 4) == full // 2
