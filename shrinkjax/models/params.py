"""Flat ``"a.b.0.c"`` path views of a model's parameters (what rules and loaders speak)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from shrinkjax.models.llama import Llama, LlamaConfig, abstract_model


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", k)))


def flat_params(model: nnx.Module) -> dict[str, object]:
    """{'layers.0.attn.q_proj.kernel': value, ...}; values may be compressed pytrees."""
    state = nnx.state(model, nnx.Param)
    return {".".join(_key(k) for k in path): v.value for path, v in nnx.to_flat_state(state)}


def nest(flat: dict[str, object]) -> dict:
    """{'layers.0.attn.q_proj.kernel': x} -> {'layers': {0: {'attn': ...}}} (NNX pure dict)."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _few(names: list[str], n: int = 5) -> str:
    return str(names[:n]) + ("…" if len(names) > n else "")


def model_from_params(cfg: LlamaConfig, flat: dict[str, object], *, source: str = "") -> Llama:
    """Build a model whose parameters are exactly ``flat``; names and shapes are checked."""
    abstract = abstract_model(cfg)
    graphdef, state = nnx.split(abstract)
    want = {k: v.shape for k, v in flat_params(abstract).items()}
    where = f" in {source}" if source else ""
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    if missing or extra:
        raise ValueError(
            f"parameter names do not match the model{where}: "
            f"missing {_few(missing)}, unexpected {_few(extra)}"
        )
    for k, shape in want.items():
        got = tuple(getattr(flat[k], "shape", ()))
        if got != tuple(shape):
            raise ValueError(f"parameter {k}{where} has shape {got}, the config implies {shape}")
    dtype = cfg.jnp_dtype

    def cast(v):  # matrices take the compute dtype; norms and biases stay f32
        if isinstance(v, np.ndarray | jax.Array):
            return jax.numpy.asarray(v, dtype if v.ndim >= 2 else np.float32)
        return v

    state.replace_by_pure_dict(nest({k: cast(v) for k, v in flat.items()}))
    return nnx.merge(graphdef, state)


def param_count(model: nnx.Module) -> int:
    """Logical parameter count (compressed weights count their logical size)."""
    return int(sum(np.prod(getattr(v, "shape", ())) for v in flat_params(model).values()))
