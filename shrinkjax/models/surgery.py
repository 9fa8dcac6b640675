"""Students made from a teacher: drop decoder layers, or a smaller Llama from scratch; and the
check that a teacher and a student speak the same vocabulary.

Dropping layers keeps every other weight exactly (embeddings, final norm, head, the kept blocks
in order) and renumbers the kept blocks 0..n-1, so ``layers.18`` of a 30-layer teacher becomes
``layers.12`` of the 24-layer student made by dropping 12..17.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from shrinkjax.models.llama import Llama, LlamaConfig, init_model
from shrinkjax.models.params import flat_params, model_from_params

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


class VocabMismatchError(ValueError):
    """Teacher and student do not share a vocabulary/tokenizer: distillation is undefined."""


def parse_layers(spec) -> tuple[int, ...]:
    """Layer indices from ``(12, 13)``, ``"12-17"``, ``"3,5,7-9"`` or ``""`` (none)."""
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, str):
        out: list[int] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError(f"bad layer range {part!r}")
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        return tuple(out)
    return tuple(int(i) for i in spec)


def drop_layer_params(
    cfg: LlamaConfig, flat: dict, drop: Iterable[int]
) -> tuple[LlamaConfig, dict]:
    """(config, flat params) with the given decoder layers removed and the rest renumbered."""
    drop = sorted(set(parse_layers(drop)))
    bad = [i for i in drop if not 0 <= i < cfg.n_layers]
    if bad:
        raise ValueError(f"cannot drop layers {bad}: the model has layers 0..{cfg.n_layers - 1}")
    keep = [i for i in range(cfg.n_layers) if i not in drop]
    if not keep:
        raise ValueError("dropping every layer leaves no model")
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for name, v in flat.items():
        m = _LAYER.match(name)
        if m is None:
            out[name] = v
        elif int(m.group(1)) in new_index:
            out[f"layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = v
    return cfg.replace(n_layers=len(keep)), out


def drop_layers(model: Llama, drop: Iterable[int], dtype: str | None = None) -> Llama:
    """A new model: ``model`` without the given decoder layers (weights copied, not shared)."""
    cfg, flat = drop_layer_params(model.cfg, flat_params(model), drop)
    cfg = cfg.replace(dtype=dtype or cfg.dtype)
    return model_from_params(cfg, {k: np.array(v) for k, v in flat.items()}, source="surgery")


def scratch_config(teacher_cfg: LlamaConfig, **overrides) -> LlamaConfig:
    """A config like the teacher's with some sizes overridden (0/None = the teacher's)."""
    kw = {k: v for k, v in overrides.items() if v not in (0, None, "")}
    cfg = teacher_cfg.replace(**kw)
    if "head_dim" not in kw and ("dim" in kw or "n_heads" in kw):
        cfg = cfg.replace(head_dim=None)  # derive dim // n_heads
    return cfg


def check_compatible(
    teacher_cfg: LlamaConfig,
    student_cfg: LlamaConfig,
    teacher_tok=None,
    student_tok=None,
    where: str = "",
) -> None:
    """Raise :class:`VocabMismatchError` unless logits index the same tokens."""
    at = f" ({where})" if where else ""
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise VocabMismatchError(
            f"teacher and student vocabularies differ{at}: teacher vocab_size="
            f"{teacher_cfg.vocab_size}, student vocab_size={student_cfg.vocab_size}. Logit "
            "distillation compares distributions over the same token ids; use a student with "
            "the teacher's tokenizer (or sequence-level KD through text with your own tokenizer)."
        )
    if teacher_tok is not None and student_tok is not None:
        ft, fs = teacher_tok.fingerprint(), student_tok.fingerprint()
        if ft != fs:
            raise VocabMismatchError(
                f"teacher and student tokenizers differ{at} (fingerprints {ft} vs {fs}, "
                f"vocab sizes {teacher_tok.vocab_size} vs {student_tok.vocab_size}): the same "
                "id would mean different text. Use the teacher's tokenizer for the student."
            )


def build_student(teacher: Llama, scfg, teacher_tok=None, dtype: str = "float32"):
    """(student model, student tokenizer) from a ``student`` config section.

    ``scfg.init``: ``drop_layers`` (the teacher without ``scfg.drop_layers``), ``scratch`` (a
    fresh Llama with the teacher's vocabulary and ``scfg``'s sizes, seed ``scfg.seed``) or
    ``load`` (any :func:`shrinkjax.io.load.load_model` spec in ``scfg.spec``). A declared
    ``scfg.tokenizer`` (directory with ``tokenizer.json``) or a loaded student's own tokenizer
    is checked against the teacher's.
    """
    init = scfg.init
    student_tok = None
    if init == "drop_layers":
        student = drop_layers(teacher, parse_layers(scfg.drop_layers), dtype=dtype)
        student_tok = teacher_tok
    elif init == "scratch":
        sizes = {
            k: scfg.get(k, 0)
            for k in (
                "vocab_size",
                "dim",
                "n_layers",
                "n_heads",
                "n_kv_heads",
                "hidden_dim",
                "head_dim",
            )
        }
        cfg = scratch_config(teacher.cfg, **sizes).replace(dtype=dtype)
        check_compatible(teacher.cfg, cfg, where="student.init='scratch'")
        student = init_model(cfg, seed=int(scfg.get("seed", 0)))
        student_tok = teacher_tok
    elif init == "load":
        from shrinkjax.io.load import load_model

        if not scfg.spec:
            raise ValueError("student.init='load' needs student.spec (a model file/directory)")
        loaded = load_model(scfg.spec, dtype=dtype, progress=False)
        student, student_tok = loaded.model, loaded.tokenizer
    else:
        raise ValueError(f"student.init must be drop_layers, scratch or load; got {init!r}")
    if scfg.get("tokenizer", ""):
        from shrinkjax.io.tokenizer import TextTokenizer

        student_tok = TextTokenizer.load(scfg.tokenizer)
    check_compatible(
        teacher.cfg, student.cfg, teacher_tok, student_tok, where=f"student.init={init!r}"
    )
    return student, student_tok
