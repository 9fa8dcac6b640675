"""The distillation benchmarks in quick (CPU) mode: merging/resuming results across calls, the
time budget, teacher-data reuse, the α blend with no cross entropy on on-policy steps, and
the speed benchmark's budget."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from tests.conftest import data_path, load_benchmark

_load = load_benchmark


@pytest.fixture(scope="module")
def dq():
    return _load("distill_quality")


def test_arm_weights_blend_alpha(dq):
    assert dq.arm_weights("ce", 0.5).tolist() == [1, 0, 0, 0]  # the baseline: hard labels
    assert np.allclose(dq.arm_weights("fkl", 0.3), [0.3, 0.7, 0, 0])
    assert dq.arm_weights("rkl", 0.0).tolist() == [0, 0, 1, 0]
    assert dq.arm_weights("gkd", 0.5).tolist() == [0.5, 0, 0, 0.5]


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_quality_merges_resumes_and_keeps_budget(dq, tmp_path):
    data = os.path.dirname(data_path("wikitext-2-raw", "test.txt"))
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    common = ["--quick", "--out", out, "--workdir", work, "--data", data, "--results_md", ""]
    common += ["--tokens", "512", "--real_windows", "4", "--eval_windows", "2"]
    tokens_npy = os.path.join(work + "_quick", "teacher_data", "tokens.npy")

    r1 = dq.main(common + ["--arms", "ce"])
    assert [x["name"] for x in r1["arms"]] == ["ce"]
    assert r1["tokens"] == 512 and r1["train_on_prompt"] is False
    assert r1["targets"]["arms_missing"] == ["fkl", "rkl", "gkd"]
    assert r1["targets"]["every_kd_arm_beats_ce"] is None
    gen_mtime = os.path.getmtime(tokens_npy)
    # prompts are context only: 4 real windows x 31 targets + 12 sequences x <= 24 completions
    assert 4 * 31 < r1["train_data_scored_tokens"] <= 4 * 31 + 12 * 24
    ce1 = r1["arms"][0]

    # another call with other arms: ce kept as it was, teacher data reused, the gkd arm blends
    r2 = dq.main(common + ["--arms", "ce,fkl,gkd"])
    assert [x["name"] for x in r2["arms"]] == ["ce", "fkl", "gkd"]
    assert r2["arms"][0] == ce1
    assert os.path.getmtime(tokens_npy) == gen_mtime
    assert r2["calls"][-1]["arms_run"] == ["fkl", "gkd"] and len(r2["calls"]) == 2
    fkl, gkd = r2["arms"][1], r2["arms"][2]
    assert fkl["loss_weights"] == [0.5, 0.5, 0, 0]
    assert gkd["loss_weights"] == [0.5, 0, 0, 0.5]
    assert 0 < gkd["onpolicy_steps"] < r2["steps"]
    assert gkd["gkd_prompts"] == "batch" and gkd["gkd_score_prompt"] and gkd["jsd_normalize"]
    # on-policy steps score the data prompt too (context only, they would score at most 16
    # of 32 positions): at least as many as the data arms but where the data's teacher text
    # ended at an EOS and the student's sampled tail did not
    assert gkd["scored_tokens"] >= 0.9 * fkl["scored_tokens"]
    # the train loss of every gkd step is the blend its batch asked for
    logged = [r for r in _jsonl(os.path.join(work + "_quick", "gkd", "metrics.jsonl"))]
    assert len(logged) == r2["steps"]
    for r in logged:
        s = r["step"] - 1
        on = np.random.default_rng([0, s, 0x6CD]).random() < 0.5  # OnPolicyBatcher's rule
        # CE over the batch's ce_mask (on-policy: the data prompt only), JSD over all
        want = 0.5 * r["jsd"] + 0.5 * r["ce"]
        assert on or r["ce"] > 0
        assert math.isclose(r["loss"], want, rel_tol=1e-4, abs_tol=1e-6), (s, on, r)
    with open(os.path.join(out, "distill_quality.json")) as f:
        assert json.load(f)["arms"] == r2["arms"]

    # nothing left to run: no generation, no training
    r3 = dq.main(common + ["--arms", "ce,fkl"])
    assert r3["calls"][-1]["status"] == "nothing to run" and r3["arms"] == r2["arms"]

    # a budget too small for an arm: skipped and recorded, the JSON still written
    r4 = dq.main(common + ["--arms", "rkl", "--budget_s", "2", "--margin_s", "1"])
    assert [x["name"] for x in r4["skipped"]] == ["rkl"]
    assert r4["calls"][-1]["status"].startswith("partial")
    assert [x["name"] for x in r4["arms"]] == ["ce", "fkl", "gkd"]
    assert r4["targets"]["arms_missing"] == ["rkl"]

    # another alpha: the KD arms' protocol changed, ce (hard labels only) is kept
    r5 = dq.main(common + ["--arms", "fkl", "--alpha", "0.25"])
    assert [x["name"] for x in r5["arms"]] == ["ce", "fkl"]
    assert r5["arms"][0] == ce1 and r5["arms"][1]["loss_weights"] == [0.25, 0.75, 0, 0]
    assert os.path.isfile(os.path.join(out, "distill_quality.prev.json"))


def test_quality_gen_only_and_train_on_prompt(dq, tmp_path):
    data = os.path.dirname(data_path("wikitext-2-raw", "test.txt"))
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    common = ["--quick", "--out", out, "--workdir", work, "--data", data, "--results_md", ""]
    common += ["--tokens", "512", "--real_windows", "4", "--eval_windows", "2"]
    r = dq.main(common + ["--gen_only"])
    assert r["arms"] == [] and r["calls"][-1]["status"] == "gen_only"
    assert math.isfinite(r["student_init_ppl"]) and math.isfinite(r["teacher_ppl"])
    scored_context = r["train_data_scored_tokens"]
    # the same cached generation serves --train_on_prompt (only the mask differs)
    tokens_npy = os.path.join(work + "_quick", "teacher_data", "tokens.npy")
    mtime = os.path.getmtime(tokens_npy)
    r2 = dq.main(common + ["--gen_only", "--train_on_prompt"])
    assert os.path.getmtime(tokens_npy) == mtime
    # 8-token prompts: 7 more targets each (a sequence's first token is never one)
    assert r2["train_data_scored_tokens"] == scored_context + 12 * 7


def test_speed_benchmark_keeps_its_budget(tmp_path):
    ds = _load("distill_speed")
    r = ds.main(
        [
            "--quick",
            "--out",
            str(tmp_path),
            "--workdir",
            str(tmp_path / "w"),
            "--budget_s",
            "3",
            "--no_torch_compile",
        ]
    )
    with open(tmp_path / "distill_speed.json") as f:
        got = json.load(f)
    assert {"device", "seqlen", "shrinkjax_tokens_per_s", "torch_tokens_per_s", "mfu"} <= set(got)
    assert got["seqlen"] == 64 and r["seconds"] < 10
    assert "timed out" in got["shrinkjax"]["status"] or "not run" in got["shrinkjax"]["status"]
    assert got["shrinkjax_tokens_per_s"] is None


def test_quality_static_loss_steps_match_the_shared_step(dq, tmp_path):
    data = os.path.dirname(data_path("wikitext-2-raw", "test.txt"))
    work = str(tmp_path / "work")
    common = ["--quick", "--workdir", work, "--data", data, "--results_md", ""]
    common += ["--tokens", "512", "--real_windows", "4", "--eval_windows", "2", "--arms", "ce"]
    shared = dq.main(common + ["--out", str(tmp_path / "a")])
    # the CE-only step runs no teacher at all
    static = dq.main(common + ["--out", str(tmp_path / "b"), "--static_loss"])
    assert [x["step_kind"] for x in shared["arms"]] == ["dynamic"]
    assert [x["step_kind"] for x in static["arms"]] == ["static-ce"]
    for x, y in zip(shared["arms"], static["arms"], strict=True):
        assert math.isclose(x["ppl"], y["ppl"], rel_tol=1e-4), (x["name"], x["ppl"], y["ppl"])
        assert x["scored_tokens"] == y["scored_tokens"]
