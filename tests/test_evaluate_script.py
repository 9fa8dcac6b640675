import json
import os
import subprocess
import sys

from tests.conftest import GOLDEN, ROOT


def _evaluate(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "scripts/evaluate.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_evaluate_script_writes_json(tmp_path):
    out = tmp_path / "r.json"
    r = _evaluate(
        f"--model={GOLDEN}/tiny_llama",
        "--corpus=pydoc",
        "--seqlen=32",
        "--max_windows=3",
        "--metrics=perplexity,sliding_perplexity,compare",
        f"--reference={GOLDEN}/tiny_llama",
        f"--out={out}",
        "--noprogress",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["windows"] == 3 and res["seqlen"] == 32 and res["ppl"] > 1
    assert abs(res["kl"]) < 1e-6 and res["top1_agree"] == 1.0


def test_evaluate_script_bad_input(tmp_path):
    r = _evaluate(f"--model={tmp_path}/none.gguf", "--noprogress")
    assert r.returncode != 0 and "none.gguf: no such file or directory" in r.stderr
    r = _evaluate(f"--model={GOLDEN}/tiny_llama", "--seqlen=1000", "--noprogress")
    assert r.returncode != 0 and "--seqlen=1000 exceeds the model's context length 256" in r.stderr
    r = _evaluate(f"--model={GOLDEN}/tiny_llama", "--metrics=bleu", "--noprogress")
    assert r.returncode != 0 and "bleu" in r.stderr


def test_evaluate_script_fused_projections_same_perplexity(tmp_path):
    """Fused projections (+ kernel packing), and deferred norms with another attention path,
    leave an f32 model's perplexity unchanged."""
    res = []
    variants = (
        [],
        ["--fuse_projections", "--kernels"],
        ["--deferred_norm", "--attention=pallas_decode"],
    )
    for extra in variants:
        out = tmp_path / f"r{len(res)}.json"
        r = _evaluate(
            f"--model={GOLDEN}/tiny_llama",
            "--corpus=pydoc",
            "--seqlen=32",
            "--max_windows=2",
            f"--out={out}",
            "--noprogress",
            *extra,
        )
        assert r.returncode == 0, r.stderr
        res.append(json.loads(out.read_text()))
    assert res[1]["fused_projections"] and res[1]["kernels"] == 0  # a float model: none packed
    assert abs(res[0]["ppl"] - res[1]["ppl"]) < 1e-4 * res[0]["ppl"]
    assert not res[0]["deferred_norm"] and res[0]["attention"] == "einsum"
    assert res[2]["deferred_norm"] and res[2]["attention"] == "pallas_decode"
    assert abs(res[0]["ppl"] - res[2]["ppl"]) < 1e-4 * res[0]["ppl"]
