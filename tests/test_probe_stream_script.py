"""``scripts/probe_stream.py``'s streaming kernels (interpret mode): each program's words
summed per weight row, per K split, in both modes; a clear error for a split that does not
divide the chunks."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from probe_stream import stream_fn  # noqa: E402


@pytest.mark.parametrize("mode,scale", [("add", 1), ("dot", 16)])  # dot: 16 ones columns
def test_stream_sums_each_rows_words_per_split(mode, scale):
    w = jax.random.bits(jax.random.PRNGKey(1), (2, 8, 128, 16), jnp.uint32) & 0xFF
    y = stream_fn(mode, 64, 2, 2, 2, 2, 128, interpret=True)(w)  # rows, split, ..., per_step
    by_split = np.asarray(w, np.float64).reshape(2, 2, 4, 128, 16).sum(axis=(2, 4))
    want = scale * by_split.transpose(1, 0, 2).reshape(2, 256)  # [split, tile * 128 + row]
    np.testing.assert_array_equal(np.asarray(y), want)


def test_split_must_divide_the_chunks():
    w = jnp.ones((1, 6, 64, 16), jnp.uint32)
    with pytest.raises(ValueError, match="split 4 x per_step 1 must divide 6 chunks"):
        stream_fn("add", 64, 4, 2, 2, 1, 64, interpret=True)(w)
