"""Which parameters get which quantization: ordered ``(regex, spec_or_None)`` rules (the qwix
idea) over flat parameter paths such as ``layers.3.attn.q_proj.kernel``.

* Patterns are matched with :func:`re.fullmatch` against the whole path.
* The first rule that matches a path decides it: a :class:`QuantSpec` (or a format name, short
  for ``QuantSpec(name)``) quantizes it, ``None`` keeps it in float.
* Only 2-D kernels are candidates when values (or shapes) are given: vectors (norm scales,
  biases) and already-compressed values never match and are listed as ``ineligible``.
* A rule that matched no candidate is reported (and logged with absl) -- usually a typo.

:data:`KEEP_FLOAT` keeps the embedding table and the output head in float, as is customary
(both are large-vocabulary lookups/projections that are quantization-sensitive);
:func:`default_rules` appends "every other kernel gets ``spec``".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from shrinkjax.quant.array import QuantSpec

Rule = tuple[str, QuantSpec | str | None]

KEEP_FLOAT: tuple[Rule, ...] = ((r"embed\..*", None), (r"lm_head\..*", None))


def default_rules(spec: QuantSpec | str) -> list[Rule]:
    """Embeddings and LM head in float; every other ``*.kernel`` quantized with ``spec``."""
    return [*KEEP_FLOAT, (r".*\.kernel", spec)]


@dataclasses.dataclass
class MatchReport:
    """What :func:`match` decided, for logging and for callers to assert on."""

    rule_hits: list[tuple[str, int]]  # (pattern, number of paths it decided), in rule order
    unused_rules: list[str]  # patterns that decided no path
    skipped: list[str]  # paths decided by a None rule (kept float on purpose)
    unmatched: list[str]  # candidate paths no rule matched (kept float)
    ineligible: list[str]  # paths that are not 2-D float arrays (never quantized)


def _compile(rules: Sequence[Rule]) -> list[tuple[re.Pattern, QuantSpec | None]]:
    if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
        raise TypeError(f"rules must be a list of (regex, spec_or_None) pairs, got {type(rules)}")
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2):
            raise TypeError(f"rule {i} must be a (regex, spec_or_None) pair, got {rule!r}")
        pattern, spec = rule
        try:
            rx = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"rule {i}: invalid regex {pattern!r}: {e}") from e
        if isinstance(spec, str):
            spec = QuantSpec(format=spec)
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(f"rule {i} ({pattern!r}): spec must be a QuantSpec, str or None")
        out.append((rx, spec))
    return out


def is_candidate(value: Any) -> bool:
    """A 2-D floating-point array (or shape-dtype struct)."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if not isinstance(value, np.ndarray | jax.Array | jax.ShapeDtypeStruct):
        return False
    return len(shape) == 2 and jnp.issubdtype(dtype, jnp.floating)  # np's misses bfloat16


def match(
    rules: Sequence[Rule], params: Mapping[str, Any] | Iterable[str]
) -> tuple[dict[str, QuantSpec], MatchReport]:
    """Assign specs to paths: returns ``({path: spec}, report)`` for the quantized paths.

    ``params`` is either a flat ``{path: value}`` mapping (then only 2-D float arrays are
    candidates) or just an iterable of paths (all are candidates).
    """
    compiled = _compile(rules)
    if isinstance(params, Mapping):
        paths = list(params)
        ineligible = [p for p in paths if not is_candidate(params[p])]
        bad = set(ineligible)
        candidates = [p for p in paths if p not in bad]
    else:
        candidates, ineligible = list(params), []
    hits = [0] * len(compiled)
    assigned: dict[str, QuantSpec] = {}
    skipped, unmatched = [], []
    for path in candidates:
        for i, (rx, spec) in enumerate(compiled):
            if rx.fullmatch(path):
                hits[i] += 1
                if spec is None:
                    skipped.append(path)
                else:
                    assigned[path] = spec
                break
        else:
            unmatched.append(path)
    rule_hits = [(rx.pattern, h) for (rx, _), h in zip(compiled, hits, strict=True)]
    unused = [pat for pat, h in rule_hits if h == 0]
    for pat in unused:
        logging.warning("quantization rule '%s' matched no 2-D parameter", pat)
    logging.info(
        "quantization rules: %d quantized, %d kept float by rule, %d unmatched, %d ineligible",
        len(assigned),
        len(skipped),
        len(unmatched),
        len(ineligible),
    )
    report = MatchReport(rule_hits, unused, skipped, unmatched, ineligible)
    return assigned, report
