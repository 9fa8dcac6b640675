"""``kernels/split_k.py``: the tensor-core decode kernels' K-split partials added by XLA or in
the kernel (last arriving program, atomic counters) give the same y, in interpret mode and on
a GPU (every call of a jitted loop checked: the counters must be back at 0 after each call)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.kernels import fp4_tc as F
from shrinkjax.kernels import int4_tc as T
from shrinkjax.kernels import sparse24_tc as S
from shrinkjax.kernels.split_k import SUM_MODES, split_k_call

from .test_kernels import make_24_int4, make_int, make_mxfp4, rel_err

KINDS = ("int4", "mxfp4", "2:4_int4")


def _problem(kind, rng, k, n):
    """(packed weight, matmul(x, t, **kw), float64 W [K, N]) of a kernel with a K split."""
    if kind == "int4":
        p, w64 = make_int(rng, k, n, 4, 128, True)
        return T.pack_tc(p, 64), T.int4_tc_matmul, w64
    if kind == "mxfp4":
        p, w64 = make_mxfp4(rng, k, n)
        return F.pack_fp4_tc(p, 64), F.fp4_tc_matmul, w64
    p, w64 = make_24_int4(rng, k, n, 128, False)
    return S.pack_24_tc(p, 64), S.tc24_matmul, w64


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,split", [(1, 2), (5, 4), (16, 2)])
def test_kernel_sum_equals_xla_sum(kind, m, split):
    """N = 200: four 64-column tiles with 56 padded columns; counters padded to a power of 2."""
    rng = np.random.default_rng([m, split])
    t, matmul, w64 = _problem(kind, rng, 1024, 200)
    x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
    ys = {s: matmul(x, t, split_k=split, split_sum=s, interpret=True) for s in SUM_MODES}
    r64 = np.asarray(x, np.float64) @ w64
    for y in ys.values():
        assert y.shape == (m, 200) and y.dtype == jnp.bfloat16
        assert rel_err(y, r64) < 1e-2
    # the same f32 partials, added in another order at most: bf16 results within one rounding
    a, b = (np.asarray(ys[s], np.float64) for s in SUM_MODES)
    assert np.max(np.abs(a - b)) <= 2**-7 * np.max(np.abs(a))


def test_clear_errors():
    with pytest.raises(ValueError, match="split_sum must be one of"):
        split_k_call(
            None, [], [], m=1, mp=16, bn=64, np_=128, split_k=2, out_dtype=jnp.bfloat16,
            split_sum="atomics", interpret=True, num_warps=4, num_stages=1, name="x",
        )  # fmt: skip
    with pytest.raises(ValueError, match="bn 64 must divide N = 96"):
        split_k_call(
            None, [], [], m=1, mp=16, bn=64, np_=96, split_k=2, out_dtype=jnp.bfloat16,
            split_sum="kernel", interpret=True, num_warps=4, num_stages=1, name="x",
        )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,split", [(1, 8), (4, 4), (16, 2)])
def test_gpu_kernel_sum_over_repeated_calls(kind, m, split):
    """Eight calls in one jitted loop, then the loop again: every y matches float64."""
    rng = np.random.default_rng([m, split, 7])
    k, n = 2048, 384
    t, matmul, w64 = _problem(kind, rng, k, n)
    xs = jnp.asarray(rng.standard_normal((8, m, k)), jnp.bfloat16)

    @jax.jit
    def loop(xs):
        return jax.lax.map(lambda x: matmul(x, t, split_k=split, split_sum="kernel"), xs)

    r64 = np.einsum("bmk,kn->bmn", np.asarray(xs, np.float64), w64)
    for i, y in enumerate(loop(xs)):
        assert rel_err(y, r64[i]) < 1e-2, i
    again = loop(xs[::-1])
    for i, y in enumerate(again):
        assert rel_err(y, r64[7 - i]) < 1e-2, i
