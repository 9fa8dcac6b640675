"""NF4, 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized
LLMs", §3 and Appendix E), with optional double quantization of the scales.

Code values: ``code c in 0..15`` means ``NF4_VALUES[c] * absmax`` with the 16 ascending values
below (c = 0 is -1.0, c = 7 is exactly 0, c = 15 is +1.0). They are the QLoRA quantiles:
8 positive quantiles of N(0, 1) at probabilities evenly spaced from 0.9677083 down to 0.5
(exclusive), 7 negative ones likewise, plus 0, normalized to [-1, 1] (test-checked against
that construction). Elements round to the nearest value (midpoint ties go to the lower code).

Blocks: ``absmax`` of each block of ``group_size`` (default 64, QLoRA's) consecutive input rows
of one output column n -- the same elements bitsandbytes blocks for a torch ``[out, in]``
weight. Codes: 4 bits, two per byte along K, low nibble = even row (``shrinkjax.quant.array``).

Scales (``scales [K/G, N]``):

* ``double_quant=False``: absmax in ``scale_dtype`` (float32 default, as QLoRA; rounded up).
* ``double_quant=True`` (QLoRA "DQ"): absmax values are quantized to FP8 E4M3 (uint8 bit
  patterns, ``shrinkjax.quant.formats.fp8``) in blocks of 256 consecutive *output columns* of
  one K-group (the last block of a row may be shorter: ``ceil(N/256)`` blocks), each with an
  f32 offset (block mean of absmax, ``zeros2 [K/G, ceil(N/256)]``) and f32 second-level scale
  (``scales2``, max |absmax - offset| / 448). Effective absmax
  ``= zeros2 + scales2 * e4m3(scales)``. The FP8 value is rounded *up* (toward +inf), so the
  effective absmax is never below the true one: no element clips and it can never turn
  negative. QLoRA/bitsandbytes use one tensor-wide offset and run the 256-blocks over the
  flattened scales; blocks along N keep every K-group self-contained, which GPTQ's row-by-row
  fitting needs. Costs 8/64 + 64/(64*256) = 0.129 bits per weight instead of 0.5 (f32).

Bytes = ``K*N/2 + (K/G)*N*4`` or, with DQ, ``K*N/2 + (K/G)*N + (K/G)*ceil(N/256)*8``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from shrinkjax.quant.formats import Format, reduce_groups, register, store_scale
from shrinkjax.quant.formats.fp8 import E4M3, decode_fp8, encode_fp8

# QLoRA Appendix E (float32), ascending; index = 4-bit code.
NF4_VALUES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
_MIDPOINTS = ((NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2).astype(np.float32)
DQ_BLOCK = 256  # scales per second-level block (QLoRA)


@jax.jit
def nf4_encode(v):
    """4-bit codes (uint8) of values ``v`` in units of absmax (nearest NF4 value)."""
    v = jnp.asarray(v, jnp.float32)
    code = jnp.zeros(v.shape, jnp.uint8)
    for mid in _MIDPOINTS:  # 15 fused compares; no [.., 16] temporaries
        code = code + (v > mid).astype(jnp.uint8)
    return code


@jax.jit
def nf4_decode(codes):
    return jnp.asarray(NF4_VALUES)[jnp.asarray(codes).astype(jnp.int32)]


def _blocks_along_n(a_gxN, block: int):
    """Pad [g, N] to [g, nb, block] plus a validity mask."""
    g, n = a_gxN.shape
    nb = -(-n // block)
    pad = nb * block - n
    a = jnp.pad(a_gxN, ((0, 0), (0, pad))).reshape(g, nb, block)
    mask = jnp.pad(jnp.ones((g, n), bool), ((0, 0), (0, pad))).reshape(g, nb, block)
    return a, mask


def _repeat_along_n(b_gxNB, n: int, block: int):
    return jnp.repeat(b_gxNB, block, axis=1)[:, :n]


def double_quantize(absmax_gxN):
    """QLoRA-style DQ of f32 absmax ``[g, N]`` -> (e4m3 codes [g, N], scales2, zeros2 [g, nb])."""
    g, n = absmax_gxN.shape
    a, mask = _blocks_along_n(absmax_gxN, DQ_BLOCK)
    count = jnp.sum(mask, axis=2)
    offset = jnp.sum(jnp.where(mask, a, 0.0), axis=2) / count  # [g, nb]
    dev = jnp.where(mask, a - offset[..., None], 0.0)
    s2 = jnp.max(jnp.abs(dev), axis=2) / E4M3.fmax
    s2 = jnp.where(s2 > 0, s2, 1.0)
    v = jnp.clip(dev / s2[..., None], -E4M3.fmax, E4M3.fmax)
    codes = encode_fp8(v, E4M3, mode="up").reshape(g, -1)[:, :n]
    return codes, s2, offset


def double_dequantize(codes_gxN, scales2, zeros2):
    n = codes_gxN.shape[1]
    s2 = _repeat_along_n(scales2.astype(jnp.float32), n, DQ_BLOCK)
    off = _repeat_along_n(zeros2.astype(jnp.float32), n, DQ_BLOCK)
    return jnp.maximum(off + s2 * decode_fp8(codes_gxN, E4M3), 0.0)


class NF4Format(Format):
    bits = 4
    default_granularity = "group"
    default_group_size = 64
    default_scale_dtype = "float32"
    supports_double_quant = True

    def _resolve(self, spec):
        spec = super()._resolve(spec)
        if spec.double_quant and spec.scale_dtype != "float32":
            raise ValueError(
                f"nf4: double_quant stores FP8 scales; scale_dtype={spec.scale_dtype} conflicts"
            )
        return spec

    @property
    def qparam_keys(self):
        return ("scales", "scales2", "zeros2") if self.spec.double_quant else ("scales",)

    def _fit(self, x, tensor_amax):
        amax = reduce_groups(jnp.abs(x), jnp.max, self.spec.granularity == "tensor")
        if not self.spec.double_quant:
            return {"scales": store_scale(amax, self.spec.scale_dtype)}
        codes, s2, offset = double_quantize(amax)
        return {"scales": codes, "scales2": s2, "zeros2": offset}

    def _effective(self, qp):
        if not self.spec.double_quant:
            return qp["scales"].astype(jnp.float32), None
        return double_dequantize(qp["scales"], qp["scales2"], qp["zeros2"]), None

    def _check_qparams(self, qparams, n):
        qp = super()._check_qparams(qparams, n)
        if self.spec.double_quant:
            nc = qp["scales"].shape[1]
            nb = -(-nc // DQ_BLOCK)
            for key in ("scales2", "zeros2"):
                if qp[key].shape != (qp["scales"].shape[0], nb):
                    raise ValueError(
                        f"nf4: qparams[{key!r}] has shape {qp[key].shape}, expected "
                        f"{(qp['scales'].shape[0], nb)} for scales of shape {qp['scales'].shape}"
                    )
        return qp

    def _encode_elems(self, v, zero):
        return nf4_encode(v)

    def _decode_elems(self, codes, zero):
        return nf4_decode(codes)


register("nf4")(NF4Format)
