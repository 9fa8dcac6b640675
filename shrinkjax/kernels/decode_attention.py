"""Pallas kernel (Triton lowering): grouped-query attention of one new token per sequence
against the KV cache, in one kernel (decode).

Why: XLA runs decode attention as six small kernels per layer (q·K GEMM, two softmax reductions,
a convert, p·V GEMM, the output transpose), ~1.1-2.3 µs each on an H100 whatever the cache
length; at batch 1 they are ~10% of an int4 8B step (``benchmarks/RESULTS.md``, "Where the int4
step goes"). Here one program per (sequence, KV head) reads its KV head's cache rows in place
(the cache's own ``[B, S, K, H]`` layout, no transpose), with an online softmax over blocks of
``block_s`` slots (FlashAttention-2's recurrence, Dao 2023, arXiv:2307.08691). Caches longer
than ``split_s`` slots are split into ranges, one program each, whose partials
:func:`split_combine` merges in XLA (flash-decoding).

Shapes: q ``[B, N, H]`` (N = K * G query heads; head ``n = k G + g`` attends KV head ``k``, as
:func:`shrinkjax.models.llama.attention` groups them), k / v ``[B, S, K, H]``, ``valid``
``[B, S]`` (True = may attend). The G query heads of a KV head are the MMA's rows (padded to
16 by masked loads). Softmax in f32 with the scale ``1/sqrt(H)``; p is rounded to the cache
dtype for the p·V product, as the einsum path does. A row with no valid slot returns zeros
(the einsum path returns the mean of v there; the model never asks for it: a decode token's
own slot is valid).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from shrinkjax.kernels import driver as D

ROWS = 16  # MMA rows: the query heads of a KV head, padded
_NEG = -1e30  # masked scores (finite: exp(_NEG - m) is 0 without inf - inf)


def _kernel(q_ref, k_ref, v_ref, valid_ref, *out_refs, g, s_len, block_s, scale):
    """One (sequence, KV head, slot range): q_ref [16, H] (rows >= G are not its heads:
    masked), k_ref / v_ref [Ss, H] and valid_ref [Ss] int8: the program's ``Ss`` slots (all of
    them, rounded up to block_s, or one split's); slots >= S are masked. Out: o_ref [16, H]
    normalized, or (split) the f32 partials acc [16, H], m [16], l [16]."""
    h = q_ref.shape[-1]
    span = k_ref.shape[0]
    base = pl.program_id(2) * span if len(out_refs) == 3 else 0  # the split's first slot
    head = jax.lax.broadcasted_iota(jnp.int32, (ROWS, h), 0)
    q = plgpu.load(q_ref, mask=head < g, other=0.0)  # [16, H]
    col = jax.lax.broadcasted_iota(jnp.int32, (block_s,), 0)
    row = jax.lax.broadcasted_iota(jnp.int32, (block_s, h), 0)

    def body(i, carry):
        s0 = i * block_s
        in_s = base + s0 + row < s_len  # the last block may run past S
        k = plgpu.load(k_ref.at[pl.ds(s0, block_s), :], mask=in_s, other=0.0)
        v = plgpu.load(v_ref.at[pl.ds(s0, block_s), :], mask=in_s, other=0.0)
        ok = _slots_ok(valid_ref, s0, base + s0 + col < s_len)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)  # [16, block_s]
        return _online_softmax_step(carry, s * scale, ok, v)

    acc, m_i, l_sum = jax.lax.fori_loop(0, span // block_s, body, _softmax_init(h))
    _store_out(out_refs, acc, m_i, l_sum, g)


def _rope_halves(x1, x2, c, s_, dtype):
    """Rotate-half RoPE of the two halves of a head (f32 math, rounded to ``dtype`` as
    :func:`shrinkjax.models.llama.apply_rope` does): ``(x1 c - x2 s, x2 c + x1 s)``."""
    x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    return (x1 * c - x2 * s_).astype(dtype), (x2 * c + x1 * s_).astype(dtype)


def _update_kernel(
    q_ref, kn_ref, vn_ref, cos_ref, sin_ref, idx_ref, k_ref, v_ref, valid_ref, *out_refs,
    g, s_len, block_s, scale,
):  # fmt: skip
    """:func:`_kernel` for a token not yet rotated or cached: q_ref [16, H] and kn_ref /
    vn_ref [H] (this KV head's new k, v) before RoPE, cos_ref / sin_ref [H/2] (f32), idx_ref
    [1] (the token's slot). RoPE is applied to q and the new k here; the score is two
    half-width dots (``q1 k1 + q2 k2``), so the rotated halves are never joined.

    The cache blocks are attended with the new slot masked (its old content is never read);
    the program whose slot range holds the slot then merges the new token from registers into
    the online softmax (if the slot is valid: its bit comes with the blocks' mask loads) and
    writes the rotated k and v into its cache rows (ko_ref / vo_ref, the last two outputs,
    alias k_ref / v_ref). Nothing before the loop waits on a load's value, so the slot index,
    the new token and the first cache blocks are all in flight at once. (A first version read
    the new slot's validity and wrote the cache before the loop; on the H100 both took
    5.6-5.7 µs at 128 slots, so those waits were not what makes this kernel slower than
    XLA's RoPE + cache writes + :func:`_kernel`, 5.2 µs.)"""
    *out_refs, ko_ref, vo_ref = out_refs
    h = q_ref.shape[-1]
    h2 = h // 2
    span = k_ref.shape[0]
    base = pl.program_id(2) * span if len(out_refs) == 3 else 0
    dt, f32 = k_ref.dtype, jnp.float32
    c, s_ = cos_ref[...], sin_ref[...]  # [H/2] f32
    head = jax.lax.broadcasted_iota(jnp.int32, (ROWS, h2), 0)
    q1 = plgpu.load(q_ref.at[:, pl.ds(0, h2)], mask=head < g, other=0.0)
    q2 = plgpu.load(q_ref.at[:, pl.ds(h2, h2)], mask=head < g, other=0.0)
    q1, q2 = _rope_halves(q1, q2, c[None, :], s_[None, :], q_ref.dtype)  # [16, H/2]
    k1n, k2n = _rope_halves(kn_ref[pl.ds(0, h2)], kn_ref[pl.ds(h2, h2)], c, s_, dt)  # [H/2]
    vn = vn_ref[...].astype(dt)  # [H]
    index = idx_ref[0]

    col = jax.lax.broadcasted_iota(jnp.int32, (block_s,), 0)
    row2 = jax.lax.broadcasted_iota(jnp.int32, (block_s, h2), 0)
    row = jax.lax.broadcasted_iota(jnp.int32, (block_s, h), 0)

    def body(i, carry):
        *soft, new_ok = carry
        s0 = i * block_s
        in2, in_s = base + s0 + row2 < s_len, base + s0 + row < s_len
        k1 = plgpu.load(k_ref.at[pl.ds(s0, block_s), pl.ds(0, h2)], mask=in2, other=0.0)
        k2 = plgpu.load(k_ref.at[pl.ds(s0, block_s), pl.ds(h2, h2)], mask=in2, other=0.0)
        v = plgpu.load(v_ref.at[pl.ds(s0, block_s), :], mask=in_s, other=0.0)
        slot = base + s0 + col
        ok = _slots_ok(valid_ref, s0, slot < s_len)
        new_ok = new_ok | jnp.max(jnp.where(ok & (slot == index), 1, 0))
        s = jnp.dot(q1, k1.T, preferred_element_type=jnp.float32)
        s = s + jnp.dot(q2, k2.T, preferred_element_type=jnp.float32)  # [16, block_s]
        return (*_online_softmax_step(soft, s * scale, ok & (slot != index), v), new_ok)

    init = (*_softmax_init(h), jnp.int32(0))
    acc, m_i, l_sum, new_ok = jax.lax.fori_loop(0, span // block_s, body, init)

    # the new token: score from registers, merged into the recurrence if it is valid here
    s_new = jnp.sum(q1.astype(f32) * k1n.astype(f32)[None, :], axis=1)
    s_new = (s_new + jnp.sum(q2.astype(f32) * k2n.astype(f32)[None, :], axis=1)) * scale
    take = jnp.broadcast_to(new_ok != 0, (ROWS,))  # (Triton's select takes no scalar condition)
    m_new = jnp.where(take, jnp.maximum(m_i, s_new), m_i)
    w_old = jnp.exp(m_i - m_new)
    w_new = jnp.where(take, jnp.exp(s_new - m_new), 0.0)
    acc = w_old[:, None] * acc + w_new[:, None] * vn.astype(f32)[None, :]
    _store_out(out_refs, acc, m_new, w_old * l_sum + w_new, g)

    local = index - base  # the new slot's row in this program's range (if it is in it)
    mine = (local >= 0) & (local < span)
    at = jnp.where(mine, local, 0)
    half_mask = jnp.broadcast_to(mine, (1, h2))
    plgpu.store(ko_ref.at[pl.ds(at, 1), pl.ds(0, h2)], k1n[None, :], mask=half_mask)
    plgpu.store(ko_ref.at[pl.ds(at, 1), pl.ds(h2, h2)], k2n[None, :], mask=half_mask)
    plgpu.store(vo_ref.at[pl.ds(at, 1), :], vn[None, :], mask=jnp.broadcast_to(mine, (1, h)))


def _slots_ok(valid_ref, s0, in_c):
    """[block_s] bool: the block's slots that exist (``in_c``) and are valid."""
    n = in_c.shape[0]
    return plgpu.load(valid_ref.at[pl.ds(s0, n)], mask=in_c, other=0) != 0


def _softmax_init(h):
    """(acc [16, H], running max [16], running sum [16]) before the first block."""
    return (
        jnp.zeros((ROWS, h), jnp.float32),
        jnp.full((ROWS,), _NEG, jnp.float32),
        jnp.zeros((ROWS,), jnp.float32),
    )


def _online_softmax_step(carry, s, ok, v):
    """One block of FlashAttention-2's recurrence: scaled scores ``s`` [16, block_s], the
    slots that count ``ok`` [block_s], values ``v`` [block_s, H]."""
    acc, m_prev, l_prev = carry
    s = jnp.where(ok[None, :], s, _NEG)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.where(ok[None, :], jnp.exp(s - m_next[:, None]), 0.0)
    corr = jnp.exp(m_prev - m_next)
    l_next = corr * l_prev + jnp.sum(p, axis=1)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return corr[:, None] * acc + pv, m_next, l_next


def _store_out(out_refs, acc, m_i, l_sum, g):
    """The normalized output [16, H] (rows < G), or a split's f32 partials acc, m, l."""
    head = jax.lax.broadcasted_iota(jnp.int32, acc.shape, 0)
    if len(out_refs) == 3:  # a split: partials, combined in XLA (split_combine)
        o_ref, m_ref, l_ref = out_refs
        plgpu.store(o_ref, acc, mask=head < g)
        mine = jax.lax.broadcasted_iota(jnp.int32, (ROWS,), 0) < g
        plgpu.store(m_ref, m_i, mask=mine)
        plgpu.store(l_ref, l_sum, mask=mine)
        return
    (o_ref,) = out_refs
    out = acc / jnp.where(l_sum > 0, l_sum, 1.0)[:, None]
    plgpu.store(o_ref, out.astype(o_ref.dtype), mask=head < g)


def split_combine(acc_SxBxKxGxH, m_SxBxKxG, l_SxBxKxG):
    """Flash-decoding's last step: the splits' partials rescaled to the common max and summed,
    ``[B, K, G, H]`` f32 (rows with no valid slot anywhere: zeros)."""
    m = jnp.max(m_SxBxKxG, axis=0)
    w = jnp.exp(m_SxBxKxG - m[None])  # a split with no valid slot: m = -1e30, weight 0
    l_sum = jnp.sum(w * l_SxBxKxG, axis=0)
    acc = jnp.sum(w[..., None] * acc_SxBxKxGxH, axis=0)
    return acc / jnp.where(l_sum > 0, l_sum, 1.0)[..., None]


def _heads_problem(n: int, kh: int, h: int) -> str | None:
    """Why :func:`decode_attention` cannot take N query heads on K KV heads of width H, or
    None."""
    if not kh or n % kh:
        return f"{n} query heads are not a multiple of {kh} KV heads"
    if n // kh > ROWS:
        return f"at most {ROWS} query heads per KV head (got {n // kh})"
    if h < 16 or h & (h - 1):
        return f"a power-of-two head width >= 16 (got {h})"
    return None


def supports(q_BxLxNxH, k_BxSxKxH) -> bool:
    """Whether :func:`decode_attention` takes these heads (what the model checks before
    choosing it; quantized caches are dequantized to q's dtype before attention)."""
    n, h = q_BxLxNxH.shape[-2:]
    ok = _heads_problem(n, k_BxSxKxH.shape[2], h) is None
    return ok and k_BxSxKxH.dtype == q_BxLxNxH.dtype


def supports_update(q_BxLxNxH, cache_k) -> bool:
    """Whether :func:`decode_attention_update` takes these heads and this cache entry (a
    dense array of q's dtype: quantized caches keep the XLA write + dequantize path)."""
    if not isinstance(cache_k, jax.Array) or q_BxLxNxH.shape[-1] < 32:
        return False
    return supports(q_BxLxNxH, cache_k)


SPLIT_SLOTS = 512  # slots per program before the cache is split (flash-decoding)
_STATIC = ("block_s", "split_s", "num_warps", "num_stages", "interpret")


def _check(q_BxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS, block_s, split_s):
    b, n, h = q_BxNxH.shape
    _, s_len, kh, h2 = k_BxSxKxH.shape
    if h2 != h or v_BxSxKxH.shape != k_BxSxKxH.shape or n % kh:
        raise ValueError(
            f"decode_attention: q {q_BxNxH.shape} [B, N, H], k {k_BxSxKxH.shape} and v "
            f"{v_BxSxKxH.shape} [B, S, K, H] with N a multiple of K"
        )
    if valid_BxS.shape != (b, s_len):
        raise ValueError(f"valid must be [B, S] = {(b, s_len)}, got {valid_BxS.shape}")
    problem = _heads_problem(n, kh, h)
    if problem:
        raise ValueError(f"decode_attention takes {problem}")
    if block_s < 16 or block_s & (block_s - 1):
        raise ValueError(f"block_s must be a power of two >= 16, got {block_s}")
    if split_s < block_s or split_s % block_s:
        raise ValueError(f"split_s ({split_s}) must be a multiple of block_s ({block_s})")


def _attend(
    q_BxNxH, k, v, valid_BxS, update, *, block_s, split_s, num_warps, num_stages, interpret
):
    """The pallas_call of :func:`_kernel` (``update`` None) or :func:`_update_kernel`
    (``update`` = its extra inputs: new k / v [B, K, H], cos / sin [B, H/2], slot [1]):
    ``[B, N, H]`` (and, with ``update``, the two caches written in place)."""
    b, n, h = q_BxNxH.shape
    _, s_len, kh, _ = k.shape
    g = n // kh
    interpret = D.resolve_interpret(interpret)
    q = q_BxNxH.reshape(b, kh, g, h)
    valid = valid_BxS.astype(jnp.int8)
    squeezed = getattr(pl, "squeezed", None)
    sp = -(-s_len // block_s) * block_s  # blocks past the arrays' ends are masked in-kernel
    ns = 1 if sp <= split_s else -(-s_len // split_s)
    span = sp if ns == 1 else split_s  # slots per program
    static = dict(g=g, s_len=s_len, block_s=block_s, scale=1.0 / math.sqrt(h))
    head_spec = pl.BlockSpec((squeezed, squeezed, ROWS, h), lambda i, j, s: (i, j, 0, 0))
    kv_spec = pl.BlockSpec((squeezed, span, squeezed, h), lambda i, j, s: (i, s, j, 0))
    if ns == 1:
        out_shape = [jax.ShapeDtypeStruct((b, kh, g, h), q_BxNxH.dtype)]
        out_specs = [head_spec]
    else:  # per split: acc [B, K, G, H], m and l [B, K, G] (f32)
        out_shape = [
            jax.ShapeDtypeStruct((ns, b, kh, g, h), jnp.float32),
            jax.ShapeDtypeStruct((ns, b, kh, g), jnp.float32),
            jax.ShapeDtypeStruct((ns, b, kh, g), jnp.float32),
        ]
        part = (squeezed, squeezed, squeezed, ROWS)
        out_specs = [
            pl.BlockSpec((*part, h), lambda i, j, s: (s, i, j, 0, 0)),
            pl.BlockSpec(part, lambda i, j, s: (s, i, j, 0)),
            pl.BlockSpec(part, lambda i, j, s: (s, i, j, 0)),
        ]
    args, in_specs, aliases, kern = [q], [head_spec], {}, functools.partial(_kernel, **static)
    if update is not None:
        kn, vn, cos, sin, slot = update
        new_spec = pl.BlockSpec((squeezed, squeezed, h), lambda i, j, s: (i, j, 0))
        rope_spec = pl.BlockSpec((squeezed, h // 2), lambda i, j, s: (i, 0))
        args += [kn, vn, cos, sin, slot]
        in_specs += [new_spec, new_spec, rope_spec, rope_spec]
        in_specs.append(pl.BlockSpec((1,), lambda i, j, s: (0,)))
        aliases = {len(args): len(out_shape), len(args) + 1: len(out_shape) + 1}
        out_shape += [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2
        out_specs += [kv_spec, kv_spec]
        kern = functools.partial(_update_kernel, **static)
    args += [k, v, valid]
    in_specs += [kv_spec, kv_spec, pl.BlockSpec((squeezed, span), lambda i, j, s: (i, s))]
    outs = D.pallas_gpu_call(
        kern,
        out_shape=out_shape,
        grid=(b, kh, ns),
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        name=f"decode_attention{'_update' if update else ''}_s{s_len}x{ns}_k{kh}g{g}h{h}",
    )(*args)
    out = outs[0] if ns == 1 else split_combine(*outs[:3]).astype(q_BxNxH.dtype)
    caches = tuple(outs[len(out_shape) - 2 :]) if update is not None else ()
    return (out.reshape(b, n, h), *caches)


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_attention(
    q_BxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS, *, block_s=128, split_s=SPLIT_SLOTS, num_warps=4,
    num_stages=2, interpret=None,
):  # fmt: skip
    """``softmax(q k^T / sqrt(H)) v`` per query head over the valid cache slots: ``[B, N, H]``
    in q's dtype (module docstring). Caches longer than ``split_s`` slots (a multiple of
    ``block_s``) are split into ranges of ``split_s`` slots, one program each, whose f32
    partials :func:`split_combine` merges (flash-decoding); shorter ones take one program per
    (sequence, KV head) and no combine step (the measured 8B decode: 128 slots).

    Tiles: ``scripts/probe_decode_attention.py`` on an H100 (8B heads, B = 1, device time with
    XLA's RoPE and cache writes): ``block_s`` 128 took 5.2 / 11.6 µs at 128 / 1000 slots against
    5.9 / 13.3 µs at 64; 1-3 stages within 0.2 µs."""
    _check(q_BxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS, block_s, split_s)
    (out,) = _attend(
        q_BxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS, None, block_s=block_s, split_s=split_s,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret,
    )  # fmt: skip
    return out


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(5, 6))
def decode_attention_update(
    q_BxNxH, k_new_BxKxH, v_new_BxKxH, cos_BxH2, sin_BxH2, k_BxSxKxH, v_BxSxKxH, index,
    valid_BxS, *, block_s=64, split_s=SPLIT_SLOTS, num_warps=4, num_stages=2, interpret=None,
):  # fmt: skip
    """One decode token's attention with its RoPE and cache write in the same kernel:
    ``(out [B, N, H], k cache, v cache)``.

    q and the new k / v are the projections' outputs *before* RoPE; ``cos`` / ``sin``
    ``[B, H/2]`` (f32) the token's rotation (:func:`shrinkjax.models.llama.rope_tables`);
    ``index`` (int32 scalar) the slot it takes in every sequence, below S (traced, so not
    checked here: a slot past the end is written nowhere, where ``dynamic_update_slice`` would
    clamp it; ``generate`` sizes its cache for every token); ``valid`` the slots it may attend,
    its own included. Equals ``apply_rope`` + ``cache_write`` + :func:`decode_attention`
    (the rotated k and q rounded to the cache dtype, as there), and replaces their three XLA
    kernels per layer (RoPE, two cache updates): the caches are updated in place (donated;
    under ``jit`` XLA aliases them as it does for ``dynamic_update_slice``).

    Measured (``scripts/probe_decode_attention.py``, H100, 8B heads, B = 1): 5.6 µs at 128
    slots, against 5.2 µs for XLA's RoPE and cache writes + :func:`decode_attention`; at 1000
    slots 11.3 µs (``block_s`` 128, 3 stages) against 11.4. The model's default pallas
    decode attention (``"pallas_decode"``) is therefore the unfused one."""
    _check(q_BxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS, block_s, split_s)
    b, n, h = q_BxNxH.shape
    kh = k_BxSxKxH.shape[2]
    if k_new_BxKxH.shape != (b, kh, h) or v_new_BxKxH.shape != (b, kh, h):
        raise ValueError(
            f"new k {k_new_BxKxH.shape} and v {v_new_BxKxH.shape} must be [B, K, H] = {(b, kh, h)}"
        )
    if cos_BxH2.shape != (b, h // 2) or sin_BxH2.shape != (b, h // 2):
        raise ValueError(f"cos / sin must be [B, H/2] = {(b, h // 2)}, got {cos_BxH2.shape}")
    if h < 32:
        raise ValueError(f"decode_attention_update takes a head width >= 32 (got {h})")
    slot = jnp.reshape(index, (1,)).astype(jnp.int32)
    update = (k_new_BxKxH, v_new_BxKxH, cos_BxH2.astype(jnp.float32), sin_BxH2.astype(jnp.float32))
    return _attend(
        q_BxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS, (*update, slot), block_s=block_s,
        split_s=split_s, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
    )  # fmt: skip


def decode_attention_ref(q_BxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS):
    """The same in f32 jnp (the einsum path's math; rows with no valid slot: zeros)."""
    b, n, h = q_BxNxH.shape
    kh = k_BxSxKxH.shape[2]
    q = q_BxNxH.reshape(b, kh, n // kh, h).astype(jnp.float32)
    s = jnp.einsum("bkgh,bskh->bkgs", q, k_BxSxKxH.astype(jnp.float32)) / math.sqrt(h)
    ok = valid_BxS[:, None, None, :]
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l_sum = jnp.sum(p, axis=-1, keepdims=True)
    p = (p / jnp.where(l_sum > 0, l_sum, 1.0)).astype(v_BxSxKxH.dtype)
    out = jnp.einsum("bkgs,bskh->bkgh", p.astype(jnp.float32), v_BxSxKxH.astype(jnp.float32))
    return out.reshape(b, n, h)
