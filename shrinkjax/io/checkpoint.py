"""shrinkjax model checkpoints: config + tokenizer + weights (orbax), compressed weights packed.

Layout of a checkpoint directory (written atomically: a failed save leaves no directory)::

    shrinkjax_model.json   {"format": 1, "config": LlamaConfig, "weights": {path: encoding}, "meta"}
    tokenizer.json, tokenizer_meta.json
    params/                orbax checkpoint of {path: array | {field: array}}

Compressed weight types (``QuantizedArray``, N:M sparse, ...) are dataclass pytrees: their array
fields go to orbax as they are stored (packed bytes stay packed, so checkpoint bytes equal
memory bytes) and their static fields go to the JSON as metadata. Types register themselves
with :func:`register_weight_type` so a checkpoint can be rebuilt without pickles.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from shrinkjax.io.errors import ModelFileError
from shrinkjax.io.files import atomic_dir

FORMAT = 1
_WEIGHT_TYPES: dict[str, type] = {}


def register_weight_type(cls: type) -> type:
    """Class decorator: make a dataclass weight type restorable from checkpoints."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass to be checkpointed")
    _WEIGHT_TYPES[cls.__name__] = cls
    return cls


def _is_array(v) -> bool:
    return isinstance(v, jax.Array | np.ndarray)


def _encode(v):
    """(arrays pytree for orbax, JSON encoding) of a weight."""
    if _is_array(v):
        return v, {"type": "array"}
    if dataclasses.is_dataclass(v) and type(v).__name__ in _WEIGHT_TYPES:
        arrays, fields = {}, {}
        for f in dataclasses.fields(v):
            x = getattr(v, f.name)
            if _is_array(x) or dataclasses.is_dataclass(x):
                arrays[f.name], fields[f.name] = _encode(x)
            else:
                fields[f.name] = {"type": "static", "value": _jsonable(x)}
        return arrays, {"type": type(v).__name__, "fields": fields}
    raise TypeError(
        f"cannot checkpoint weight of type {type(v).__name__}: "
        "register it with shrinkjax.io.checkpoint.register_weight_type"
    )


def _jsonable(x):
    if isinstance(x, tuple):
        return {"tuple": [_jsonable(i) for i in x]}
    if isinstance(x, np.dtype) or (isinstance(x, type) and issubclass(x, np.generic)):
        return {"dtype": np.dtype(x).name}
    if hasattr(x, "dtype") and not hasattr(x, "shape"):
        return {"dtype": np.dtype(x).name}
    json.dumps(x)  # raises on anything else non-JSON
    return x


def _unjson(x):
    if isinstance(x, dict) and "tuple" in x:
        return tuple(_unjson(i) for i in x["tuple"])
    if isinstance(x, dict) and "dtype" in x:
        import jax.numpy as jnp

        return jnp.dtype(x["dtype"])
    return x


def _decode(arrays, enc):
    if enc["type"] == "array":
        return arrays
    cls = _WEIGHT_TYPES.get(enc["type"])
    if cls is None:
        raise ValueError(f"unknown weight type {enc['type']!r}; import the module defining it")
    kw = {}
    for name, fe in enc["fields"].items():
        kw[name] = _unjson(fe["value"]) if fe["type"] == "static" else _decode(arrays[name], fe)
    return cls(**kw)


def save_checkpoint(directory: str, model, tokenizer=None, meta: dict | None = None) -> None:
    """Save ``model`` (dense or compressed weights) and its tokenizer under ``directory``."""
    import orbax.checkpoint as ocp

    from shrinkjax.models.params import flat_params

    flat = flat_params(model)
    arrays, encodings = {}, {}
    for path, v in flat.items():
        node = arrays
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf], encodings[path] = _encode(v)
    manifest = {
        "format": FORMAT,
        "config": model.cfg.to_dict(),
        "weights": encodings,
        "meta": meta or {},
    }
    with atomic_dir(directory) as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(tmp, "params"), arrays)
        ckpt.wait_until_finished()
        with open(os.path.join(tmp, "shrinkjax_model.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if tokenizer is not None:
            tokenizer.save(tmp)


def load_checkpoint(directory: str, dtype: str | None = None):
    """(model, tokenizer or None) from a directory written by :func:`save_checkpoint`."""
    import orbax.checkpoint as ocp

    from shrinkjax.io.tokenizer import TextTokenizer
    from shrinkjax.models.llama import LlamaConfig
    from shrinkjax.models.params import model_from_params

    _import_weight_types()
    mpath = os.path.join(directory, "shrinkjax_model.json")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(mpath, f"unreadable checkpoint manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ModelFileError(mpath, f"checkpoint format {manifest.get('format')} != {FORMAT}")
    cfg = LlamaConfig.from_dict(manifest["config"])
    if dtype:
        cfg = cfg.replace(dtype=dtype)
    try:
        restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
    except Exception as e:
        raise ModelFileError(directory, f"cannot restore params ({type(e).__name__}: {e})") from e
    flat = {}
    for path, enc in manifest["weights"].items():
        node = restored
        for part in path.split("."):
            node = node[part]
        flat[path] = _decode(node, enc)
    has_tok = os.path.isfile(os.path.join(directory, "tokenizer.json"))
    tok = TextTokenizer.load(directory) if has_tok else None
    return model_from_params(cfg, flat, source=directory), tok


def _import_weight_types():
    import importlib

    for mod in (
        "shrinkjax.quant.array",
        "shrinkjax.sparse.array",
        "shrinkjax.quant.smoothquant",
        "shrinkjax.quant.llm_int8",
    ):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
