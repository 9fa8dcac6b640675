"""The tensor-core 2:4 kernel (``kernels/sparse24_tc.py``), bf16 and int4 values: the exact
value, code and keep-bit layout, the position tiles against the dense weight, bit-exact
dequantization, the kernel (interpret mode; natively on a GPU) against float64 on ragged
shapes, dispatch, and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.kernels import driver as D
from shrinkjax.kernels import layouts as L
from shrinkjax.kernels import reference as R
from shrinkjax.kernels import sparse24_tc as S

from .test_kernels import check_tc_dispatch, check_tc_errors, make_24_int4, rel_err

TOL = 1e-2
KINDS = ["bf16", "int4"]


def _problem(rng, k, n, block_n=64, min_keep=1, kind="bf16", group=128):
    """(Packed24, Tc24, float64 W): int4 codes are symmetric (zero point 8), group ``group``."""
    if kind == "int4":
        p, w64 = make_24_int4(rng, k, n, group, asym=False)
        return p, S.pack_24_tc(p, block_n), w64
    keep = L.random_mask_24(rng, k, n, min_keep=min_keep)
    dense = np.where(keep, rng.standard_normal((k, n)), 0).astype(np.float32)
    p = L.pack_24(dense)
    w64 = np.asarray(jnp.asarray(dense, jnp.bfloat16), np.float64)  # values stored in bf16
    return p, S.pack_24_tc(p, block_n), w64


def test_layout_puts_pairs_and_keep_bits_where_documented():
    """Group g = 16 c + w of chunk c: value word w (a low, b high); its keep mask in uint16
    element w of the 256-row step, row p of chunk c % 4 at bit 15 - p - 4 (c % 4)."""
    rng = np.random.default_rng(0)
    k, n, bn = 512, 128, 64
    p, t, w64 = _problem(rng, k, n, bn, min_keep=2)
    assert t.values.shape == (n // bn, k // 64, bn, 16) and t.values.dtype == np.uint32
    assert t.keep.shape == (n // bn, k // 256, bn, 16) and t.keep.dtype == np.uint16
    vals, keep = np.asarray(t.values), np.asarray(t.keep)
    dense = np.asarray(jnp.asarray(w64, jnp.bfloat16)).view(np.uint16)
    for g, col in [(0, 0), (5, 3), (17, 64), (127, 127), (70, 100)]:
        c, w = divmod(g, 16)
        word = int(vals[col // bn, c, col % bn, w])
        kept = [
            r
            for r in range(4)
            if (int(keep[col // bn, c // 4, col % bn, w]) >> S.keep_bit(r, c % 4)) & 1
        ]
        assert len(kept) == 2 and kept == sorted(kept)
        rows = dense[4 * g : 4 * g + 4, col]
        assert word & 0xFFFF == rows[kept[0]] and word >> 16 == rows[kept[1]]
        assert not any(rows[r] for r in range(4) if r not in kept)


def test_int4_code_words_hold_each_group_where_documented():
    """Step S, chunk c = 2 e + c'', group 2 u + h of the chunk: word 2 u + e of the step, codes
    a at bits 16 h + 8 c'', b 4 bits above (a at the lower stored row)."""
    rng = np.random.default_rng(3)
    k, n, bn = 512, 128, 64
    p, t, _ = _problem(rng, k, n, bn, kind="int4")
    assert t.values.shape == (n // bn, k // 256, bn, 16) and t.scales.shape == (n // bn, 4, bn, 1)
    vals, nib = np.asarray(t.values), np.asarray(p.values)  # Packed24: slot0 | slot1 << 4
    for g, col in [(0, 0), (5, 3), (17, 64), (100, 127), (127, 70)]:
        step, r = divmod(g, 64)
        c, w = divmod(r, 16)
        u, h = divmod(w, 2)
        word = int(vals[col // bn, step, col % bn, 2 * u + c // 2])
        assert (word >> (16 * h + 8 * (c % 2))) & 0xFF == nib[g, col]


def test_position_tiles_are_the_dense_rows():
    """Tile p of chunk c, column w = dense row 64 c + 4 w + p (every keep pattern occurs)."""
    rng = np.random.default_rng(1)
    p, t, w64 = _problem(rng, 256, 64, 64)
    dense = np.asarray(jnp.asarray(w64, jnp.bfloat16), np.float32)
    for c in range(4):
        tiles = S._decode_jnp(t.values[0, c], t.keep[0, 0], c)
        for pos, tile in enumerate(tiles):
            want = dense[64 * c + pos : 64 * c + 64 : 4, :].T  # [bn, 16]
            np.testing.assert_array_equal(np.asarray(tile, np.float32), want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k,n", [(512, 128), (1024, 200), (256, 130)])
def test_dequantize_is_bit_exact(kind, k, n):
    rng = np.random.default_rng([k, n])
    p, t, _ = _problem(rng, k, n, kind=kind)
    want = np.asarray(R.dequantize(p)).view(np.uint16)
    np.testing.assert_array_equal(np.asarray(R.dequantize(t)).view(np.uint16), want)
    w = np.asarray(S.dequantize_24_tc(t, interpret=True))  # the prefill path's Pallas kernel
    np.testing.assert_array_equal(w[:k, :n].view(np.uint16), want)
    assert not w[k:].astype(np.float32).any()  # padded K rows are exactly zero


@pytest.mark.parametrize(
    "kind,group,k,n,m,split",
    [
        ("bf16", 0, 512, 128, 1, 1),
        ("bf16", 0, 1000, 200, 3, 2),  # ragged K, N
        ("bf16", 0, 768, 384, 16, 3),
        ("bf16", 0, 300, 130, 17, 1),  # 32-wide token side
        ("int4", 128, 512, 128, 1, 1),
        ("int4", 64, 1024, 200, 3, 2),  # four scale units per step
        ("int4", 512, 1024, 256, 17, 2),  # a unit spans two steps
    ],
)
@pytest.mark.parametrize("x_in", S.X_IN_MODES)
def test_kernel_equals_float64_and_reference(kind, group, k, n, m, split, x_in):
    """Both sources of x: XLA's by-position copy, or x read in place and split by position."""
    rng = np.random.default_rng([k, n, m])
    p, t, w64 = _problem(rng, k, n, kind=kind, group=group or 128)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = S.tc24_matmul(x, t, split_k=split, x_in=x_in, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    r64 = np.asarray(x, np.float64) @ w64
    assert rel_err(y, r64) < TOL
    kw = dict(split_k=split, num_warps=4, num_stages=1, x_in=x_in, interpret=True)
    y32 = S._tc24_2d(x, t, **kw)
    assert rel_err(y32, r64) < 1e-5  # exact weights (codes, scales in f32) and x, f32 sums
    assert rel_err(y, np.asarray(R.matmul_ref(x, p).astype(jnp.float32), np.float64)) < TOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [3, 300])
