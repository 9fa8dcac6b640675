import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from tests.conftest import GOLDEN, ROOT


def _margin(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "scripts/sample_margin.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _samples(path, completion):
    path.write_text(json.dumps({"samples": [{"prompt": "The cat", "completion": completion}]}))
    return str(path)


def test_sample_margin_reports_the_split_step_and_its_logits(tmp_path):
    """Two completions that part after a common prefix: the script names the step and prints
    the model's top-3 next-token logits there (checked against the model run here)."""
    from shrinkjax.io.load import load_model

    loaded = load_model(f"{GOLDEN}/tiny_llama", dtype="float32", progress=False)
    tok = loaded.tokenizer
    a = _samples(tmp_path / "a.json", " sat on the mat")
    b = _samples(tmp_path / "b.json", " sat on a hat")
    r = _margin(f"--model={GOLDEN}/tiny_llama", f"--a={a}", f"--b={b}")
    assert r.returncode == 0, r.stderr
    ids_a, ids_b = tok.encode("The cat sat on the mat"), tok.encode("The cat sat on a hat")
    k = next(i for i, (u, v) in enumerate(zip(ids_a, ids_b)) if u != v)
    logits = loaded.model(jnp.asarray([ids_a[:k]], jnp.int32))
    logits = logits[0] if isinstance(logits, tuple) else logits
    last = np.asarray(logits[0, -1], np.float32)
    top = np.sort(last)[::-1]
    assert f"a: {tok.decode([ids_a[k]])!r}" in r.stdout
    assert f"gap top-1 - top-2: {top[0] - top[1]:.4f}" in r.stdout


def test_sample_margin_when_one_sample_is_a_prefix_of_the_other(tmp_path):
    """One path ended earlier: the split step is where the shorter sample ends."""
    from shrinkjax.io.load import load_model

    tok = load_model(f"{GOLDEN}/tiny_llama", dtype="float32", progress=False).tokenizer
    a = _samples(tmp_path / "a.json", " sat on the mat")
    b = _samples(tmp_path / "b.json", " sat on the mat and")
    r = _margin(f"--model={GOLDEN}/tiny_llama", f"--a={a}", f"--b={b}")
    assert r.returncode == 0, r.stderr
    ids_b = tok.encode("The cat sat on the mat and")
    k = len(tok.encode("The cat sat on the mat"))
    assert f"a: (ended)   b: {tok.decode([ids_b[k]])!r}" in r.stdout


def test_sample_margin_identical_and_bad_input(tmp_path):
    a = _samples(tmp_path / "a.json", " sat")
    r = _margin(f"--model={GOLDEN}/tiny_llama", f"--a={a}", f"--b={a}")
    assert r.returncode == 0 and "identical samples" in r.stdout
    r = _margin(f"--model={GOLDEN}/tiny_llama", f"--a={a}")
    assert r.returncode != 0 and "--b" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ppl": 3.0}))
    r = _margin(f"--model={GOLDEN}/tiny_llama", f"--a={a}", f"--b={bad}")
    assert r.returncode != 0 and f"{bad}: no 'samples' key" in r.stderr
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"samples": [{"prompt": "A dog", "completion": " ran"}]}))
    r = _margin(f"--model={GOLDEN}/tiny_llama", f"--a={a}", f"--b={other}")
    assert r.returncode != 0 and "hold different prompts" in r.stderr
