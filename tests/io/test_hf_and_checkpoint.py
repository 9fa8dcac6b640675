"""Hugging Face directories (incl. sharded), truncated files, shrinkjax checkpoints."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.io.checkpoint import load_checkpoint, save_checkpoint
from shrinkjax.io.errors import ModelFileError
from shrinkjax.io.load import load_model
from tests.conftest import GOLDEN

TINY = os.path.join(GOLDEN, "tiny_llama")


def _logits(model, seed=0):
    toks = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (2, 12))
    return np.asarray(model(jnp.asarray(toks))[0])


def test_sharded_safetensors_index(tmp_path, tiny_llama):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(TINY, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(os.path.join(TINY, "config.json"), d)
    save_file({k: tensors[k] for k in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    wm = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    got = load_model(str(d), progress=False)
    np.testing.assert_array_equal(_logits(got.model), _logits(tiny_llama.model))
    assert got.tokenizer is None  # no tokenizer.json in this directory
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(ModelFileError, match="model-00002-of-00002.safetensors.*missing"):
        load_model(str(d))


def test_truncated_safetensors_and_missing_config(tmp_path):
    d = tmp_path / "cut"
    shutil.copytree(TINY, d)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-5000])
    with pytest.raises(ModelFileError, match=r"model\.safetensors: unreadable or truncated"):
        load_model(str(d))
    os.remove(d / "config.json")
    with pytest.raises(ModelFileError, match="neither shrinkjax_model.json"):
        load_model(str(d))


def test_bad_config_json_names_key(tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(TINY, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="config.json: missing key 'hidden_size'"):
        load_model(str(d))
    cfg["hidden_size"] = 64
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="model_type 'gpt_neox' is not supported"):
        load_model(str(d))


def test_checkpoint_roundtrip_is_exact(tmp_path, tiny_llama):
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, tiny_llama.model, tiny_llama.tokenizer, meta={"note": "x"})
    model, tok = load_checkpoint(path)
    np.testing.assert_array_equal(_logits(model), _logits(tiny_llama.model))
    assert tok.encode("abc") == tiny_llama.tokenizer.encode("abc")
    assert load_model(path).name == "ckpt"


def test_failed_save_leaves_nothing(tmp_path, tiny_llama):
    class Broken:
        def save(self, directory):
            raise OSError("disk full")

    path = tmp_path / "ckpt"
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(path), tiny_llama.model, Broken())
    assert os.listdir(tmp_path) == []
