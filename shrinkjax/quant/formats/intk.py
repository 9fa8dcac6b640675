"""Integer k-bit formats ``int2``, ``int3``, ``int4``, ``int8`` (the GPTQ / AWQ weight grids).

Groups of G input rows (along K) share one scale per output column n (or per tensor). With
``qmax = 2**(k-1) - 1`` and ``L = 2**k - 1``:

* symmetric (absmax): ``scale = max|w| / qmax``; ``q = clip(round(w / scale), -qmax, qmax)``;
  stored code ``c = q + 2**(k-1)`` in ``[1, L]`` (offset binary; code 0 is unused so the grid
  is symmetric, e.g. int4 holds -7..7 as codes 1..15, zero = code 8). Dequant
  ``w = (c - 2**(k-1)) * scale``.
* asymmetric (min-max): the range is widened to contain 0 (``lo = min(min w, 0)``,
  ``hi = max(max w, 0)``), ``scale = (hi - lo) / L``, integer zero point
  ``z = clip(round(-lo / scale), 0, L)``; ``c = clip(round(w / scale) + z, 0, L)``.
  Dequant ``w = (c - z) * scale``. Zero is exactly representable.

Rounding is round-half-to-even. Storage (see ``shrinkjax.quant.array`` for the packing of
codes along K): codes k bits each (int3 densely, 8 codes in 3 bytes); ``scales`` in
``scale_dtype`` (default float16, as GPTQ/AWQ checkpoints; rounded *up*, so no element clips
and ``|w - dequant(w)| <= scale / 2``); ``zeros`` uint8 (one byte per group and column).
Bytes = ``k * K * N / 8 + ceil(K / G) * N * (scale bytes [+ 1])``.

K need not be a multiple of G (AutoGPTQ / AWQ "ragged" groups): there are ``ceil(K / G)``
groups and the last holds the remaining ``K - (ceil(K / G) - 1) * G`` rows (SmolLM2's
K = 576 at G = 128: 4 groups of 128 and one of 64), fitted on those rows alone. K must still be
a multiple of the packing unit.
Scales must fit the scale dtype (float16: ``max|w| < 65504 * qmax``).
"""

from __future__ import annotations

import jax.numpy as jnp

from shrinkjax.quant.formats import Format, reduce_groups, register, store_scale


class IntFormat(Format):
    default_granularity = "group"
    default_group_size = 128
    default_scale_dtype = "float16"
    supports_asymmetric = True
    ragged_groups = True

    def __init__(self, spec, bits: int):
        self.bits = bits
        super().__init__(spec)
        self.levels = (1 << bits) - 1  # L: largest code
        self.qmax = (1 << (bits - 1)) - 1
        self.mid = 1 << (bits - 1)

    @property
    def qparam_keys(self):
        return ("scales",) if self.spec.symmetric else ("scales", "zeros")

    def _fit(self, x, tensor_amax):
        per_tensor = self.spec.granularity == "tensor"
        if self.spec.symmetric:
            amax = reduce_groups(jnp.abs(x), jnp.max, per_tensor)
            return {"scales": store_scale(amax / self.qmax, self.spec.scale_dtype)}
        lo = jnp.minimum(reduce_groups(x, jnp.min, per_tensor), 0.0)
        hi = jnp.maximum(reduce_groups(x, jnp.max, per_tensor), 0.0)
        scales = store_scale((hi - lo) / self.levels, self.spec.scale_dtype)
        zeros = jnp.clip(jnp.round(-lo / scales.astype(jnp.float32)), 0, self.levels)
        return {"scales": scales, "zeros": zeros.astype(jnp.uint8)}

    def _effective(self, qp):
        zero = None if self.spec.symmetric else qp["zeros"].astype(jnp.float32)
        return qp["scales"].astype(jnp.float32), zero

    def _encode_elems(self, v, zero):
        if zero is None:
            q = jnp.clip(jnp.round(v), -self.qmax, self.qmax) + self.mid
        else:
            q = jnp.clip(jnp.round(v) + zero, 0, self.levels)
        return q.astype(jnp.uint8)

    def _decode_elems(self, codes, zero):
        c = codes.astype(jnp.float32)
        return c - (self.mid if zero is None else zero)


def _factory(bits: int):
    return lambda spec: IntFormat(spec, bits)


for _bits in (2, 3, 4, 8):
    register(f"int{_bits}")(_factory(_bits))
