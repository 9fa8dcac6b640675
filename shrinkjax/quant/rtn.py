"""Round-to-nearest (RTN) quantization of a flat parameter dict by rules.

RTN is the data-free baseline every calibrated method (GPTQ, AWQ) is compared against: each
matched kernel ``[K, N]`` is quantized independently with its format's ``quantize``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from shrinkjax.quant import formats
from shrinkjax.quant.array import QuantizedArray
from shrinkjax.quant.rules import MatchReport, Rule, match


@dataclasses.dataclass
class QuantizeReport:
    match: MatchReport
    quantized: dict[str, str]  # path -> spec description
    bytes_before: int  # stored bytes of the quantized parameters before (their float dtype)
    bytes_after: int  # ... and after
    n_weights: int  # logical elements of the quantized parameters

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per quantized weight (0 when nothing was quantized)."""
        return self.bytes_after * 8 / self.n_weights if self.n_weights else 0.0


def _nbytes(v) -> int:
    return int(math.prod(v.shape)) * np.dtype(v.dtype).itemsize


def quantize_params(
    flat_params: Mapping[str, Any], rules: Sequence[Rule]
) -> tuple[dict[str, Any], QuantizeReport]:
    """``{path: array}`` -> same dict with matched 2-D kernels replaced by QuantizedArrays.

    Unmatched, skipped and ineligible values are passed through unchanged. Raises a
    ValueError naming the path when a matched kernel cannot take its spec (e.g. K not a
    multiple of the group size)."""
    assigned, report = match(rules, flat_params)
    out = dict(flat_params)
    before = after = weights = 0
    quantized = {}
    for path, spec in assigned.items():
        w = flat_params[path]
        try:
            fmt = formats.make(spec)
            q = fmt.quantize(w)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"cannot quantize {path} (shape {tuple(w.shape)}) as {spec}: {e}"
            ) from e
        assert isinstance(q, QuantizedArray)
        out[path] = q
        quantized[path] = fmt.spec.describe()
        before += _nbytes(w)
        after += q.nbytes
        weights += q.size
    logging.info(
        "RTN: quantized %d kernels, %.1f MiB -> %.1f MiB",
        len(quantized),
        before / 2**20,
        after / 2**20,
    )
    return out, QuantizeReport(report, quantized, before, after, weights)