def test_dispatch_routes_tc24_weights(kind, m):
    rng = np.random.default_rng(m)
    p, t, w64 = _problem(rng, 512, 128, kind=kind)
    check_tc_dispatch(rng, p, t, w64, S.tc24_linear, S.MAX_M, m)


@pytest.mark.parametrize(
    "m,rows,warps,split,stages",
    [(1, 64, 2, 4, 2), (4, 64, 2, 4, 2), (16, 128, 4, 4, 3)],
)
def test_int4_value_defaults_are_the_measured_rule(monkeypatch, m, rows, warps, split, stages):
    """int4 values on the 128-row packing, an H100's 132 SMs, 8192²: up to INT4_FEW_TOKENS
    rows 64-row programs, 2 warps, twice the two-per-SM split and 2 stages (the probe's
    winners at M = 1 and 4); above, whole tiles, 4 warps, the base split, 3 stages."""
    monkeypatch.setattr(D, "_num_sms", lambda: 132)
    tiles, supers = 8192 // 128, 8192 // S.SUPER
    keep = jax.ShapeDtypeStruct((tiles, supers, 128, 16), jnp.uint16)
    t = S.Tc24(keep, keep, None, k=8192, n=8192, block_n=128, group=128)
    assert S.default_rows(t, m) == rows and S.default_warps(t, m) == warps
    assert S.default_split(t, m) == split and S.default_stages(t, m) == stages


