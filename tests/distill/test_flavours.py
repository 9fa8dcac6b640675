"""Each flavour runs end to end through the runner with the tiny teacher on CPU; students
from config; vocab mismatch is a clear error."""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest

from shrinkjax import run as runner


def _config(flavour: str, **train):
    mod = importlib.import_module(f"configs.distill.{flavour}")
    c = mod.get_config("tiny")
    with c.unlocked():
        c.stages = ("load", "distill")
        c.train.update(train)
    return c


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_logit_flavour_end_to_end(tmp_path):
    c = _config("logit", steps=4, eval_every=2, checkpoint_every=2)
    res = runner.run(c, str(tmp_path))["distill"]
    assert res["kind"] == "logit" and res["steps"] == 4
    assert res["student_layers"] == 1
    assert np.isfinite(res["final_loss"]) and res["final_loss"] > 0
    assert res["eval_kl"] > 0 and np.isfinite(res["eval_ppl"])
    lines = _jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in lines if r.get("kind") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"loss", "fkl", "kl", "grad_norm", "lr", "tokens_per_s"} <= set(train[-1])
    assert any(r.get("kind") == "eval" and r["step"] == 2 for r in lines)
    assert os.listdir(tmp_path / "tb")
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2, 4]
    # the trained student was handed on to later stages and differs from the init
    # (loss fell from the first logged step)
    assert train[-1]["loss"] < train[0]["loss"]


def test_sequence_flavour_generates_dataset_then_ce(tmp_path):
    c = _config("sequence", steps=3, eval_every=0)
    res = runner.run(c, str(tmp_path))["distill"]
    d = tmp_path / "teacher_data"
    toks, mask = np.load(d / "tokens.npy"), np.load(d / "loss_mask.npy")
    assert toks.shape == (8, 32) and mask.shape == toks.shape
    assert not mask[:, :8].any() and mask[:, 8].all()  # prompt is context, completion target
    assert res["dataset_sequences"] == 8
    train = [r for r in _jsonl(tmp_path / "metrics.jsonl") if r.get("kind") == "train"]
    assert "ce" in train[-1] and "fkl" not in train[-1]  # cross entropy only
    # a second run reuses the dataset (same meta) and resumes from the final checkpoint
    meta_before = os.path.getmtime(d / "tokens.npy")
    res2 = runner.run(c, str(tmp_path))["distill"]
    assert os.path.getmtime(d / "tokens.npy") == meta_before
    assert res2["start_step"] == 3


def test_onpolicy_flavour_mixes_student_samples(tmp_path):
    c = _config("onpolicy", steps=4, eval_every=0)
    with c.unlocked():
        c.distill.onpolicy.lam = 0.5
    res = runner.run(c, str(tmp_path))["distill"]
    assert 0 < res["onpolicy_steps"] < 4
    train = [r for r in _jsonl(tmp_path / "metrics.jsonl") if r.get("kind") == "train"]
    assert all(np.isfinite(r["jsd"]) for r in train)
    # on-policy steps score only the 24 generated tokens (minus the last position)
    assert {r["tokens"] for r in train} >= {4 * 24.0}


def test_onpolicy_alpha_blends_ce_only_on_data_steps(tmp_path):
    c = _config("onpolicy", steps=6, eval_every=0, checkpoint_every=-1)
    with c.unlocked():
        c.distill.onpolicy.lam = 0.5
        c.distill.alpha = 0.4
    res = runner.run(c, str(tmp_path))["distill"]
    assert 0 < res["onpolicy_steps"] < 6
    train = [r for r in _jsonl(tmp_path / "metrics.jsonl") if r.get("kind") == "train"]
    on_steps = 0
    for r in train:
        on = r["tokens"] < 4 * 31  # student samples: only the 24 sampled tokens are scored
        on_steps += on
        # no cross entropy on the student's own samples (their ce_mask is False); the
        # divergence keeps 1 - alpha
        assert (r["ce"] == 0.0) == bool(on), r
        want = 0.6 * r["jsd"] + 0.4 * r["ce"]
        assert np.isclose(r["loss"], want, rtol=1e-4, atol=1e-6), r
    assert on_steps == res["onpolicy_steps"]


def test_onpolicy_batch_prompts_scored_through_the_runner(tmp_path):
    c = _config("onpolicy", steps=6, eval_every=0, checkpoint_every=-1)
    with c.unlocked():
        c.distill.onpolicy.update(lam=0.5, prompt_source="batch", score_prompt=True)
        c.distill.update(alpha=0.4, jsd_normalize=True)
    res = runner.run(c, str(tmp_path))["distill"]
    assert 0 < res["onpolicy_steps"] < 6
    train = [r for r in _jsonl(tmp_path / "metrics.jsonl") if r.get("kind") == "train"]
    # prompt and samples alike are scored: more targets than the 4 × 24 sampled tokens alone
    # (all 4 × 31 unless a sample ends early at EOS), and cross entropy on the data part
    assert all(4 * 24 < r["tokens"] <= 4 * 31 and r["ce"] > 0 for r in train)
    for r in train:
        np.testing.assert_allclose(r["loss"], 0.4 * r["ce"] + 0.6 * r["jsd"], rtol=1e-4)
    with c.unlocked():
        c.distill.onpolicy.prompt_source = "nowhere"
    with pytest.raises(ValueError, match="prompt_source must be one of"):
        runner.run(c, str(tmp_path / "bad"))


