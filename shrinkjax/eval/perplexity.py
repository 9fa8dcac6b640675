"""Perplexity as GPTQ/AWQ/Wanda report it, and per-token log-probabilities.

Protocol: the whole text tokenized once, non-overlapping windows of ``seqlen`` (tail dropped),
mean negative log-likelihood over every predicted token (``seqlen - 1`` per window), ppl =
exp(mean NLL). The sliding-window variant scores each token once with up to ``seqlen`` tokens
of context (``data.windows(stride=...)``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shrinkjax.data.windows import batches


def token_nll(logits_BxLxV, tokens_BxL):
    """NLL of tokens[:, 1:] under logits[:, :-1], in f32, [B, L-1]."""
    lp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(lp, tokens_BxL[:, 1:, None], axis=-1)[..., 0]


@nnx.jit
def _nll_sums(model, tokens_BxL, valid_BxL, scored_BxL):
    logits, _ = model(tokens_BxL, mask_BxL=valid_BxL)
    nll = token_nll(logits, tokens_BxL)
    w = (scored_BxL[:, 1:] & valid_BxL[:, 1:]).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def perplexity(
    model,
    tokens_WxL: np.ndarray,
    scored_WxL: np.ndarray,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict:
    """{'ppl', 'nll', 'tokens', 'windows'} over the given windows."""
    from tqdm.auto import tqdm

    total, count = 0.0, 0.0
    n_batches = -(-len(tokens_WxL) // batch_size)
    for t, v, s in tqdm(
        batches(tokens_WxL, scored_WxL, batch_size),
        total=n_batches,
        desc=desc,
        unit="batch",
        disable=not progress,
    ):
        a, b = _nll_sums(model, jnp.asarray(t), jnp.asarray(v), jnp.asarray(s))
        total += float(a)
        count += float(b)
    nll = total / max(count, 1.0)
    return {"ppl": math.exp(nll), "nll": nll, "tokens": int(count), "windows": len(tokens_WxL)}
