"""Preallocated key/value cache for incremental decoding.

One entry per layer, ``k[i]`` / ``v[i]`` of shape [B, S, K, H] (S = capacity in slots), plus
``valid`` [B, S] (False for padding and unwritten slots) and ``index`` (next slot to write,
int32 scalar). A token's slot is its RoPE position; left padding only shifts every position of
a sequence by the same amount, which RoPE's relative form ignores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: tuple
    v: tuple
    valid: jax.Array
    index: jax.Array

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


def init_cache(cfg, batch: int, capacity: int, dtype=None) -> KVCache:
    if capacity > cfg.max_seq_len:
        raise ValueError(
            f"cache capacity {capacity} exceeds the model's context length {cfg.max_seq_len}"
        )
    dtype = dtype or cfg.jnp_dtype
    shape = (batch, capacity, cfg.n_kv_heads, cfg.head_width)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    return KVCache(
        k=zeros,
        v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
        valid=jnp.zeros((batch, capacity), bool),
        index=jnp.zeros((), jnp.int32),
    )
