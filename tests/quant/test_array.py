"""QuantizedArray as a pytree, bit packing, dispatch.linear reference path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shrinkjax.kernels import dispatch
from shrinkjax.quant import formats
from shrinkjax.quant.array import QuantizedArray, QuantSpec, pack, unpack

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _w(k, n, seed=0, scale=0.05):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((k, n)) * scale, jnp.float32)


# --- packing ----------------------------------------------------------------------------------


def test_nibble_order_low_nibble_is_first_row():
    codes = jnp.array([[1, 3], [2, 4]], jnp.uint8)  # column 0: rows (1, 2); column 1: (3, 4)
    np.testing.assert_array_equal(pack(codes, 4), [[0x21, 0x43]])


def test_int2_order():
    codes = jnp.array([[1], [2], [3], [0], [3], [3], [3], [3]], jnp.uint8)
    # 1 | 2<<2 | 3<<4 | 0<<6 = 0x39 ; all threes = 0xFF
    np.testing.assert_array_equal(pack(codes, 2), [[0x39], [0xFF]])


def test_int3_dense_packing_hand_worked():
    codes = jnp.arange(8, dtype=jnp.uint8)[:, None]  # v = sum i << 3i = 0xFAC688
    np.testing.assert_array_equal(pack(codes, 3)[:, 0], [0x88, 0xC6, 0xFA])
    sevens = jnp.full((8, 1), 7, jnp.uint8)
    np.testing.assert_array_equal(pack(sevens, 3)[:, 0], [0xFF, 0xFF, 0xFF])
    one_at_end = jnp.zeros((8, 1), jnp.uint8).at[7, 0].set(1)  # bit 21 -> byte 2, bit 5
    np.testing.assert_array_equal(pack(one_at_end, 3)[:, 0], [0, 0, 0x20])


@SETTINGS
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    units=st.sampled_from([1, 3]),
    n=st.sampled_from([1, 5]),
    seed=st.integers(0, 2**16),
)
def test_pack_roundtrip_and_size(bits, units, n, seed):
    k = units * {2: 4, 3: 8, 4: 2, 8: 1}[bits]
    codes = np.random.default_rng(seed).integers(0, 2**bits, (k, n)).astype(np.uint8)
    packed = pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.size == bits * k * n // 8
    np.testing.assert_array_equal(unpack(packed, bits, k), codes)


def test_pack_rejects_bad_k_with_shape_in_message():
    with pytest.raises(ValueError, match=r"\(12, 2\).*K=12.*multiple of 8"):
        pack(jnp.zeros((12, 2), jnp.uint8), 3)
    with pytest.raises(ValueError, match="unsupported code width 5"):
        pack(jnp.zeros((8, 2), jnp.uint8), 5)


# --- QuantizedArray ---------------------------------------------------------------------------


def test_metadata_nbytes_and_bits_per_weight():
    q = formats.get("int4", group_size=32, symmetric=False).quantize(_w(128, 48))
    assert q.shape == (128, 48) and q.ndim == 2 and q.size == 128 * 48
    # codes 128*48/2 B + f16 scales 4*48*2 B + u8 zeros 4*48 B
    assert q.nbytes == 3072 + 384 + 192
    assert q.bits_per_weight == pytest.approx(8 * 3648 / (128 * 48))
    assert q.format == "int4" and q.dtype == "float32"
    assert "int4 g32 asym" in repr(q) and "4.750 bits/weight" in repr(q)
    qb = formats.get("int4", group_size=32).quantize(_w(128, 48).astype(jnp.bfloat16))
    assert qb.dtype == "bfloat16" and qb.dequantize().dtype == jnp.float32
    assert qb.dequantize(jnp.bfloat16).dtype == jnp.bfloat16


def test_spec_validation_messages():
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        QuantSpec("int4", group_size=0)
    with pytest.raises(ValueError, match="granularity must be one of"):
        QuantSpec("int4", granularity="row")
    with pytest.raises(ValueError, match="scale_dtype must be one of"):
        QuantSpec("int4", scale_dtype="float64")


def test_pytree_leaves_and_tree_map_roundtrip():
    q = formats.get("nf4", double_quant=True).quantize(_w(128, 20))
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 4  # codes, scales, scales2, zeros2 (zeros is None)
    q2 = jax.tree.map(lambda a: a + 0, q)
    assert isinstance(q2, QuantizedArray) and q2.spec == q.spec and q2.shape == q.shape
    np.testing.assert_array_equal(q2.dequantize(), q.dequantize())
    assert jax.tree.unflatten(treedef, leaves).spec == q.spec


def test_jit_device_put_and_dispatch_linear_equal_reference():
    w = _w(64, 24, seed=1)
    q = formats.get("int4", group_size=32).quantize(w)
    deq = np.asarray(q.dequantize())
    x = _w(5, 64, seed=2, scale=1.0)

    np.testing.assert_array_equal(jax.jit(lambda a: a.dequantize())(q), deq)
    y = jax.jit(dispatch.linear)(x, q)
    np.testing.assert_allclose(y, np.asarray(x) @ deq, rtol=1e-5, atol=1e-5)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    qd = jax.device_put(q, sharding)
    assert isinstance(qd, QuantizedArray) and qd.codes.sharding == sharding
    np.testing.assert_array_equal(qd.dequantize(), deq)

    xb = x.astype(jnp.bfloat16)
    yb = dispatch.linear(xb, q)
    ref = jnp.matmul(xb, jnp.asarray(deq).astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(yb, ref.astype(jnp.bfloat16))


def test_dequantize_rejects_foreign_spec():
    q = formats.get("int8").quantize(_w(128, 4))
    with pytest.raises(ValueError, match="given to format"):
        formats.get("int4").dequantize(q)


def test_orbax_save_restore(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    q = formats.get("nvfp4").quantize(_w(32, 8, seed=3))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "q", {"w": q})
        ckpt.wait_until_finished()
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"w": q})
        restored = ckpt.restore(tmp_path / "q", target)["w"]
    assert isinstance(restored, QuantizedArray) and restored.spec == q.spec
    np.testing.assert_array_equal(restored.dequantize(), q.dequantize())
