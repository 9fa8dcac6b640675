"""``scripts/probe_mgpu_packed.py``: the int4 packing for the Mosaic GPU probe's wgmma register
fragments has the documented bit layout and round-trips, bad input is refused by name, the
packed kernel lowers for CUDA on this CPU machine, and on a GPU it equals float64."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from probe_mgpu_packed import (  # noqa: E402
    mgpu_int4_packed_gemv,
    pack_wgmma_int4,
    unpack_wgmma_int4,
)


@pytest.fixture(scope="module")
def codes():
    return np.random.default_rng(0).integers(-8, 8, size=(128, 512)).astype(np.int8)


@pytest.mark.parametrize("tile,i,t,v", [(0, 0, 0, 0), (3, 2, 77, 3), (1, 3, 127, 1)])
def test_pack_puts_each_fragment_pair_in_its_nibbles(codes, tile, i, t, v):
    words = pack_wgmma_int4(codes)
    assert words.shape == (2, 2, 16, 128) and words.dtype == np.int32
    m, p = divmod(tile, 2)
    word = int(words[m, p].reshape(-1)[512 * i + 4 * t + v].view(np.uint32))
    warp, lane = divmod(t, 32)
    for j in range(4):  # WGMMA_LAYOUT register (col block 2 kb + bb, row half h) of thread t
        bb, h = divmod(j, 2)
        r = 64 * m + 16 * warp + 8 * h + lane // 4
        c = 256 * p + 16 * (4 * i + v) + 8 * bb + 2 * (lane % 4)
        assert (word >> 4 * j) & 15 == codes[r, c] + 8  # (offset binary)
        assert (word >> 16 + 4 * j) & 15 == codes[r, c + 1] + 8


def test_pack_round_trips(codes):
    np.testing.assert_array_equal(unpack_wgmma_int4(pack_wgmma_int4(codes)), codes)


def test_pack_refuses_bad_shapes_and_codes(codes):
    with pytest.raises(ValueError, match=r"N % 64 == 0 and K % 256 == 0, got \(128, 500\)"):
        pack_wgmma_int4(codes[:, :500])
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\], got \[-8, 8\]"):
        pack_wgmma_int4(np.where(codes == 7, 8, codes))


def test_kernel_refuses_bad_tiles():
    w = jax.ShapeDtypeStruct((4, 8, 16, 128), jnp.int32)
    x = jax.ShapeDtypeStruct((8, 2048), jnp.bfloat16)
    with pytest.raises(
        ValueError, match="tile_k 256 must divide K 2048 and be a multiple of 256 x"
    ):
        jax.eval_shape(functools.partial(mgpu_int4_packed_gemv, tile_k=256, wgs=2), w, x)
    with pytest.raises(ValueError, match=r"int32 \[N / 64, K / 256, 16, 128\], got \(4, 8, 2048\)"):
        jax.eval_shape(mgpu_int4_packed_gemv, jax.ShapeDtypeStruct((4, 8, 2048), jnp.int32), x)
    with pytest.raises(ValueError, match=r"K = 2048 \(the weight's\), got shape \(8, 1024\)"):
        jax.eval_shape(mgpu_int4_packed_gemv, w, jax.ShapeDtypeStruct((8, 1024), jnp.bfloat16))


PACKED = [(8, 512, 2, True), (16, 512, 2, True), (8, 1024, 2, False), (16, 256, 1, True)]


@pytest.mark.parametrize("t,tile_k,wgs,sub", PACKED)
def test_packed_kernel_lowers_for_cuda(t, tile_k, wgs, sub):
    w = jax.ShapeDtypeStruct((4, 8, 16, 128), jnp.int32)
    x = jax.ShapeDtypeStruct((t, 2048), jnp.bfloat16)
    fn = functools.partial(
        mgpu_int4_packed_gemv, tile_k=tile_k, steps=2, wgs=wgs, sub=sub, num_sms=4
    )
    text = jax.jit(fn).trace(w, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize("t,tile_k,wgs,sub", PACKED)
def test_gpu_packed_equals_float64(t, tile_k, wgs, sub):
    rng = np.random.default_rng([t, tile_k, wgs])
    codes = rng.integers(-8, 8, size=(256, 2048), dtype=np.int8)
    x = jnp.asarray(rng.standard_normal((t, 2048)), jnp.bfloat16)
    y = mgpu_int4_packed_gemv(
        jnp.asarray(pack_wgmma_int4(codes)), x, tile_k=tile_k, steps=2, wgs=wgs, sub=sub
    )
    x64 = np.asarray(x, np.float64)
    want = (codes.astype(np.float64) + (0 if sub else 136)) @ x64.T
    err = np.linalg.norm(np.asarray(y, np.float64) - want) / np.linalg.norm(want)
    assert y.shape == (256, t) and err < (1e-2 if t >= 16 else 1e-5)  # (bf16 y from T = 16)


def _g128(rng, n, k):
    """Scales, and c = 128 + z for unsigned zero points z, bf16 [K / 128, N]; W = s (u - z)."""
    s = rng.uniform(0.5, 1.5, size=(k // 128, n)).astype(np.float32)
    z = rng.integers(0, 16, size=(k // 128, n)).astype(np.float32)
    return jnp.asarray(s, jnp.bfloat16), jnp.asarray(128 + z, jnp.bfloat16), z


@pytest.mark.parametrize("mma_k", [256, 64])
def test_g128_packed_kernel_lowers_for_cuda(mma_k):
    w = jax.ShapeDtypeStruct((4, 8, 16, 128), jnp.int32)
    x = jax.ShapeDtypeStruct((8, 2048), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16)
    fn = functools.partial(mgpu_int4_packed_gemv, steps=2, mma_k=mma_k, num_sms=4)
    text = jax.jit(fn).trace(w, x, s, s).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_g128_packed_kernel_refuses_bad_groups():
    w = jax.ShapeDtypeStruct((4, 8, 16, 128), jnp.int32)
    x = jax.ShapeDtypeStruct((8, 2048), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="scales and zero offsets"):
        jax.eval_shape(mgpu_int4_packed_gemv, w, x, s)
    with pytest.raises(ValueError, match=r"zero offsets must be \[K / 128, N\] = \(16, 256\)"):
        jax.eval_shape(
            mgpu_int4_packed_gemv, w, x, s, jax.ShapeDtypeStruct((16, 128), jnp.bfloat16)
        )
    with pytest.raises(ValueError, match="mma_k must be 64, 128 or 256, got 32"):
        jax.eval_shape(functools.partial(mgpu_int4_packed_gemv, mma_k=32), w, x)


@pytest.mark.gpu
@pytest.mark.parametrize("t,mma_k", [(8, 256), (16, 64), (8, 128)])
def test_gpu_g128_packed_equals_float64(t, mma_k):
    rng = np.random.default_rng([t, mma_k])
    codes = rng.integers(-8, 8, size=(256, 2048), dtype=np.int8)
    s, c, z = _g128(rng, 256, 2048)
    x = jnp.asarray(rng.standard_normal((t, 2048)), jnp.bfloat16)
    w = jnp.asarray(pack_wgmma_int4(codes))
    y = mgpu_int4_packed_gemv(w, x, s, c, steps=2, mma_k=mma_k)
    deq = (codes + 8.0 - np.repeat(z, 128, 0).T) * np.repeat(np.asarray(s, np.float64), 128, 0).T
    want = deq @ np.asarray(x, np.float64).T
    err = np.linalg.norm(np.asarray(y, np.float64) - want) / np.linalg.norm(want)
    assert y.shape == (256, t) and err < 5e-3  # (bf16 s (u - z), as Marlin-style kernels)
