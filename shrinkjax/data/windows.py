"""Tokenize once (cached on disk), cut fixed-length windows, batch them with masks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np


def tokenize(text: str, tokenizer, cache_dir: str = "", progress: bool = True) -> np.ndarray:
    """Token ids (int32) of the whole text, tokenized in one piece as the GPTQ protocol does.

    With ``cache_dir`` the ids are cached as ``.npy`` keyed by the text's and the tokenizer's
    hashes, so a sweep tokenizes each corpus once.
    """
    from tqdm.auto import tqdm

    key = hashlib.sha256(text.encode()).hexdigest()[:16] + "-" + tokenizer.fingerprint()
    path = os.path.join(cache_dir, f"tokens-{key}.npy") if cache_dir else ""
    if path and os.path.isfile(path):
        return np.load(path, allow_pickle=False)
    with tqdm(
        total=len(text), desc="tokenize", unit="B", unit_scale=True, disable=not progress
    ) as bar:
        ids = np.asarray(tokenizer.encode(text), np.int32)
        bar.update(len(text))
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}.npy"
        np.save(tmp, ids, allow_pickle=False)
        os.replace(tmp, path)
    return ids


def windows(ids: np.ndarray, seqlen: int, stride: int | None = None, max_windows: int = 0):
    """Windows [W, seqlen] and loss masks [W, seqlen] (True where a target is scored).

    ``stride=None``: non-overlapping windows (GPTQ/AWQ/Wanda protocol): ``len(ids) // seqlen``
    windows, the tail dropped, every token but each window's first is a scored target.
    ``stride=s``: sliding windows of ``seqlen`` advancing by ``s``; each window scores only the
    tokens no earlier window scored (Hugging Face's strided perplexity).
    """
    n = len(ids)
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if n < seqlen:
        raise ValueError(f"text has {n} tokens, shorter than one window of seqlen={seqlen}")
    if stride is None:
        w = n // seqlen
        if max_windows:
            w = min(w, max_windows)
        toks = ids[: w * seqlen].reshape(w, seqlen)
        scored = np.ones((w, seqlen), bool)
        return toks, scored
    if not 0 < stride <= seqlen:
        raise ValueError(f"stride must be in (0, seqlen={seqlen}], got {stride}")
    toks, scored, prev_end = [], [], 0
    for begin in range(0, n - 1, stride):
        end = min(begin + seqlen, n)
        begin = end - seqlen  # keep every window full length
        t = ids[begin:end]
        m = np.zeros(seqlen, bool)
        m[max(prev_end - begin, 0) :] = True
        toks.append(t)
        scored.append(m)
        prev_end = end
        if end == n or (max_windows and len(toks) == max_windows):
            break
    return np.stack(toks), np.stack(scored)


def batches(
    tokens_WxL: np.ndarray, scored_WxL: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens [B, L], valid [B, L], scored [B, L]); the last batch is padded (valid=False)."""
    w = len(tokens_WxL)
    for s in range(0, w, batch_size):
        t, sc = tokens_WxL[s : s + batch_size], scored_WxL[s : s + batch_size]
        valid = np.ones_like(t, bool)
        if len(t) < batch_size:
            pad = batch_size - len(t)
            t = np.concatenate([t, np.zeros((pad, t.shape[1]), t.dtype)])
            sc = np.concatenate([sc, np.zeros((pad, t.shape[1]), bool)])
            valid = np.concatenate([valid, np.zeros((pad, t.shape[1]), bool)])
        yield t, valid, sc