def test_int4_values_with_x_in_place_take_the_few_token_tiles_up_to_m16(monkeypatch):
    """x read in place (x_in="kernel", M <= OPAQUE_MAX_M): the 64-row / 2-warp / doubled-split /
    2-stage tiles at M = 16 too (the probe's winner there); with XLA's x4, M = 16 keeps whole
    tiles and 4 warps."""
    monkeypatch.setattr(D, "_num_sms", lambda: 132)
    keep = jax.ShapeDtypeStruct((64, 32, 128, 16), jnp.uint16)
    t = S.Tc24(keep, keep, None, k=8192, n=8192, block_n=128, group=128)
    got = S.resolve_tiles(t, 16, x_in="kernel")
    assert got == dict(rows=64, split_k=4, num_warps=2, num_stages=2, x_in="kernel")
    assert S.resolve_tiles(t, 16, x_in="xla")["num_warps"] == 4


def test_bf16_value_defaults_do_not_depend_on_m():
    """bf16 values: whole tiles, 3 stages and the same split at every M; 2 warps (mma.sync) with
    x read in place, and with XLA's x4 at BF16_MMA_SYNC_ROWS (9-32) rows, else 4."""
    rng = np.random.default_rng(9)
    _, tb, _ = _problem(rng, 4096, 4096, block_n=64)
    for m in (1, 4, 16):
        assert S.default_rows(tb, m) == 64
        assert S.default_warps(tb, m) == (2 if m > 8 else 4)
        assert S.default_warps(tb, m, "kernel") == 2
        assert S.default_stages(tb, m) == 3 == S.default_stages(tb, m, "kernel")
    assert (
        S.default_split(tb, 1) == S.default_split(tb, 16) == S.default_split(tb, 16, x_in="kernel")
    )
    assert S.default_warps(tb, 32) == 2 and S.default_warps(tb, 33) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_opaque_input_reads_x_in_the_kernel(kind):
    """Inside ``dispatch.opaque_input`` at M <= OPAQUE_MAX_M the kernel reads x as given (no
    by-position copy); above it and outside, XLA's x4; same product."""
    from shrinkjax.kernels import dispatch

    rng = np.random.default_rng(21)
    p, t, w64 = _problem(rng, 512, 128, block_n=128, kind=kind)

    def opaque(x):
        with dispatch.opaque_input():
            return S.tc24_matmul(x, t, interpret=True)

    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.bfloat16)
    big = jnp.asarray(rng.standard_normal((S.OPAQUE_MAX_M + 1, 512)), jnp.bfloat16)
    x4 = f"bf16[4,{len(x)},128]"  # XLA's by-position copy of x: [4, M, K/4]
    assert x4 not in str(jax.make_jaxpr(opaque)(x))
    assert f"bf16[4,{len(big)},128]" in str(jax.make_jaxpr(opaque)(big))
    assert x4 in str(jax.make_jaxpr(lambda x: S.tc24_matmul(x, t, interpret=True))(x))
    assert not dispatch.input_is_opaque()
    assert rel_err(opaque(x), np.asarray(x, np.float64) @ w64) < TOL
    assert rel_err(opaque(big), np.asarray(big, np.float64) @ w64) < TOL
    with pytest.raises(ValueError, match="x_in must be one of"):
        S.tc24_matmul(x, t, x_in="strided", interpret=True)


