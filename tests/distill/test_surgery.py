"""Students from a teacher by dropping layers (exact weights, renumbered), from scratch."""

from __future__ import annotations

import numpy as np
import pytest
from ml_collections import ConfigDict

from shrinkjax.models.llama import LlamaConfig, init_model
from shrinkjax.models.params import flat_params
from shrinkjax.models.surgery import build_student, drop_layers, parse_layers


def test_parse_layers():
    assert parse_layers("12-17") == (12, 13, 14, 15, 16, 17)
    assert parse_layers("1,3-4") == (1, 3, 4)
    assert parse_layers((2, 5)) == (2, 5)
    assert parse_layers("") == ()


def test_drop_layers_keeps_exact_weights():
    cfg = LlamaConfig(
        vocab_size=32,
        dim=16,
        n_layers=5,
        n_heads=2,
        n_kv_heads=1,
        hidden_dim=24,
        tie_embeddings=False,
    )
    t = init_model(cfg, seed=3)
    s = drop_layers(t, "1-2")
    assert s.cfg.n_layers == 3
    ft, fs = flat_params(t), flat_params(s)
    for new, old in enumerate([0, 3, 4]):
        np.testing.assert_array_equal(
            fs[f"layers.{new}.mlp.up_proj.kernel"], ft[f"layers.{old}.mlp.up_proj.kernel"]
        )
    np.testing.assert_array_equal(fs["lm_head.kernel"], ft["lm_head.kernel"])
    assert not any(k.startswith("layers.3.") for k in fs)
    with pytest.raises(ValueError, match="cannot drop layers"):
        drop_layers(t, (7,))
    # the teacher is untouched and the student runs
    tok = np.arange(8)[None] % 32
    assert s(tok)[0].shape == (1, 8, 32)
    assert t.cfg.n_layers == 5


def test_build_student_scratch_and_drop():
    cfg = LlamaConfig(vocab_size=32, dim=16, n_layers=4, n_heads=2, n_kv_heads=1, hidden_dim=24)
    t = init_model(cfg)
    sc = ConfigDict(
        dict(
            init="scratch",
            drop_layers="",
            spec="",
            tokenizer="",
            vocab_size=0,
            dim=8,
            n_layers=2,
            n_heads=2,
            n_kv_heads=1,
            hidden_dim=16,
            head_dim=0,
            seed=1,
        )
    )
    s, _ = build_student(t, sc)
    assert (s.cfg.dim, s.cfg.n_layers, s.cfg.vocab_size, s.cfg.head_width) == (8, 2, 32, 4)
    sc.init = "drop_layers"
    sc.drop_layers = "0"
    s2, _ = build_student(t, sc)
    assert s2.cfg.n_layers == 3 and s2.cfg.dim == 16
    sc.init = "nope"
    with pytest.raises(ValueError, match="student.init"):
        build_student(t, sc)
