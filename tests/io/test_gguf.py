"""GGUF import: a tiny model written with gguf-py (llama.cpp layout) reads back exactly."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from shrinkjax.io.errors import ModelFileError
from shrinkjax.io.gguf import read_gguf
from shrinkjax.io.hf import read_hf
from shrinkjax.io.load import load_model
from shrinkjax.models.params import model_from_params
from tests.conftest import GOLDEN

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


def _gpt2_bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _permute(w_OxI, n_head):
    """llama.cpp's converter permutation (the inverse of shrinkjax.io.gguf.unpermute_qk)."""
    o = w_OxI.shape[0]
    return (
        w_OxI.reshape(n_head, 2, o // n_head // 2, *w_OxI.shape[1:])
        .swapaxes(1, 2)
        .reshape(w_OxI.shape)
    )


def write_tiny_gguf(path, qtype="F32"):
    """tests/golden/tiny_llama (without RoPE scaling) as a llama.cpp-layout GGUF file."""
    import gguf

    cfg, params = read_hf(os.path.join(GOLDEN, "tiny_llama"))
    cfg = cfg.replace(rope_scaling=None)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_width)
    w.add_vocab_size(cfg.vocab_size)
    b2u = _gpt2_bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([b2u[i] for i in range(cfg.vocab_size)])
    w.add_token_merges([])
    w.add_token_types([3 if i < 3 else 1 for i in range(cfg.vocab_size)])
    w.add_eos_token_id(2)
    names = {
        "embed.embedding": "token_embd.weight",
        "norm.scale": "output_norm.weight",
        "lm_head.kernel": "output.weight",
    }
    blk = {
        "attn_norm.scale": "attn_norm",
        "mlp_norm.scale": "ffn_norm",
        "attn.q_proj.kernel": "attn_q",
        "attn.k_proj.kernel": "attn_k",
        "attn.v_proj.kernel": "attn_v",
        "attn.o_proj.kernel": "attn_output",
        "mlp.gate_proj.kernel": "ffn_gate",
        "mlp.up_proj.kernel": "ffn_up",
        "mlp.down_proj.kernel": "ffn_down",
    }
    for name, v in params.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            gname = f"blk.{i}.{blk[rest]}.weight"
        else:
            gname = names[name]
        v = np.asarray(v, np.float32)
        if name.endswith("kernel"):
            v = np.ascontiguousarray(v.T)  # [in, out] → GGUF/HF [out, in]
            if "q_proj" in name:
                v = _permute(v, cfg.n_heads)
            elif "k_proj" in name:
                v = _permute(v, cfg.n_kv_heads)
        qt = getattr(gguf.GGMLQuantizationType, qtype if v.ndim == 2 else "F32")
        if qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, v)
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, v.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(v, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg, params


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_roundtrip_against_hf(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    cfg, params = write_tiny_gguf(path, qtype)
    gcfg, gparams, _ = read_gguf(str(path), progress=False)
    assert gcfg.replace(norm_eps=cfg.norm_eps) == cfg  # GGUF stores eps as f32
    assert abs(gcfg.norm_eps - cfg.norm_eps) < 1e-9
    tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.25, "Q4_1": 0.2}[qtype]
    for k, v in params.items():
        err = np.abs(gparams[k] - v).max() / (np.abs(v).max() + 1e-9)
        assert err <= tol, (k, err)
    # and the model computes the same function as the HF checkpoint, within the format's noise
    ref = model_from_params(cfg, params)
    got = load_model(str(path), progress=False)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)))
    a, b = np.asarray(ref(toks)[0]), np.asarray(got.model(toks)[0])
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert rel <= {"F32": 1e-6, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 3e-2}.get(qtype, 0.35)
    assert got.tokenizer.decode(got.tokenizer.encode("hi there")) == "hi there"


def test_truncated_gguf_names_the_file_and_tensor(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match=r"cut\.gguf.*truncated"):
        read_gguf(str(cut), progress=False)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:100])
    with pytest.raises(ModelFileError, match="header.gguf"):
        read_gguf(str(header_only), progress=False)


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(str(tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelFileError, match="junk.gguf: not a readable GGUF"):
        load_model(str(junk))
    d = tmp_path / "empty_dir"
    d.mkdir()
    with pytest.raises(ModelFileError, match="neither shrinkjax_model.json"):
        load_model(str(d))


def test_smollm2_config_constant_matches_the_gguf():
    from shrinkjax.io.gguf import SMOLLM2_CONFIG, config_from_gguf, open_reader, smollm2_path

    path = smollm2_path()
    assert config_from_gguf(open_reader(path), path) == SMOLLM2_CONFIG
