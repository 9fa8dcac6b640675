"""``kernels/split_k.py``: the decode kernels' shared output path (interpret mode): one program
per K part, the f32 partials added by XLA, the output dtype kept where the kernel writes y."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from shrinkjax.kernels.split_k import split_k_call


def _run(a, split_k, m, mp=16, bn=64):
    """y = column sums of ``a`` [K, N] for the first m tokens, K split ``split_k`` ways."""
    k, n = a.shape

    def body(a_ref):  # this program's K part, broadcast over the mp token rows
        part = jnp.sum(a_ref[...].astype(jnp.float32), axis=0, keepdims=True)
        return jnp.broadcast_to(part, (mp, bn))

    spec = pl.BlockSpec((k // split_k, bn), lambda j, s: (s, j))
    return split_k_call(
        body, [a], [spec], m=m, mp=mp, bn=bn, np_=n, split_k=split_k, out_dtype=jnp.bfloat16,
        interpret=True, num_warps=4, num_stages=1, name="t",
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