def test_onpolicy_schedule_is_deterministic():
    from shrinkjax.distill.onpolicy import OnPolicyBatcher
    from shrinkjax.models.generate import Sampling
    from shrinkjax.models.llama import LlamaConfig
    from shrinkjax.train.loop import StepBatcher

    cfg = LlamaConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=8)
    base = StepBatcher(np.zeros((10, 6), np.int32), None, 2, seed=3)
    mk = lambda: OnPolicyBatcher(
        base,
        np.zeros((5, 2), np.int32),
        lam=0.3,
        max_new_tokens=4,
        sampling=Sampling(1.0),
        seed=3,
        student_cfg=cfg,
    )
    a, b = mk(), mk()
    flags = [a.is_onpolicy(s) for s in range(200)]
    assert flags == [b.is_onpolicy(s) for s in range(200)]
    assert 0.2 < np.mean(flags) < 0.4


@pytest.mark.parametrize("score_prompt", [True, False])
def test_onpolicy_batch_prompts_continue_the_data_batch(score_prompt):
    from types import SimpleNamespace

    from shrinkjax.distill.onpolicy import OnPolicyBatcher
    from shrinkjax.models.generate import Sampling
    from shrinkjax.models.llama import LlamaConfig, init_model
    from shrinkjax.models.params import flat_params
    from shrinkjax.train.loop import StepBatcher

    cfg = LlamaConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=8)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 16, (10, 9)).astype(np.int32)
    mask = rng.random((10, 9)) < 0.7
    base = StepBatcher(toks, mask, 4, seed=3)
    make = lambda prompts, lam, score: OnPolicyBatcher(
        base,
        prompts,
        lam=lam,
        max_new_tokens=3,
        sampling=Sampling(1.0),
        seed=3,
        student_cfg=cfg,
        score_prompt=score,
    )
    op = make(None, 1.0, score_prompt)
    state = SimpleNamespace(params={"student": flat_params(init_model(cfg, seed=0))})
    got, data = op(5, state), base(5)
    assert got["tokens"].shape == (4, 9)
    np.testing.assert_array_equal(got["tokens"][:, :6], data["tokens"][:, :6])
    want_prompt = data["loss_mask"][:, :6] if score_prompt else np.zeros((4, 6), bool)
    np.testing.assert_array_equal(got["loss_mask"][:, :6], want_prompt)
    np.testing.assert_array_equal(got["ce_mask"][:, :6], want_prompt)
    assert got["loss_mask"][:, 6:].all() and not got["ce_mask"][:, 6:].any()
    # an off-policy step: the data batch, cross entropy on every scored token
    op.lam = 0.0
    off = op(5, state)
    np.testing.assert_array_equal(off["ce_mask"], off["loss_mask"])
    with pytest.raises(ValueError, match="prompt_source='batch'"):
        make(toks[:, :6], 0.5, True)  # corpus prompts have no mask to score them with
    with pytest.raises(ValueError, match=r"max_new_tokens=9 must be in \[1, 8\].*9-token"):
        OnPolicyBatcher(
            base, None, lam=0.5, max_new_tokens=9, sampling=Sampling(1.0), seed=3, student_cfg=cfg
        )


def test_vocab_mismatch_is_a_clear_error(tmp_path):
    c = _config("logit")
    with c.unlocked():
        c.student.init = "scratch"
        c.student.vocab_size = 100
    with pytest.raises(ValueError, match="vocabularies differ.*128.*100"):
        runner.run(c, str(tmp_path))
    # same vocabulary size but another tokenizer: also refused
    from shrinkjax.models.llama import LlamaConfig
    from shrinkjax.models.surgery import VocabMismatchError, check_compatible

    class Tok:
        def __init__(self, fp):
            self.fp, self.vocab_size = fp, 128

        def fingerprint(self):
            return self.fp

    cfg = LlamaConfig(vocab_size=128, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=8)
    check_compatible(cfg, cfg, Tok("a"), Tok("a"))
    with pytest.raises(VocabMismatchError, match="tokenizers differ"):
        check_compatible(cfg, cfg, Tok("a"), Tok("b"))


def test_generate_dataset_stops_at_deadline_and_resumes(tmp_path, tiny_llama, monkeypatch):
    import time

    from shrinkjax.distill import sequence
    from shrinkjax.models.generate import Sampling

    real_generate, calls = sequence.generate, []

    def slow_generate(*args, **kw):
        calls.append(1)
        time.sleep(0.2)
        return real_generate(*args, **kw)

    monkeypatch.setattr(sequence, "generate", slow_generate)
    prompts = np.arange(24, dtype=np.int32).reshape(6, 4) % 100
    kw = dict(max_new_tokens=4, sampling=Sampling(1.0), batch_size=2, seed=0, progress=False)
    with pytest.raises(sequence.GenerationIncomplete) as e:
        # batch 0 runs; batch 1 would end after the deadline (judged by batch 0's time)
        sequence.generate_dataset(
            tiny_llama.model, prompts, str(tmp_path), deadline=time.perf_counter() + 0.3, **kw
        )
    assert (e.value.done, e.value.total) == (1, 3) and len(calls) == 1
    toks, mask = sequence.generate_dataset(tiny_llama.model, prompts, str(tmp_path), **kw)
    assert toks.shape == (6, 8) and len(calls) == 3  # the finished batch was kept
    assert not mask[:, :4].any()


@pytest.mark.parametrize("flavour", ["sequence", "onpolicy"])
def test_prompt_flavour_seqlen_mismatch_is_a_clear_error(flavour):
    from shrinkjax.distill.sequence import prompt_corpus

    c = _config(flavour)
    sec = c.distill[flavour]
    with c.unlocked():
        c.train.seqlen = int(sec.prompt_len) + int(sec.max_new_tokens) + 1
    with pytest.raises(ValueError, match=f"distill.{flavour}.prompt_len \\+ max_new_tokens"):
        prompt_corpus(c, flavour, None)
