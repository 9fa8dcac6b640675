import jax
import jax.numpy as jnp
import numpy as np

from shrinkjax.data.windows import windows
from shrinkjax.eval.compare import compare
from shrinkjax.eval.perplexity import perplexity
from shrinkjax.models.llama import LlamaConfig, init_model


def test_perplexity_equals_float64_reference(tiny_llama):
    m = tiny_llama.model
    ids = np.random.default_rng(0).integers(0, 128, 5 * 16 + 7).astype(np.int32)
    t, s = windows(ids, 16)
    got = perplexity(m, t, s, batch_size=2, progress=False)  # 5 windows: last batch padded
    logits = np.asarray(m(jnp.asarray(t))[0], np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    lp -= logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(lp[:, :-1], t[:, 1:, None], -1)[..., 0]
    assert got["tokens"] == 5 * 15 and got["windows"] == 5
    np.testing.assert_allclose(got["nll"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["ppl"], np.exp(nll.mean()), rtol=1e-5)


def test_compare_is_zero_for_identical_and_positive_otherwise():
    cfg = LlamaConfig(
        vocab_size=40,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=48,
        tie_embeddings=False,
    )  # tied random models both predict the input token
    a, b = init_model(cfg, seed=0), init_model(cfg, seed=1)
    t = np.random.default_rng(0).integers(0, 40, (3, 16)).astype(np.int32)
    same = compare(a, a, t, batch_size=2, progress=False)
    assert abs(same["kl"]) < 1e-6 and same["top1_agree"] == 1.0 and same["tokens"] == 48
    diff = compare(a, b, t, batch_size=2, progress=False)
    la, lb = (np.asarray(jax.nn.log_softmax(m(jnp.asarray(t))[0], -1), np.float64) for m in (a, b))
    kl_ref = (np.exp(la) * (la - lb)).sum(-1).mean()
    np.testing.assert_allclose(diff["kl"], kl_ref, rtol=1e-4)
    assert diff["top1_agree"] < 1.0
