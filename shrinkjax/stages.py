"""The stage registry: a run is an ordered list of named stages over one shared context.

A stage is ``fn(ctx: RunContext) -> dict`` (its results, saved as
``<workdir>/results/<stage>.json``). Stages read their own config section (``ctx.config.<name>``)
and put models/tokenizers in ``ctx.state`` for later stages. Unknown names fail loudly.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

_STAGES: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        if name in _STAGES:
            raise ValueError(f"stage {name!r} registered twice")
        _STAGES[name] = fn
        return fn

    return deco


def get(name: str) -> Callable:
    _import_builtin_stages()
    if name not in _STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(sorted(_STAGES))}")
    return _STAGES[name]


def names() -> list[str]:
    _import_builtin_stages()
    return sorted(_STAGES)


def _import_builtin_stages():
    # Each module registers its stages on import; a missing optional module is not an error.
    import importlib

    for mod in (
        "shrinkjax.stages_core",
        "shrinkjax.quant.stage",
        "shrinkjax.sparse.stage",
        "shrinkjax.distill.stage",
    ):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


@dataclasses.dataclass
class RunContext:
    config: object  # ml_collections.ConfigDict (locked)
    workdir: str
    state: dict = dataclasses.field(default_factory=dict)  # model, tokenizer, teacher, ...
    results: dict = dataclasses.field(default_factory=dict)  # stage name -> results dict

    def path(self, *parts: str) -> str:
        p = os.path.join(self.workdir, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    @property
    def progress(self) -> bool:
        return bool(self.config.get("progress", True))
