"""Preallocated key/value cache for incremental decoding, optionally quantized.

One entry per layer, ``k[i]`` / ``v[i]`` of logical shape [B, S, K, H] (S = capacity in slots),
plus ``valid`` [B, S] (False for padding and unwritten slots) and ``index`` (next slot to write,
int32 scalar). A token's slot is its RoPE position; left padding only shifts every position of
a sequence by the same amount, which RoPE's relative form ignores.

Quantized entries (:class:`QuantKV`) store each token's key/value per head in groups of ``group``
channels along H with one float32 scale per group (absmax, symmetric):

- ``int8``: codes int8 [B, S, K, H], value = code * scale, scale = absmax / 127;
- ``fp8_e4m3``: codes are float8_e4m3fn bit patterns (uint8) [B, S, K, H], value =
  fp8(code) * scale, scale = absmax / 448;
- ``int4``: codes uint8 [B, S, K, H/2], two 4-bit two's-complement codes in [-7, 7] per byte,
  channel 2j in the low nibble and 2j+1 in the high nibble; value = code * scale,
  scale = absmax / 7.

Scales are per (token, head, channel group), so a new token never rescales older ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

KV_FORMATS = ("int8", "fp8_e4m3", "int4")
_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0, "int4": 7.0}


@struct.dataclass
class QuantKV:
    codes: jax.Array
    scales: jax.Array  # [B, S, K, H // group] float32
    fmt: str = struct.field(pytree_node=False)
    group: int = struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def quantize_kv(x_BxLxKxH, fmt: str, group: int):
    """(codes, scales) of new tokens' keys or values."""
    b, l, k, h = x_BxLxKxH.shape
    xg = x_BxLxKxH.astype(jnp.float32).reshape(b, l, k, h // group, group)
    scale = jnp.max(jnp.abs(xg), axis=-1) / _QMAX[fmt]
    scale = jnp.where(scale == 0, 1.0, scale)
    y = xg / scale[..., None]
    if fmt == "int8":
        codes = jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8).reshape(b, l, k, h)
    elif fmt == "fp8_e4m3":
        codes = jax.lax.bitcast_convert_type(y.astype(jnp.float8_e4m3fn), jnp.uint8)
        codes = codes.reshape(b, l, k, h)
    else:  # int4, two's complement nibbles, even channel in the low nibble
        q = jnp.clip(jnp.round(y), -7, 7).astype(jnp.int8).reshape(b, l, k, h // 2, 2)
        nib = q.astype(jnp.uint8) & 0xF
        codes = nib[..., 0] | (nib[..., 1] << 4)
    return codes, scale


def dequantize_kv(q: QuantKV, dtype):
    b, s, k = q.codes.shape[:3]
    if q.fmt == "int8":
        x = q.codes.astype(jnp.float32)
    elif q.fmt == "fp8_e4m3":
        x = jax.lax.bitcast_convert_type(q.codes, jnp.float8_e4m3fn).astype(jnp.float32)
    else:
        lo = (q.codes & 0xF).astype(jnp.int8)
        hi = (q.codes >> 4).astype(jnp.int8)
        lo = jnp.where(lo > 7, lo - 16, lo)
        hi = jnp.where(hi > 7, hi - 16, hi)
        x = jnp.stack([lo, hi], -1).reshape(b, s, k, -1).astype(jnp.float32)
    h = x.shape[-1]
    xg = x.reshape(b, s, k, h // q.group, q.group) * q.scales[..., None]
    return xg.reshape(b, s, k, h).astype(dtype)


def cache_write(buf, x_BxLxKxH, index):
    """Write L new tokens at slots index.. of a dense or quantized cache entry."""
    if isinstance(buf, QuantKV):
        codes, scales = quantize_kv(x_BxLxKxH, buf.fmt, buf.group)
        return buf.replace(
            codes=jax.lax.dynamic_update_slice_in_dim(buf.codes, codes, index, 1),
            scales=jax.lax.dynamic_update_slice_in_dim(buf.scales, scales, index, 1),
        )
    return jax.lax.dynamic_update_slice_in_dim(buf, x_BxLxKxH.astype(buf.dtype), index, 1)


def cache_read(buf, dtype):
    return dequantize_kv(buf, dtype) if isinstance(buf, QuantKV) else buf.astype(dtype)


@struct.dataclass
class KVCache:
    k: tuple
    v: tuple
    valid: jax.Array
    index: jax.Array

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(getattr(x, "nbytes", 0) for x in (*self.k, *self.v))


def init_cache(
    cfg, batch: int, capacity: int, dtype=None, kv_format: str | None = None, group: int = 0
) -> KVCache:
    """An empty cache; ``kv_format`` in ``KV_FORMATS`` quantizes it (group 0 = whole head)."""
    if capacity > cfg.max_seq_len:
        raise ValueError(
            f"cache capacity {capacity} exceeds the model's context length {cfg.max_seq_len}"
        )
    h = cfg.head_width
    shape = (batch, capacity, cfg.n_kv_heads, h)

    def entry():
        if kv_format is None:
            return jnp.zeros(shape, dtype or cfg.jnp_dtype)
        if kv_format not in KV_FORMATS:
            raise ValueError(f"unknown kv_format {kv_format!r}; known: {KV_FORMATS}")
        g = group or h
        if h % g or (kv_format == "int4" and g % 2):
            raise ValueError(f"kv group {g} must divide head width {h} (and be even for int4)")
        cshape = shape if kv_format != "int4" else shape[:3] + (h // 2,)
        cdtype = jnp.int8 if kv_format == "int8" else jnp.uint8
        return QuantKV(
            codes=jnp.zeros(cshape, cdtype),
            scales=jnp.ones(shape[:3] + (h // g,), jnp.float32),
            fmt=kv_format,
            group=g,
        )

    return KVCache(
        k=tuple(entry() for _ in range(cfg.n_layers)),
        v=tuple(entry() for _ in range(cfg.n_layers)),
        valid=jnp.zeros((batch, capacity), bool),
        index=jnp.zeros((), jnp.int32),
    )