@pytest.mark.parametrize("kind", KINDS)
def test_half_tile_programs_match_whole_tile(kind):
    """rows=64 on a 128-row packing (each program streams its half of every block): the same
    product as whole-tile programs, interpret mode, ragged N; a clear error for bad rows."""
    rng = np.random.default_rng(13)
    p, t, w64 = _problem(rng, 512, 200, block_n=128, kind=kind)
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.bfloat16)
    kw = dict(split_k=2, num_warps=4, num_stages=1, interpret=True)
    half = S._tc24_2d(x, t, rows=64, **kw)
    np.testing.assert_allclose(
        np.asarray(half), np.asarray(S._tc24_2d(x, t, **kw)), rtol=1e-6, atol=1e-6
    )
    assert rel_err(half, np.asarray(x, np.float64) @ w64) < TOL
    with pytest.raises(ValueError, match="rows 192 must be a multiple of 64 dividing"):
        S._tc24_2d(x, t, rows=192, **kw)


def test_clear_errors():
    rng = np.random.default_rng(6)
    codes = rng.integers(0, 16, (256, 128))
    keep = L.random_mask_24(rng, 256, 128)
    zeros = np.full((2, 128), 3)
    p4 = L.pack_24_int4(codes, np.ones((2, 128), np.float32), zeros, group=128, keep_KxN=keep)
    with pytest.raises(ValueError, match="symmetric int4 codes"):
        S.pack_24_tc(p4)
    c768 = rng.integers(0, 16, (768, 128))
    p384 = L.pack_24_int4(
        c768, np.ones((2, 128)), group=384, keep_KxN=L.random_mask_24(rng, 768, 128)
    )
    with pytest.raises(ValueError, match="group size dividing 256"):
        S.pack_24_tc(p384)
    with pytest.raises(TypeError, match="converts a Packed24"):
        S.pack_24_tc(L.pack_int(codes, np.ones((2, 128)), bits=4, group=128))
    p, t, _ = _problem(rng, 512, 128)
    check_tc_errors(S.pack_24_tc, p, S.tc24_matmul, t)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 16, 64, 600])
@pytest.mark.parametrize("k,n", [(1024, 768), (1024, 760)], ids=["even", "ragged"])
def test_gpu_native_matches_float64(kind, m, k, n):
    """Real Triton lowering (byte-permute expansion, chained wgmma); M = 600 runs the Pallas
    dequantize + cuBLAS path, bit-exact weights."""
    rng = np.random.default_rng([m, k])
    p, t, w64 = _problem(rng, k, n, block_n=128 if n % 128 == 0 else 64, kind=kind)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = S.tc24_linear(x, t)
    if m <= S.MAX_M:
        y32 = S._tc24_2d(x, t, split_k=2, num_warps=4, num_stages=3, interpret=False)
        assert rel_err(y32, np.asarray(x, np.float64) @ w64) < 1e-5
    else:
        w = np.asarray(S.dequantize_24_tc(t))[:k, :n]
        np.testing.assert_array_equal(
            w.view(np.uint16), np.asarray(R.dequantize(p)).view(np.uint16)
        )
    assert rel_err(y, np.asarray(x, np.float64) @ w64) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("warps", [2, 4], ids=["mma_sync", "wgmma"])
@pytest.mark.parametrize("rows", [64, 128])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("x_in", S.X_IN_MODES)
def test_gpu_warps_and_rows(kind, warps, rows, m, x_in):
    """Both MMA paths (2 warps: mma.sync; 4: wgmma) over whole 128-row tiles or halves, at the
    splits of either regime, both sources of x, against float64 on a K that is not a multiple
    of 256."""
    rng = np.random.default_rng([warps, rows, m])
    p, t, w64 = _problem(rng, 1152, 768, block_n=128, kind=kind)
    x = jnp.asarray(rng.standard_normal((m, 1152)), jnp.bfloat16)
    y = S.tc24_matmul(x, t, num_warps=warps, rows=rows, x_in=x_in)
    assert rel_err(y, np.asarray(x, np.float64) @ w64) < TOL
