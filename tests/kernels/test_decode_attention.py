"""The one-kernel decode attention (shrinkjax/kernels/decode_attention.py): interpret mode
against a float64 softmax and the model's einsum path on random inputs (GQA groups, ragged
cache lengths, masked slots), the model's ``attention_impl="pallas_decode"``, the errors, and
the real Triton lowering on a GPU."""

from __future__ import annotations

import collections
import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.kernels import decode_attention as DA
from shrinkjax.models.llama import attention


def _inputs(rng, b, n, kh, h, s, p_valid=0.7):
    q = jnp.asarray(rng.standard_normal((b, n, h)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.bfloat16)
    valid = rng.random((b, s)) < p_valid
    valid[:, -1] = True  # a decode token's own slot is always valid
    return q, k, v, jnp.asarray(valid)


def _f64(q, k, v, valid):
    """Softmax attention in float64 (numpy), GQA head n -> KV head n // G."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, n, h))
    for i in range(b):
        for j in range(n):
            s = k[i, :, j // g] @ q[i, j] / math.sqrt(h)
            s = np.where(np.asarray(valid[i]), s, -np.inf)
            p = np.exp(s - s.max())
            out[i, j] = (p / p.sum()) @ v[i, :, j // g]
    return out


@pytest.mark.parametrize(
    "b,n,kh,h,s,block_s,split_s",
    [
        (1, 32, 8, 128, 128, 64, 512),  # the 8B heads, G = 4
        (2, 8, 2, 64, 100, 64, 512),  # ragged cache length: the last block runs past S
        (3, 4, 4, 32, 40, 16, 512),  # G = 1 (multi-head)
        (1, 16, 1, 16, 33, 32, 512),  # G = 16 (multi-query), the widest group
        (2, 8, 2, 64, 1000, 64, 256),  # four splits, the last one ragged
    ],
)
def test_kernel_equals_float64_and_the_einsum_path(b, n, kh, h, s, block_s, split_s):
    rng = np.random.default_rng([b, n, kh, h, s])
    q, k, v, valid = _inputs(rng, b, n, kh, h, s)
    y = DA.decode_attention(q, k, v, valid, block_s=block_s, split_s=split_s, interpret=True)
    assert y.shape == (b, n, h) and y.dtype == jnp.bfloat16
    want = _f64(q, k, v, valid)
    # p rounded to bf16 for p·V (as the einsum path does) and a bf16 output: ~1% of |v|
    np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=3e-2, rtol=0)
    np.testing.assert_allclose(np.asarray(DA.decode_attention_ref(q, k, v, valid)), want, atol=3e-2)
    e = attention(q[:, None], k, v, valid[:, None, :]).reshape(b, n, h)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(e, np.float32), atol=3e-2)


def test_masked_slots_are_ignored():
    """Changing k / v at masked slots changes nothing; a row with no valid slot is zero."""
    rng = np.random.default_rng(1)
    q, k, v, valid = _inputs(rng, 2, 8, 2, 32, 48)
    y = DA.decode_attention(q, k, v, valid, block_s=16, interpret=True)
    noise = jnp.asarray(rng.standard_normal(k.shape) * 100, jnp.bfloat16)
    hole = ~valid[:, :, None, None]
    y2 = DA.decode_attention(
        q, jnp.where(hole, noise, k), jnp.where(hole, noise, v), valid, block_s=16, interpret=True
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))
    none = valid.at[1].set(False)
    y3 = DA.decode_attention(q, k, v, none, block_s=16, interpret=True)
    assert not np.asarray(y3[1], np.float32).any()


def test_splits_with_no_valid_slot_weigh_nothing():
    """Flash-decoding splits: a split whose slots are all masked contributes nothing, and the
    split result equals the one-program result."""
    rng = np.random.default_rng(3)
    q, k, v, valid = _inputs(rng, 2, 8, 2, 32, 300)
    valid = valid.at[:, :200].set(False)  # the first split (128 slots) has no valid slot
    one = DA.decode_attention(q, k, v, valid, block_s=32, split_s=512, interpret=True)
    split = DA.decode_attention(q, k, v, valid, block_s=32, split_s=128, interpret=True)
    np.testing.assert_allclose(
        np.asarray(split, np.float32), np.asarray(one, np.float32), atol=2e-2
    )
    np.testing.assert_allclose(np.asarray(split, np.float64), _f64(q, k, v, valid), atol=3e-2)


def test_clear_errors():
    rng = np.random.default_rng(2)
    q, k, v, valid = _inputs(rng, 1, 8, 2, 32, 16)
    with pytest.raises(ValueError, match=r"valid must be \[B, S\]"):
        DA.decode_attention(q, k, v, valid[:, :8], interpret=True)
    with pytest.raises(ValueError, match="N a multiple of K"):
        DA.decode_attention(q[:, :7], k, v, valid, interpret=True)
    with pytest.raises(ValueError, match="at most 16 query heads per KV head"):
        DA.decode_attention(jnp.tile(q, (1, 5, 1)), k, v, valid, interpret=True)
    with pytest.raises(ValueError, match=r"power-of-two head width >= 16 \(got 24\)"):
        DA.decode_attention(q[..., :24], k[..., :24], v[..., :24], valid, interpret=True)
    with pytest.raises(ValueError, match="block_s must be a power of two >= 16, got 24"):
        DA.decode_attention(q, k, v, valid, block_s=24, interpret=True)
    with pytest.raises(ValueError, match="split_s"):
        DA.decode_attention(q, k, v, valid, block_s=32, split_s=48, interpret=True)
    assert DA.supports(q[:, None], k) and not DA.supports(q[:, None, :, :24], k[..., :24])


@pytest.mark.parametrize(
    "b,n,kh,h,s,index,block_s,split_s",
    [
        (1, 32, 8, 128, 128, 100, 64, 512),  # the 8B heads
        (2, 8, 2, 64, 100, 99, 64, 512),  # the last slot of a ragged cache
        (3, 4, 4, 32, 40, 0, 16, 512),  # G = 1, the first slot
        (2, 8, 2, 64, 1000, 600, 64, 256),  # split: the slot in the third of four ranges
    ],
)
def test_update_equals_rope_write_then_attend(b, n, kh, h, s, index, block_s, split_s):
    """decode_attention_update = apply_rope + cache_write + attention: the output against
    float64 on the rotated inputs, the caches bit-exact (the written slot and all others)."""
    _check_update(b, n, kh, h, s, index, block_s, split_s, interpret=True)


@pytest.mark.parametrize("s,split_s", [(40, 512), (300, 128)])
def test_update_with_the_new_slot_masked(s, split_s):
    """A row whose new token is padding (its slot not valid) attends only to the others, but
    the token is still written to the cache."""
    _check_update(2, 8, 2, 64, s, s - 7, 32, split_s, interpret=True, new_valid=False)


def _check_update(b, n, kh, h, s, index, block_s, split_s, interpret, new_valid=True):
    from shrinkjax.models.kv_cache import cache_write
    from shrinkjax.models.llama import apply_rope

    rng = np.random.default_rng([b, n, h, s, index])
    q, k, v, valid = _inputs(rng, b, n, kh, h, s)
    valid = valid.at[:, index].set(True)
    if not new_valid:
        valid = valid.at[0, index].set(False)
    kn = jnp.asarray(rng.standard_normal((b, kh, h)), jnp.bfloat16)
    vn = jnp.asarray(rng.standard_normal((b, kh, h)), jnp.bfloat16)
    ang = rng.uniform(0, 50, (b, h // 2)).astype(np.float32)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    rope = (cos[:, None], sin[:, None])  # [B, L=1, H/2]
    q_rot = apply_rope(q[:, None], *rope)[:, 0]
    k_want = cache_write(k, apply_rope(kn[:, None], *rope), index)
    v_want = cache_write(v, vn[:, None], index)
    want = _f64(q_rot, k_want, v_want, valid)
    k_want, v_want = np.asarray(k_want), np.asarray(v_want)  # (k, v are donated below)
    y, k2, v2 = DA.decode_attention_update(
        q, kn, vn, cos, sin, k, v, jnp.int32(index), valid, block_s=block_s, split_s=split_s,
        interpret=interpret,
    )  # fmt: skip
    assert y.shape == (b, n, h) and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(k2), k_want)
    np.testing.assert_array_equal(np.asarray(v2), v_want)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=3e-2, rtol=0)


def test_update_errors():
    rng = np.random.default_rng(4)
    q, k, v, valid = _inputs(rng, 1, 8, 2, 32, 16)
    kn = vn = jnp.zeros((1, 2, 32), jnp.bfloat16)
    cs = jnp.zeros((1, 16), jnp.float32)
    with pytest.raises(ValueError, match=r"new k \(1, 3, 32\) .* must be \[B, K, H\]"):
        DA.decode_attention_update(q, kn[:, [0, 1, 1]], vn, cs, cs, k, v, 3, valid)
    with pytest.raises(ValueError, match=r"cos / sin must be \[B, H/2\]"):
        DA.decode_attention_update(q, kn, vn, cs[:, :8], cs, k, v, 3, valid)
    with pytest.raises(ValueError, match="head width >= 32"):
        q16, k16 = q[..., :16], k[..., :16]
        DA.decode_attention_update(q16, kn[..., :16], vn[..., :16], cs[:, :8], cs[:, :8], k16,
                                   k16, 3, valid)  # fmt: skip


def test_model_decodes_the_same_tokens(tiny_llama, monkeypatch):
    """Greedy generation from left-padded prompts (masked cache slots) with
    ``attention_impl="pallas_decode"`` (the kernel, interpret mode on CPU) gives the einsum
    path's tokens."""
    from shrinkjax.kernels import driver
    from shrinkjax.models.generate import generate, left_pad
    from shrinkjax.models.params import flat_params, model_from_params

    base = tiny_llama.model
    toks, mask = left_pad([[5, 17, 3, 9, 11], [7, 2]])
    want = generate(base, toks, 6, prompt_mask_BxP=mask)
    cfg = base.cfg.replace(attention_impl="pallas_decode")
    model = model_from_params(cfg, flat_params(base))
    calls = []
    real = DA.decode_attention
    monkeypatch.setattr(driver, "use_kernel_backend", lambda: True)  # interpret mode off-GPU
    monkeypatch.setattr(DA, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = generate(model, toks, 6, prompt_mask_BxP=mask)
    assert calls  # the decode steps went through the kernel
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "impl,deferred_norm,entry",
    [
        ("pallas_decode_fused", False, "decode_attention_update"),
        ("pallas_decode_fused", True, "decode_attention_update"),
        ("pallas_decode", True, "decode_attention"),
    ],
)
def test_model_kernel_paths_decode_the_same_tokens(monkeypatch, impl, deferred_norm, entry):
    """Head width 32: the model's decode steps take the kernel ``impl`` names (interpret mode
    on CPU; "pallas_decode_fused": RoPE + cache write + attention in one kernel) and greedy
    generation from left-padded prompts gives the einsum path's tokens."""
    from shrinkjax.kernels import driver
    from shrinkjax.models.generate import generate, left_pad
    from shrinkjax.models.llama import LlamaConfig, init_model
    from shrinkjax.models.params import flat_params, model_from_params

    cfg = LlamaConfig(
        vocab_size=96, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
        deferred_norm=deferred_norm,
    )  # fmt: skip
    base = init_model(cfg, seed=5)
    toks, mask = left_pad([[5, 17, 3, 9, 11], [7, 2]])
    want = generate(base, toks, 6, prompt_mask_BxP=mask)
    model = model_from_params(cfg.replace(attention_impl=impl), flat_params(base))
    calls = collections.Counter()
    monkeypatch.setattr(driver, "use_kernel_backend", lambda: True)  # interpret mode off-GPU
    for name in ("decode_attention", "decode_attention_update"):
        real = getattr(DA, name)
        spy = functools.partial(lambda n, r, *a, **k: calls.update([n]) or r(*a, **k), name, real)
        monkeypatch.setattr(DA, name, spy)
    got = generate(model, toks, 6, prompt_mask_BxP=mask)
    assert set(calls) == {entry}  # the decode steps went through that kernel only
    np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("s", [128, 100, 1000, 4000])  # 1000, 4000: split (512 slots each)
def test_gpu_native_matches_float64(s):
    rng = np.random.default_rng(s)
    q, k, v, valid = _inputs(rng, 2, 32, 8, 128, s)
    y = DA.decode_attention(q, k, v, valid, interpret=False)
    np.testing.assert_allclose(np.asarray(y, np.float64), _f64(q, k, v, valid), atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("s,index", [(128, 100), (1000, 700)])
def test_gpu_native_update_matches(s, index):
    """The real lowering of the fused RoPE + cache write + attention (8B heads)."""
    _check_update(2, 32, 8, 128, s, index, 64, 512, interpret=False)
