"""``kernels/split_k.py``: the decode kernels' shared output path: one program per K part, the
f32 partials added by XLA or by the last program of a column tile (arrival counters), the
output dtype kept where the kernel writes y. Interpret mode, and on a GPU every call of a jitted
loop checked, with the packed weight's counters back at 0 after the calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from shrinkjax.kernels import fp4_tc as F
from shrinkjax.kernels import int4_tc as T
from shrinkjax.kernels import sparse24_tc as S
from shrinkjax.kernels import split_k as SK
from shrinkjax.kernels.split_k import new_locks, split_k_call

from .test_kernels import make_24, make_24_int4, make_int, make_mxfp4, make_nvfp4, rel_err

KINDS = ("int4", "mxfp4", "nvfp4", "2:4_bf16", "2:4_int4")


def _run(a, split_k, m, mp=16, bn=64, split_sum="xla", locks=None):
    """y = column sums of ``a`` [K, N] for the first m tokens, K split ``split_k`` ways."""
    k, n = a.shape

    def body(a_ref):  # this program's K part, broadcast over the mp token rows
        part = jnp.sum(a_ref[...].astype(jnp.float32), axis=0, keepdims=True)
        return jnp.broadcast_to(part, (mp, bn))

    spec = pl.BlockSpec((k // split_k, bn), lambda j, s: (s, j))
    return split_k_call(
        body, [a], [spec], m=m, mp=mp, bn=bn, np_=n, split_k=split_k, out_dtype=jnp.bfloat16,
        interpret=True, num_warps=4, num_stages=1, name="t", split_sum=split_sum, locks=locks,
    )  # fmt: skip


@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_partials_add_up_and_padding_tokens_are_dropped(split_k):
    rng = np.random.default_rng(split_k)
    a = jnp.asarray(rng.standard_normal((64, 192)), jnp.float32)
    y = _run(a, split_k, m=3)
    assert y.shape == (3, 192)
    assert y.dtype == (jnp.bfloat16 if split_k == 1 else jnp.float32)  # (the caller casts)
    want = np.broadcast_to(np.asarray(a, np.float64).sum(axis=0), (3, 192))
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-2, atol=1e-2)


def test_clear_error_for_a_tile_that_does_not_divide_n():
    with pytest.raises(ValueError, match="bn 64 must divide N = 96"):
        _run(jnp.zeros((64, 96), jnp.float32), 2, m=1)


@pytest.mark.parametrize("split_k", [2, 4])
def test_kernel_sum_writes_the_output_dtype(split_k):
    rng = np.random.default_rng([split_k, 1])
    a = jnp.asarray(rng.standard_normal((64, 192)), jnp.float32)
    y = _run(a, split_k, m=3, split_sum="kernel", locks=new_locks(192))
    assert y.shape == (3, 192) and y.dtype == jnp.bfloat16
    want = np.broadcast_to(np.asarray(a, np.float64).sum(axis=0), (3, 192))
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-2, atol=1e-2)


def test_new_locks_one_counter_per_64_columns_power_of_two():
    assert [new_locks(n).shape[0] for n in (64, 192, 8192, 14336)] == [1, 4, 128, 256]
    assert new_locks(192).dtype == jnp.int32 and not np.any(np.asarray(new_locks(192)))


def test_clear_errors_for_missing_or_short_locks():
    a = jnp.zeros((64, 256), jnp.float32)
    with pytest.raises(ValueError, match=r"needs int32 locks \[>= 4\].*got None"):
        _run(a, 2, m=1, split_sum="kernel")
    with pytest.raises(ValueError, match=r"got int32 \(2,\)"):
        _run(a, 2, m=1, split_sum="kernel", locks=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="split_sum must be one of"):
        _run(a, 2, m=1, split_sum="atomics")


def _problem(kind, rng, k, n):
    """(packed weight, matmul(x, t, **kw), float64 W [K, N]) of a kernel with a K split."""
    if kind == "int4":
        p, w64 = make_int(rng, k, n, 4, 128, True)
        return T.pack_tc(p, 64), T.int4_tc_matmul, w64
    if kind in ("mxfp4", "nvfp4"):
        p, w64 = (make_mxfp4 if kind == "mxfp4" else make_nvfp4)(rng, k, n)
        return F.pack_fp4_tc(p, 64), F.fp4_tc_matmul, w64
    if kind == "2:4_bf16":
        p, w64 = make_24(rng, k, n)
        return S.pack_24_tc(p, 64), S.tc24_matmul, w64
    p, w64 = make_24_int4(rng, k, n, 128, False)
    return S.pack_24_tc(p, 64), S.tc24_matmul, w64


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,split", [(1, 2), (5, 4)])
def test_kernel_sum_equals_xla_sum(kind, m, split):
    """N = 200: four 64-column programs, 56 padded columns."""
    rng = np.random.default_rng([m, split])
    t, matmul, w64 = _problem(kind, rng, 1024, 200)
    x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
    ys = {s: matmul(x, t, split_k=split, split_sum=s, interpret=True) for s in SK.SUM_MODES}
    r64 = np.asarray(x, np.float64) @ w64
    for y in ys.values():
        assert y.shape == (m, 200) and y.dtype == jnp.bfloat16
        assert rel_err(y, r64) < 1e-2
    # the same f32 partials, added in another order at most: bf16 results within one rounding
    a, b = (np.asarray(ys[s], np.float64) for s in SK.SUM_MODES)
    assert np.max(np.abs(a - b)) <= 2**-7 * np.max(np.abs(a))


def test_default_split_sum_needs_locks_a_split_and_few_rows(monkeypatch):
    rng = np.random.default_rng(3)
    t, _, _ = _problem("int4", rng, 256, 128)
    monkeypatch.setattr(SK, "KERNEL_SUM_MAX_M", 4)
    assert SK.default_split_sum(t, 4, 2) == "kernel"
    assert SK.default_split_sum(t, 5, 2) == "xla"  # more rows than KERNEL_SUM_MAX_M
    assert SK.default_split_sum(t, 1, 1) == "xla"  # no split: the program writes y
    bare = T.TcInt4(t.words, t.scales, t.zeros, k=t.k, n=t.n, group=t.group, block_n=64)
    assert SK.default_split_sum(bare, 1, 2) == "xla"  # a layout built without locks


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,split", [(1, 8), (4, 4), (16, 2)])
def test_gpu_kernel_sum_over_repeated_calls(kind, m, split):
    """Eight calls in one jitted loop, then the loop again: every y matches float64, and the
    weight's counters are all 0 afterwards (the last program of each tile resets them)."""
    rng = np.random.default_rng([m, split, 7])
    k, n = 2048, 384
    t, matmul, w64 = _problem(kind, rng, k, n)
    xs = jnp.asarray(rng.standard_normal((8, m, k)), jnp.bfloat16)

    @jax.jit
    def loop(xs, t):
        return jax.lax.map(lambda x: matmul(x, t, split_k=split, split_sum="kernel"), xs)

    r64 = np.einsum("bmk,kn->bmn", np.asarray(xs, np.float64), w64)
    for i, y in enumerate(loop(xs, t)):
        assert rel_err(y, r64[i]) < 1e-2, i
    again = loop(xs[::-1], t)
    for i, y in enumerate(again):
        assert rel_err(y, r64[7 - i]) < 1e-2, i
    assert not np.any(np.asarray(t.locks))
