"""The experimental word-decoding int4 GEMV (interpret mode): equal to float64 math and to the
reference on ragged shapes, early and late scaling, with and without zero points; errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.kernels import layouts as L
from shrinkjax.kernels import reference as R
from shrinkjax.kernels.int4_gemv import gemv_operands, int4_gemv

from .test_kernels import make_int, rel_err

TOL = 1e-2


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize(
    "k,n,group,zeros,m,tiles",
    [
        (256, 256, 128, False, 1, {}),
        (300, 200, 128, True, 3, dict(block_n=64, rows=16, split_k=3)),  # ragged K, N; split
        (384, 128, 192, False, 2, dict(rows=16)),  # a chunk straddles two groups
        (200, 130, 64, True, 4, dict(block_n=64, rows=32)),
    ],
)
def test_int4_gemv_equals_float64_and_reference(late, k, n, group, zeros, m, tiles):
    rng = np.random.default_rng([k, n, m])
    p, w64 = make_int(rng, k, n, 4, group, zeros)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = int4_gemv(x, p, interpret=True, late=late, **tiles)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    r64 = np.asarray(x.astype(jnp.float32), np.float64) @ w64
    assert rel_err(y, r64) < TOL
    ref = np.asarray(R.int_matmul_ref(x, p).astype(jnp.float32), np.float64)
    assert rel_err(y, ref) < TOL
    # cached operands give the same result; leading axes are kept
    y2 = int4_gemv(x[None], p, operands=gemv_operands(p), interpret=True, late=late, **tiles)
    np.testing.assert_array_equal(np.asarray(y2[0], np.float32), np.asarray(y, np.float32))


def test_int4_gemv_word_view_puts_byte_c_at_column_4i_plus_c():
    rng = np.random.default_rng(0)
    p, _ = make_int(rng, 128, 128, 4, 128, True)
    words, s, off = gemv_operands(p)
    q = np.asarray(p.qweight)
    w = np.asarray(words)
    for c in range(4):
        np.testing.assert_array_equal((w >> (8 * c)) & 0xFF, q[:, c::4])
    sc = np.asarray(p.scales, np.float32)
    np.testing.assert_array_equal(np.asarray(s)[2], sc[:, 2::4])
    z = np.asarray(p.zeros, np.float32)
    np.testing.assert_allclose(np.asarray(off)[1], -(z[:, 1::4] + 128) * sc[:, 1::4], rtol=1e-6)


def test_int4_gemv_errors():
    rng = np.random.default_rng(1)
    p, _ = make_int(rng, 128, 128, 4, 128, False)
    x = jnp.ones((5, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="M <= 4"):
        int4_gemv(x, p, interpret=True)
    with pytest.raises(ValueError, match="rows 48"):
        int4_gemv(x[:1], p, interpret=True, rows=48)
    with pytest.raises(ValueError, match="K=100"):
        int4_gemv(jnp.ones((1, 100), jnp.bfloat16), p, interpret=True)
    p8 = L.pack_int(rng.integers(0, 256, (128, 128)), np.ones((1, 128)), bits=8)
    with pytest.raises(ValueError, match="4-bit"):
        int4_gemv(x[:1], p8, interpret=True)
