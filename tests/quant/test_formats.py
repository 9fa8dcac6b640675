"""Formats: hand-worked bit layouts, error bounds against exact oracles, GPTQ primitives."""

from statistics import NormalDist

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shrinkjax.quant import formats
from shrinkjax.quant.array import QuantSpec, unpack
from shrinkjax.quant.formats.fp8 import E4M3, E5M2, decode_fp8, encode_fp8
from shrinkjax.quant.formats.mx import E2M1_VALUES, e2m1_decode, e2m1_encode, e8m0_decode
from shrinkjax.quant.formats.nf4 import NF4_VALUES, nf4_encode

# Every new (spec, shape) costs an XLA compile (~0.3 s on CPU): few examples, few fixed shapes
# (values vary per example; the shapes cover single and ragged columns, 1 and several groups).
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)  # same examples in CI
KS = st.sampled_from([64, 256])
NS = st.sampled_from([1, 40])
SEEDS = st.integers(0, 2**31 - 1)
MAGS = st.sampled_from([1e-3, 0.02, 1.0, 300.0])


def _weights(k, n, seed, mag, outliers=True):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * mag
    if outliers:
        idx = rng.integers(0, k * n, max(1, k * n // 200))
        w.flat[idx] *= 20
    return w.astype(np.float32)


def _expand(a, k):
    """[g, Nc] group parameters -> per-element [K, Nc] (rows of a group repeated)."""
    a = np.asarray(a)
    return np.repeat(a, k // a.shape[0], axis=0)


# --- registry ---------------------------------------------------------------------------------


def test_registry_lists_known_names_on_unknown():
    expected = {"int2", "int3", "int4", "int8", "fp8_e4m3", "fp8_e5m2", "nf4", "mxfp4", "nvfp4"}
    assert set(formats.names()) == expected
    with pytest.raises(KeyError, match=r"unknown quantization format 'int5'.*'int4'.*'nvfp4'"):
        formats.get("int5")
    with pytest.raises(KeyError, match="known formats"):
        formats.make(QuantSpec("fp6"))


def test_make_resolves_defaults_and_caches():
    f = formats.make(QuantSpec("int4"))
    assert f.spec == QuantSpec("int4", 128, "group", True, False, "float16")
    assert formats.make(QuantSpec("int4")) is f
    assert formats.make(f.spec) is f  # the resolved spec maps to the same object
    assert formats.get("int4", group_size=128) == f and hash(formats.get("int4")) == hash(f)
    assert formats.get("nf4").spec.group_size == 64
    assert formats.get("mxfp4").spec.group_size == 32
    assert formats.get("nvfp4").spec.group_size == 16
    assert formats.get("fp8_e4m3").spec.granularity == "channel"
    assert formats.get("int8", granularity="channel").group_rows(96) == 96


@pytest.mark.parametrize(
    "name, opts, msg",
    [
        ("mxfp4", dict(group_size=64), "fixes group_size=32"),
        ("nvfp4", dict(granularity="channel"), "granularity 'channel' unsupported"),
        ("fp8_e4m3", dict(symmetric=False), "only supported by int-k"),
        ("int4", dict(double_quant=True), "only supported by nf4"),
        ("int4", dict(granularity="channel", group_size=32), "only applies to granularity"),
        ("nf4", dict(double_quant=True, scale_dtype="float16"), "conflicts"),
        ("mxfp4", dict(scale_dtype="float16"), "fixed by the format"),
    ],
)
def test_bad_options_fail_loudly(name, opts, msg):
    with pytest.raises(ValueError, match=msg):
        formats.get(name, **opts)


def test_bad_shapes_name_the_shape():
    # int-k take a short last group (below); formats without ragged groups still refuse
    with pytest.raises(ValueError, match=r"\(100, 8\).*K=100 is not divisible by group_size=32"):
        formats.get("nf4", group_size=32).quantize(jnp.zeros((100, 8)))
    with pytest.raises(ValueError, match=r"\(100, 8\).*K=100 is not divisible by group_size=32"):
        formats.get("fp8_e4m3", granularity="group", group_size=32).quantize(jnp.zeros((100, 8)))
    with pytest.raises(ValueError, match=r"\(572, 8\).*K=572 is not a multiple of 8"):
        formats.get("int3", group_size=128).quantize(jnp.zeros((572, 8)))  # packing unit stays
    with pytest.raises(ValueError, match=r"\(12, 3\).*K=12 is not a multiple of 8"):
        formats.get("int3", granularity="channel").quantize(jnp.zeros((12, 3)))
    with pytest.raises(ValueError, match=r"2-D \[K, N\], got shape \(8,\)"):
        formats.get("int8").quantize(jnp.zeros((8,)))
    with pytest.raises(ValueError, match="needs qparams for 2 groups of 32 rows, got 1"):
        f = formats.get("int4", group_size=32)
        f.from_groups(jnp.zeros((64, 4)), f.fit(jnp.zeros((32, 4))))


# --- hand-worked bit layouts ------------------------------------------------------------------


def test_e2m1_codes_of_known_values():
    v = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -6, 7, 1e9, -1e9, -0.1]
    want = [0, 1, 2, 3, 4, 5, 6, 7, 0x9, 0xA, 0xB, 0xF, 7, 7, 0xF, 0]
    np.testing.assert_array_equal(e2m1_encode(jnp.array(v, jnp.float32)), want)
    # ties go to the even code: 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2, 2.5->2, 3.5->4, 5->4
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    np.testing.assert_array_equal(e2m1_encode(jnp.array(ties)), [0, 2, 2, 4, 4, 6, 6])
    np.testing.assert_array_equal(e2m1_decode(jnp.arange(16)), np.r_[E2M1_VALUES, -E2M1_VALUES])


def test_e4m3_e5m2_scale_bytes():
    x = jnp.array([1.0, -2.0, 448.0, 2.0**-6, 2.0**-9, 0.0, 1e4, -1e4, 0.3])
    np.testing.assert_array_equal(
        encode_fp8(x, E4M3), [0x38, 0xC0, 0x7E, 0x08, 0x01, 0x00, 0x7E, 0xFE, 0x2A]
    )  # 0.3 = 1.2 * 2**-2 -> 1.25 * 2**-2: exp field 5, mantissa 2 -> 0x2A
    np.testing.assert_array_equal(
        encode_fp8(jnp.array([1.0, 57344.0, 1e9]), E5M2), [0x3C, 0x7B, 0x7B]
    )
    # every finite code decodes like the ml_dtypes bit pattern and re-encodes to itself
    for fmt, dt in ((E4M3, ml_dtypes.float8_e4m3fn), (E5M2, ml_dtypes.float8_e5m2)):
        codes = np.arange(256, dtype=np.uint8)
        ref = codes.view(dt).astype(np.float32)
        finite = np.isfinite(ref) & (codes != 0x80)
        np.testing.assert_array_equal(np.asarray(decode_fp8(codes, fmt))[finite], ref[finite])
        np.testing.assert_array_equal(encode_fp8(jnp.asarray(ref[finite]), fmt), codes[finite])


def test_round_up_mode_is_ceiling_on_the_e4m3_grid():
    x = np.array([0.3, -0.3, 1.0, 447.0, -447.0, 1e-4, -1e-4, 0.0], np.float32)
    up = np.asarray(decode_fp8(encode_fp8(jnp.asarray(x), E4M3, mode="up"), E4M3))
    grid = np.unique(
        np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    )
    grid = grid[np.isfinite(grid)]
    want = np.array([grid[grid >= v].min() for v in x])
    np.testing.assert_array_equal(up, want)


def test_e8m0_scale_bytes_in_mxfp4():
    # one 32-row block per column; block amax 0.75, 6, 1, 8, 0, 2**-130, 2**100
    amax = np.array([0.75, 6.0, 1.0, 8.0, 0.0, 2.0**-130, 2.0**100], np.float32)
    w = np.zeros((32, amax.size), np.float32)
    w[5] = -amax
    q = formats.get("mxfp4").quantize(jnp.asarray(w))
    # floor(log2 amax) - 2 + 127 ; 0.75 -> scale 2**-3 -> 124 ; zero block -> 0 ; tiny clamps at 0
    np.testing.assert_array_equal(q.scales[0], [124, 127, 125, 128, 0, 0, 225])
    np.testing.assert_array_equal(e8m0_decode(jnp.array([124, 127, 254])), [2.0**-3, 1.0, 2.0**127])


def test_mxfp4_hand_worked_block():
    w = np.zeros((32, 1), np.float32)
    w[:4, 0] = np.array([1.0, -0.5, 6.0, 0.75]) * 2.0**-3  # amax 0.75 -> scale 2**-3
    q = formats.get("mxfp4").quantize(jnp.asarray(w))
    assert int(q.scales[0, 0]) == 124
    # element codes 1->0x2, -0.5->0x9, 6->0x7, 0.75->0x2 (tie to even); low nibble first
    np.testing.assert_array_equal(np.asarray(q.codes[:3, 0]), [0x92, 0x27, 0x00])


def test_nvfp4_hand_worked_scales():
    w = np.zeros((32, 2), np.float32)
    w[0, 0], w[16, 0], w[3, 1] = 6.0, 0.3, -1.5  # three blocks with data, one all-zero
    q = formats.get("nvfp4").quantize(jnp.asarray(w))
    s_t = np.float32(6.0) / np.float32(6 * 448)
    np.testing.assert_array_equal(q.scales2, [[s_t]])
    # block scales amax / (6 s_t) = 448 * amax / 6 in E4M3 (round to nearest):
    # 448 -> 0x7E ; 112 = 1.75 * 2**6 -> (6+7)<<3 | 6 = 0x6E ; 22.4 -> 22 = 1.375 * 2**4 -> 0x5B
    np.testing.assert_array_equal(q.scales, [[0x7E, 0x6E], [0x5B, 0x00]])
    d = np.asarray(q.dequantize())
    np.testing.assert_allclose([d[0, 0], d[3, 1]], [6.0, -1.5], rtol=1e-6)
    # 0.3 / (22 s_t) = 6.11 saturates to 6
    assert d[16, 0] == np.float32(6) * (np.float32(22) * s_t)
    assert not d[17:, 0].any() and not d[16:, 1].any()


def test_int4_hand_worked_codes_and_nibbles():
    w = jnp.array([[-7.0, 1.0], [7.0, -0.3]])  # per-channel symmetric: scales (1, 1/7)
    q = formats.get("int4", granularity="channel", scale_dtype="float32").quantize(w)
    np.testing.assert_array_equal(q.scales, [[1.0, np.float32(1.0) / 7]])
    # column 0 codes (-7+8, 7+8) = (1, 15) -> 0xF1 ; column 1 (7+8, round(-2.1)+8 = 6) -> 0x6F
    np.testing.assert_array_equal(q.codes, [[0xF1, 0x6F]])


def test_asym_range_is_widened_to_contain_zero():
    # all-positive column: lo = min(1, 0) = 0, hi = 4 -> scale 4/3, zero point 0;
    # 1, 2, 3, 4 -> round(0.75, 1.5, 2.25, 3) = 1, 2, 2, 3 -> 1 | 2<<2 | 2<<4 | 3<<6 = 0xE9
    w = jnp.array([[1.0], [2.0], [3.0], [4.0]])
    q = formats.get("int2", granularity="channel", symmetric=False, scale_dtype="float32").quantize(
        w
    )
    assert int(q.zeros[0, 0]) == 0 and float(q.scales[0, 0]) == np.float32(4.0) / 3
    np.testing.assert_array_equal(q.codes, [[0xE9]])
    qp = {"scales": q.scales, "zeros": q.zeros}
    assert float(formats.get("int2", granularity="channel", symmetric=False, scale_dtype="float32")
                 .fake_quant(jnp.zeros((1, 1)), qp)[0, 0]) == 0.0  # fmt: skip


def test_int3_asym_codes_roundtrip_through_dense_packing():
    w = jnp.asarray(np.arange(8, dtype=np.float32)[:, None] * 0.5)  # 0..3.5: scale 0.5, zero 0
    q = formats.get("int3", granularity="channel", symmetric=False).quantize(w)
    assert float(q.scales[0, 0]) == 0.5 and int(q.zeros[0, 0]) == 0
    np.testing.assert_array_equal(q.codes[:, 0], [0x88, 0xC6, 0xFA])
    np.testing.assert_array_equal(q.dequantize(), w)


def test_nf4_table_is_the_qlora_construction():
    nd, delta = NormalDist(), 0.9677083
    pos = [nd.inv_cdf(p) for p in np.linspace(delta, 0.5, 9)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(delta, 0.5, 8)[:-1]]
    v = np.sort(np.array(pos + neg + [0.0]))
    np.testing.assert_allclose(NF4_VALUES, v / v.max(), atol=1e-6)
    assert NF4_VALUES[7] == 0.0 and NF4_VALUES[0] == -1.0 and NF4_VALUES[15] == 1.0


def test_nf4_codes_of_known_values():
    v = jnp.array([-1.0, 0.0, 1.0, 0.08, -0.7, 0.5, 0.03, 0.04, 1.5, -3.0])
    # 0.5 < mid(0.4407, 0.5626) -> 12 ; 0.03 < 0.0398 -> 0 (code 7) ; 0.04 -> 0.0796 (code 8)
    np.testing.assert_array_equal(nf4_encode(v), [0, 7, 15, 8, 1, 12, 7, 8, 15, 0])


# --- error bounds (property tests against exact oracles) --------------------------------------


@SETTINGS
@given(k=KS, n=NS, seed=SEEDS, mag=MAGS, bits=st.sampled_from([2, 3, 4, 8]),
       sym=st.booleans(), gran=st.sampled_from(["tensor", "channel", "g32", "g64"]),
       sdt=st.sampled_from(["float16", "float32"]), positive=st.booleans())  # fmt: skip
def test_intk_error_at_most_half_a_step(k, n, seed, mag, bits, sym, gran, sdt, positive):
    opts = dict(granularity="group", group_size=int(gran[1:])) if gran[0] == "g" else {}
    opts = opts or dict(granularity=gran)
    f = formats.get(f"int{bits}", symmetric=sym, scale_dtype=sdt, **opts)
    w = _weights(k, n, seed, mag)
    w = np.abs(w) if positive else w  # one-signed groups: the asymmetric range must hold 0
    q = f.quantize(jnp.asarray(w))
    s = _expand(q.scales.astype(np.float32), k)
    err = np.abs(np.asarray(q.dequantize()) - w)
    assert np.all(err <= s / 2 * (1 + 1e-6) + 1e-30)
    # the scale is the tight one (rounded up by at most one storage ulp), not merely "big"
    wg = w.reshape(-1, f.group_rows(k), n)
    if gran == "tensor":
        wg = wg.reshape(1, -1, 1)
    lo, hi = np.minimum(wg.min(1), 0), np.maximum(wg.max(1), 0)
    ideal = np.abs(wg).max(1) / (2 ** (bits - 1) - 1) if sym else (hi - lo) / (2**bits - 1)
    rel = 2.0**-10 if sdt == "float16" else 2.0**-22
    np.testing.assert_array_less(np.asarray(q.scales, np.float32), ideal * (1 + rel) + 1e-7)
    assert np.all(np.asarray(q.scales, np.float32) >= ideal * (1 - 1e-6))
    codes = np.asarray(unpack(q.codes, bits, k))
    assert codes.max() < 2**bits
    if sym:
        assert codes.min() >= 1  # code 0 is unused by the symmetric grid
    else:
        z = np.asarray(q.zeros)
        assert z.max() < 2**bits
        # zero is exactly representable: w == 0 dequantizes to 0
        qp = {"scales": q.scales[:1], "zeros": q.zeros[:1]}
        assert not np.asarray(f.fake_quant(jnp.zeros((1, n)), qp)).any()


@SETTINGS
@given(k=KS, n=NS, seed=SEEDS, mag=MAGS, name=st.sampled_from(["fp8_e4m3", "fp8_e5m2"]),
       gran=st.sampled_from(["tensor", "channel"]))  # fmt: skip
def test_fp8_is_nearest_grid_point_within_half_ulp(k, n, seed, mag, name, gran):
    f = formats.get(name, granularity=gran)
    fmt, dt = (
        (E4M3, ml_dtypes.float8_e4m3fn) if name == "fp8_e4m3" else (E5M2, ml_dtypes.float8_e5m2)
    )
    w = _weights(k, n, seed, mag)
    q = f.quantize(jnp.asarray(w))
    s = np.asarray(q.scales)
    amax = np.abs(w).max(axis=0 if gran == "channel" else None, keepdims=True)
    np.testing.assert_allclose(s, amax / fmt.fmax, rtol=2**-22)  # XLA may divide via reciprocal
    v = w / s
    assert np.abs(v).max() <= fmt.fmax
    codes, want = np.asarray(q.codes), v.astype(dt).view(np.uint8)  # RNE, as ml_dtypes
    off = codes != want
    if off.any():  # XLA's w * (1/s) may differ from w / s by an ulp: only at exact ties
        a, b = codes[off].view(dt).astype(np.float64), want[off].view(dt).astype(np.float64)
        vf = v[off].astype(np.float32)
        assert np.all(np.abs(vf - (a + b) / 2) <= 4 * np.spacing(np.abs(vf))), (vf, a, b)
        assert off.sum() <= max(1, off.size // 1000)
    got = np.asarray(q.dequantize()) / s
    e = np.maximum(np.floor(np.log2(np.maximum(np.abs(v), 1e-38))), fmt.emin)
    assert np.all(np.abs(got - v) <= 2.0 ** (e - fmt.mbits) / 2)


def _nearest_e2m1(v):
    """Brute-force oracle: nearest of the 15 values, ties to the even code, saturating."""
    grid = np.r_[-E2M1_VALUES[::-1], E2M1_VALUES[1:]]  # ascending, 15 values
    codes = np.r_[np.arange(15, 8, -1), np.arange(0, 8)]  # their (canonical) codes
    d = np.abs(v[..., None] - grid)
    best = d == d.min(-1, keepdims=True)
    even = best & (codes % 2 == 0)
    pick = np.where(even.any(-1), even.argmax(-1), best.argmax(-1))
    return grid[pick]


@SETTINGS
@given(k=KS, n=NS, seed=SEEDS, mag=MAGS)
def test_mxfp4_matches_spec_oracle(k, n, seed, mag):
    w = _weights(k, n, seed, mag)
    q = formats.get("mxfp4").quantize(jnp.asarray(w))
    wb = w.reshape(k // 32, 32, n)
    amax = np.abs(wb).max(1)
    e = np.floor(np.log2(amax)).astype(np.int64) - 2  # OCP MX v1.0 §6.3
    np.testing.assert_array_equal(q.scales, e + 127)
    v = wb / 2.0 ** e[:, None]
    want = (_nearest_e2m1(v) * 2.0 ** e[:, None]).reshape(k, n)
    np.testing.assert_array_equal(q.dequantize(), want)
    assert np.abs(v).max() < 8  # saturation (6..8) is the only clipping


@SETTINGS
@given(k=KS, n=NS, seed=SEEDS, mag=MAGS)
def test_nvfp4_matches_oracle(k, n, seed, mag):
    w = _weights(k, n, seed, mag)
    q = formats.get("nvfp4").quantize(jnp.asarray(w))
    s_t = np.asarray(q.scales2)[0, 0]  # XLA may divide via a reciprocal: use the stored one
    np.testing.assert_allclose(s_t, np.abs(w).max() / np.float32(6 * 448), rtol=2**-22)
    wb = w.reshape(k // 16, 16, n)
    sb = (np.abs(wb).max(1) / (6 * s_t)).astype(np.float32)
    sb8 = sb.astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(q.scales, sb8.view(np.uint8))
    eff = sb8.astype(np.float32) * s_t
    v = np.where(eff[:, None] > 0, wb / np.where(eff > 0, eff, 1)[:, None], 0)
    want = (_nearest_e2m1(v) * eff[:, None]).reshape(k, n)
    np.testing.assert_allclose(q.dequantize(), want, rtol=1e-6, atol=0)


@SETTINGS
@given(k=KS, seed=SEEDS, mag=MAGS, dq=st.booleans())
def test_nf4_nearest_code_and_double_quant_scales(k, seed, mag, dq):
    n = 300  # two double-quant blocks, the second one ragged
    f = formats.get("nf4", double_quant=dq)
    w = _weights(k, n, seed, mag)
    q = f.quantize(jnp.asarray(w))
    absmax = np.abs(w.reshape(k // 64, 64, n)).max(1)
    if dq:
        nb = -(-n // 256)
        assert q.scales.dtype == jnp.uint8 and q.scales2.shape == q.zeros2.shape == (k // 64, nb)
        qp = {"scales": q.scales, "scales2": q.scales2, "zeros2": q.zeros2}
        eff = np.asarray(jax.jit(f._effective)(qp)[0])
        # rounded up: never below the true absmax, and at most one E4M3 step of the deviation
        assert np.all(eff >= absmax * (1 - 1e-6))
        s2 = np.repeat(np.asarray(q.scales2), 256, axis=1)[:, :n]
        dev = np.abs(absmax - np.repeat(np.asarray(q.zeros2), 256, axis=1)[:, :n])
        assert np.all(eff - absmax <= np.maximum(dev / 8, s2 * 2.0**-9) + absmax * 1e-6)
        np.testing.assert_allclose(np.asarray(q.zeros2)[:, 0], absmax[:, :256].mean(1), rtol=1e-5)
    else:
        np.testing.assert_array_equal(q.scales, absmax)
        eff = absmax
    v = w.reshape(k // 64, 64, n) / eff[:, None]
    want = np.abs(v[..., None] - NF4_VALUES).argmin(-1)
    codes = np.asarray(unpack(q.codes, 4, k)).reshape(want.shape)
    same = codes == want
    assert same.mean() > 0.999  # exact up to f32 ties at midpoints
    deq = np.asarray(q.dequantize()).reshape(want.shape)
    np.testing.assert_allclose(deq[same], (NF4_VALUES[want] * eff[:, None])[same], rtol=1e-6)
    half_gap = np.diff(NF4_VALUES).max() / 2  # 0.152, between -1 and -0.696
    assert np.all(np.abs(deq - w.reshape(want.shape)) <= eff[:, None] * half_gap * (1 + 1e-6))


# --- exact byte counts ------------------------------------------------------------------------

K, N = 128, 300  # N = 300: a ragged second NF4 double-quant block
BYTES = [
    (QuantSpec("int2", group_size=32, symmetric=False), K * N // 4 + (K // 32) * N * (2 + 1)),
    (QuantSpec("int3", group_size=64), K * N * 3 // 8 + (K // 64) * N * 2),
    (QuantSpec("int4"), K * N // 2 + (K // 128) * N * 2),
    (QuantSpec("int4", scale_dtype="float32", granularity="channel"), K * N // 2 + N * 4),
    (QuantSpec("int8", granularity="tensor", symmetric=False), K * N + 2 + 1),
    (QuantSpec("fp8_e4m3"), K * N + N * 4),
    (QuantSpec("fp8_e5m2", granularity="tensor"), K * N + 4),
    (QuantSpec("nf4"), K * N // 2 + (K // 64) * N * 4),
    (QuantSpec("nf4", double_quant=True), K * N // 2 + (K // 64) * N + (K // 64) * 2 * 8),
    (QuantSpec("mxfp4"), K * N // 2 + (K // 32) * N),
    (QuantSpec("nvfp4"), K * N // 2 + (K // 16) * N + 4),
]


@pytest.mark.parametrize("spec, nbytes", BYTES, ids=lambda s: getattr(s, "describe", str)())
def test_packed_bytes_exact(spec, nbytes):
    q = formats.make(spec).quantize(jnp.asarray(_weights(K, N, 0, 0.02)))
    assert q.nbytes == nbytes
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(q)) == nbytes


# --- ragged groups: K not a multiple of G (int-k; SmolLM2's K = 576 at g128 = 4 x 128 + 64) ---

RK, RG, RN = 576, 128, 40


def _ragged_weights(seed=3):
    w = _weights(RK, RN, seed, 0.02, outliers=False)
    w[512:] *= 0.05  # the short last group is much smaller: borrowing a neighbour's scale shows
    return w


def _ragged_expand(a, k=RK, g=RG):
    return np.repeat(np.asarray(a, np.float32), g, axis=0)[:k]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_ragged_last_group_roundtrip(bits, sym):
    f = formats.get(f"int{bits}", group_size=RG, symmetric=sym)
    w = _ragged_weights()
    q = f.quantize(jnp.asarray(w))
    assert q.scales.shape == (5, RN) and f.n_groups(RK) == 5
    assert sym or q.zeros.shape == (5, RN)
    # every group's qparams are those fitted on its own rows alone (the last one: rows 512..575)
    for i, (a, b) in enumerate([(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]):
        alone = f.fit(jnp.asarray(w[a:b]))
        assert alone["scales"].shape == (1, RN)
        for key, v in alone.items():
            np.testing.assert_array_equal(np.asarray(getattr(q, key))[i : i + 1], v, key)
    # ... and the tight scale of those rows (an independent numpy oracle)
    last = w[512:]
    lo, hi = np.minimum(last.min(0), 0), np.maximum(last.max(0), 0)
    ideal = np.abs(last).max(0) / (2 ** (bits - 1) - 1) if sym else (hi - lo) / (2**bits - 1)
    s_last = np.asarray(q.scales[-1], np.float32)
    assert np.all(s_last >= ideal * (1 - 1e-6)) and np.all(s_last <= ideal * (1 + 2**-10) + 1e-7)
    assert np.all(s_last < 0.2 * np.asarray(q.scales[-2], np.float32))  # not group 4's scale
    # per-element error <= half a step of the element's own group
    deq = np.asarray(q.dequantize())
    assert deq.shape == (RK, RN)
    err = np.abs(deq - w)
    assert np.all(err <= _ragged_expand(q.scales) / 2 * (1 + 1e-6) + 1e-30)
    codes = np.asarray(unpack(q.codes, bits, RK))
    assert codes.shape == (RK, RN) and q.codes.shape == (RK * bits // 8, RN)
    # fake_quant of the last group's rows with its qparams == the stored weight, bit for bit
    qp_last = {key: getattr(q, key)[-1:] for key in f.qparam_keys}
    np.testing.assert_array_equal(f.fake_quant(jnp.asarray(w[512:]), qp_last), deq[512:])
    np.testing.assert_array_equal(f.fake_quant(jnp.asarray(w[575:]), qp_last), deq[575:])


@pytest.mark.parametrize(
    "spec, nbytes",
    [
        (QuantSpec("int4", group_size=RG), 4 * RK * RN // 8 + 5 * RN * 2),
        (QuantSpec("int4", group_size=RG, symmetric=False), 4 * RK * RN // 8 + 5 * RN * (2 + 1)),
        (QuantSpec("int3", group_size=RG, symmetric=False), 3 * RK * RN // 8 + 5 * RN * (2 + 1)),
        (QuantSpec("int2", group_size=RG, scale_dtype="float32"), 2 * RK * RN // 8 + 5 * RN * 4),
        (QuantSpec("int8", group_size=RG, symmetric=False), RK * RN + 5 * RN * (2 + 1)),
        (QuantSpec("int4", group_size=100), 4 * RK * RN // 8 + 6 * RN * 2),  # 5 x 100 + 76
    ],
    ids=lambda s: getattr(s, "describe", str)(),
)
def test_ragged_packed_bytes_exact(spec, nbytes):
    q = formats.make(spec).quantize(jnp.asarray(_ragged_weights()))
    assert q.nbytes == nbytes
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(q)) == nbytes


RAGGED_GPTQ_SPECS = [
    QuantSpec("int4", group_size=RG, symmetric=False),
    QuantSpec("int3", group_size=RG),
]


@pytest.mark.parametrize("spec", RAGGED_GPTQ_SPECS, ids=lambda s: s.describe())
def test_ragged_rowwise_fake_quant_matches_from_groups_and_rtn(spec):
    """The GPTQ-primitive invariant with a short last group (fit on its 64 rows)."""
    f = formats.make(spec)
    w = jnp.asarray(_ragged_weights())
    g = f.group_rows(RK)
    qps = [f.fit(w[i : i + g]) for i in range(0, RK, g)]
    assert len(qps) == 5 and all(v.shape[0] == 1 for qp in qps for v in qp.values())
    q = f.from_groups(w, qps)
    deq = np.asarray(q.dequantize())
    fq = jax.jit(f.fake_quant)
    for row in (0, 127, 128, 511, 512, 540, 575):
        np.testing.assert_array_equal(fq(w[row : row + 1], qps[row // g]), deq[row : row + 1])
    np.testing.assert_array_equal(f.fake_quant(w, f.stack(qps)), deq)  # all groups at once
    jax.tree.map(np.testing.assert_array_equal, f.quantize(w), q)  # RTN == from_groups
    jax.tree.map(np.testing.assert_array_equal, f.fit(w), f.stack(qps))  # fit all at once
    with pytest.raises(ValueError, match="needs qparams for 5 groups of 128 rows, got 4"):
        f.from_groups(w, qps[:4])


# --- GPTQ primitives --------------------------------------------------------------------------

# one spec per distinct plumbing: zeros, dense int3, per-channel, per-tensor [1, 1], FP8 groups,
# NF4 double quant (second-level keys), E8M0 scales, NVFP4's shared tensor scale
GPTQ_SPECS = [
    QuantSpec("int2", group_size=32, symmetric=False),
    QuantSpec("int3", group_size=64),
    QuantSpec("int4", symmetric=False, granularity="channel"),
    QuantSpec("int8", granularity="tensor", symmetric=False),
    QuantSpec("fp8_e4m3", granularity="group", group_size=32),
    QuantSpec("fp8_e5m2", granularity="tensor"),
    QuantSpec("nf4", double_quant=True),
    QuantSpec("mxfp4"),
    QuantSpec("nvfp4"),
]


@pytest.mark.parametrize("spec", GPTQ_SPECS, ids=lambda s: s.describe())
def test_rowwise_fake_quant_matches_from_groups_and_rtn(spec):
    f = formats.make(spec)
    k, n = K, N
    w = jnp.asarray(_weights(k, n, 0, 0.02))  # the BYTES test's weight: shared compiles
    g = f.group_rows(k)
    amax = jnp.max(jnp.abs(w))
    qps = [f.fit(w[i : i + g], tensor_amax=amax) for i in range(0, k, g)]
    assert all(v.shape[0] == 1 for qp in qps for v in qp.values())
    q = f.from_groups(w, qps)
    deq = np.asarray(q.dequantize())
    fq = jax.jit(f.fake_quant)
    for row in (0, 1, g - 1, k // 2 + 3, k - 1):
        np.testing.assert_array_equal(fq(w[row : row + 1], qps[row // g]), deq[row : row + 1])
    np.testing.assert_array_equal(f.fake_quant(w, f.stack(qps)), deq)  # all groups at once
    # stacked (concatenated or jnp.stack-ed) qparams and RTN give the identical QuantizedArray
    for stacked in (f.stack(qps), jax.tree.map(lambda *a: jnp.stack(a), *qps)):
        q2 = f.from_groups(w, stacked)
        jax.tree.map(np.testing.assert_array_equal, q2, q)
    # RTN is exactly from_groups(w, fit(w)); fitting all groups at once agrees with fitting
    # them one by one (up to f32 reduction order, e.g. the NF4 double-quant block mean)
    whole = f.fit(w, tensor_amax=amax)
    jax.tree.map(np.testing.assert_array_equal, f.quantize(w), f.from_groups(w, whole))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), whole, f.stack(qps))
    assert np.abs(deq - np.asarray(w)).max() < 0.6 * float(amax)  # sanity: not garbage


def test_nvfp4_groups_must_share_the_tensor_scale():
    f = formats.get("nvfp4")
    w = jnp.asarray(_weights(32, 4, 2, 1.0))
    qps = [f.fit(w[:16]), f.fit(w[16:] * 3)]  # no tensor_amax: each group picks its own
    with pytest.raises(ValueError, match="per-tensor parameter but differs between groups"):
        f.from_groups(w, qps)
