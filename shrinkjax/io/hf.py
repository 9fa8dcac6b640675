"""Hugging Face checkpoint directories: ``config.json`` + ``*.safetensors`` (+ ``tokenizer.json``).

Supports Llama, Mistral, Qwen2 and SmolLM (all ``LlamaForCausalLM``-shaped). Weights are read
with ``safetensors`` (never pickle), sharded checkpoints through ``model.safetensors.index.json``.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from shrinkjax.io.errors import ModelFileError
from shrinkjax.models.llama import LlamaConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "smollm")

_BLOCK = {
    "input_layernorm.weight": "attn_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    "self_attn.q_proj.weight": "attn.q_proj.kernel",
    "self_attn.k_proj.weight": "attn.k_proj.kernel",
    "self_attn.v_proj.weight": "attn.v_proj.kernel",
    "self_attn.o_proj.weight": "attn.o_proj.kernel",
    "self_attn.q_proj.bias": "attn.q_proj.bias",
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "mlp.gate_proj.weight": "mlp.gate_proj.kernel",
    "mlp.up_proj.weight": "mlp.up_proj.kernel",
    "mlp.down_proj.weight": "mlp.down_proj.kernel",
}
_TOP = {
    "model.embed_tokens.weight": "embed.embedding",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "lm_head.kernel",
}


def config_from_hf(d: dict, path: str = "") -> LlamaConfig:
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ModelFileError(path, f"model_type {mt!r} is not supported ({SUPPORTED_MODEL_TYPES})")
    try:
        n_heads = int(d["num_attention_heads"])
        # transformers v5 writes rope_parameters {rope_theta, rope_type, ...}; v4 rope_theta +
        # rope_scaling. Both are accepted.
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        return LlamaConfig(
            vocab_size=int(d["vocab_size"]),
            dim=int(d["hidden_size"]),
            n_layers=int(d["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            hidden_dim=int(d["intermediate_size"]),
            head_dim=d.get("head_dim") or int(d["hidden_size"]) // n_heads,
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", mt == "qwen2")),
        )
    except KeyError as e:
        raise ModelFileError(path, f"missing key {e.args[0]!r}") from e


def _weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(directory, s) for s in shards]
        for f_ in files:
            if not os.path.isfile(f_):
                raise ModelFileError(f_, "shard named in model.safetensors.index.json is missing")
        return files
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ModelFileError(directory, "no *.safetensors files (pickled .bin is never loaded)")
    return files


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except Exception as e:
        raise ModelFileError(path, f"unreadable or truncated safetensors ({e})") from e
    return out


def _read_bf16_safe(path: str) -> dict[str, np.ndarray]:
    """numpy has no bfloat16: read such files through ml_dtypes' view of the raw bytes."""
    try:
        return _read_safetensors(path)
    except ModelFileError as e:
        if "bfloat16" not in str(e).lower() and "bf16" not in str(e).lower():
            raise
    import struct

    import ml_dtypes

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        size = os.path.getsize(path)
        out = {}
        for k, meta in header.items():
            if k == "__metadata__":
                continue
            lo, hi = meta["data_offsets"]
            if base + hi > size:
                raise ModelFileError(path, f"truncated: tensor {k} ends at {base + hi} > {size}")
            dt = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}[meta["dtype"]]
            f.seek(base + lo)
            out[k] = np.frombuffer(f.read(hi - lo), dt).reshape(meta["shape"])
    return out


def read_hf(directory: str):
    """(LlamaConfig, {shrinkjax path: float32 array}) from a Hugging Face directory."""
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelFileError(cfg_path, "no such file")
    try:
        with open(cfg_path) as f:
            cfg = config_from_hf(json.load(f), cfg_path)
    except json.JSONDecodeError as e:
        raise ModelFileError(cfg_path, f"invalid JSON ({e})") from e
    params: dict[str, np.ndarray] = {}
    for path in _weight_files(directory):
        for k, v in _read_bf16_safe(path).items():
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k)
            if m:
                sub = _BLOCK.get(m.group(2))
                name = f"layers.{m.group(1)}.{sub}" if sub else None
            else:
                name = _TOP.get(k)
            if name is None:
                if "rotary_emb" in k:
                    continue
                raise ModelFileError(path, f"unexpected tensor {k!r}")
            v = np.asarray(v, np.float32)
            params[name] = np.ascontiguousarray(v.T) if name.endswith("kernel") else v
    if cfg.tie_embeddings:
        params.pop("lm_head.kernel", None)
    return cfg, params
