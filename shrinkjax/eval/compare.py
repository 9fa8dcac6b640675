"""Agreement of two models on the same windows: KL(p_ref ‖ p_model) and top-1 agreement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shrinkjax.data.windows import batches


@nnx.jit
def _kl_top1(ref, model, tokens_BxL, valid_BxL):
    lr, _ = ref(tokens_BxL, mask_BxL=valid_BxL)
    lm, _ = model(tokens_BxL, mask_BxL=valid_BxL)
    lpr = jax.nn.log_softmax(lr.astype(jnp.float32), -1)
    lpm = jax.nn.log_softmax(lm.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(lpr) * (lpr - lpm), -1)
    agree = (jnp.argmax(lr, -1) == jnp.argmax(lm, -1)).astype(jnp.float32)
    w = valid_BxL.astype(jnp.float32)
    return jnp.sum(kl * w), jnp.sum(agree * w), jnp.sum(w)


def compare(ref, model, tokens_WxL: np.ndarray, batch_size: int = 8, progress: bool = True) -> dict:
    """{'kl': mean KL(ref‖model) per token (nats), 'top1_agree': fraction, 'tokens': N}."""
    from tqdm.auto import tqdm

    kl = agree = n = 0.0
    dummy = np.ones_like(tokens_WxL, bool)
    n_batches = -(-len(tokens_WxL) // batch_size)
    for t, v, _ in tqdm(
        batches(tokens_WxL, dummy, batch_size),
        total=n_batches,
        desc="compare",
        disable=not progress,
    ):
        a, b, c = _kl_top1(ref, model, jnp.asarray(t), jnp.asarray(v))
        kl, agree, n = kl + float(a), agree + float(b), n + float(c)
    return {"kl": kl / max(n, 1), "top1_agree": agree / max(n, 1), "tokens": int(n)}
