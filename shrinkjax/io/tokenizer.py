"""Tokenizers: the BPE tokenizer stored inside a GGUF, or a Hugging Face ``tokenizer.json``.

Both become a ``tokenizers.Tokenizer`` wrapped in :class:`TextTokenizer`, which also keeps the
special token ids and the chat template, and saves itself as ``tokenizer.json`` +
``tokenizer_meta.json`` inside shrinkjax checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os

from shrinkjax.io.errors import ModelFileError

# Pre-tokenizer split patterns of llama.cpp's BPE "pre" types (GPT-2 style regexes).
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass
class TextTokenizer:
    tok: object  # tokenizers.Tokenizer
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        """Stable hash of the vocabulary + merges (token caches are keyed by it)."""
        import hashlib

        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str) -> None:
        self.tok.save(os.path.join(directory, "tokenizer.json"))
        meta = {k: getattr(self, k) for k in ("bos_id", "eos_id", "pad_id", "add_bos")}
        meta["chat_template"] = self.chat_template
        with open(os.path.join(directory, "tokenizer_meta.json"), "w") as f:
            json.dump(meta, f, indent=1)

    @classmethod
    def load(cls, directory: str) -> TextTokenizer:
        from tokenizers import Tokenizer

        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelFileError(path, "no such file")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:
            raise ModelFileError(path, f"not a valid tokenizer.json ({e})") from e
        meta_path = os.path.join(directory, "tokenizer_meta.json")
        meta = _read_json(meta_path) if os.path.isfile(meta_path) else _hf_meta(directory, tok)
        return cls(tok=tok, **meta)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"unreadable JSON ({e})") from e


def _hf_meta(directory: str, tok) -> dict:
    """Special ids and chat template from a Hugging Face tokenizer_config.json (if present)."""
    path = os.path.join(directory, "tokenizer_config.json")
    cfg = _read_json(path) if os.path.isfile(path) else {}

    def tid(key):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return tok.token_to_id(v) if isinstance(v, str) else None

    return dict(
        bos_id=tid("bos_token"),
        eos_id=tid("eos_token"),
        pad_id=tid("pad_token"),
        add_bos=bool(cfg.get("add_bos_token", False)),
        chat_template=cfg.get("chat_template"),
    )


def tokenizer_from_gguf(reader, path: str = "") -> TextTokenizer:
    """Rebuild the file's byte-level BPE tokenizer (``tokenizer.ggml.model == 'gpt2'``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from shrinkjax.io.gguf import field

    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelFileError(
            path, f"tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens = field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFileError(path, "no tokenizer.ggml.tokens in the file")
    tokens = list(tokens)
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges") or []]
    types = list(field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    pre = field(reader, "tokenizer.ggml.pre", "gpt2")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("llama-bpe", "llama3"):
        pattern = _LLAMA3_PATTERN
    elif pre == "qwen2":
        pattern = _QWEN2_PATTERN
    else:
        pattern = _GPT2_PATTERN
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level]
    if pre in ("smollm", "starcoder", "refact"):  # digits are split one by one first
        splits.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.ByteLevel()
    control = [
        AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3
    ]
    tok.add_special_tokens(control)

    def opt_int(key):
        v = field(reader, key)
        return None if v is None else int(v)

    return TextTokenizer(
        tok=tok,
        bos_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_id=opt_int("tokenizer.ggml.eos_token_id"),
        pad_id=opt_int("tokenizer.ggml.padding_token_id"),
        add_bos=bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=field(reader, "tokenizer.chat_template"),
    )
