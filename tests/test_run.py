"""The runner and its command line: configs, overrides, stage registry, bad input."""

import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from shrinkjax import stages
from shrinkjax.run import run
from tests.conftest import ROOT


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tiny_config_runs_and_writes_outputs(tmp_path):
    cfg = tiny.get_config()
    res = run(cfg, str(tmp_path))
    ev = json.loads((tmp_path / "results" / "evaluate.json").read_text())
    assert ev["ppl"] == res["evaluate"]["ppl"] and 1 < ev["ppl"] < 1e4
    assert ev["windows"] == 2 and ev["tokens"] == 2 * 31
    assert json.loads((tmp_path / "config.json").read_text())["data"]["seqlen"] == 32
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["stage"] for x in lines] == ["load", "evaluate"]


def test_unknown_stage_fails_before_any_work(tmp_path):
    cfg = tiny.get_config()
    with cfg.unlocked():
        cfg.stages = ("load", "distil")
    with pytest.raises(KeyError, match="unknown stage 'distil'; known stages:"):
        run(cfg, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_registry_names_include_foundation_stages():
    assert {"load", "evaluate"} <= set(stages.names())


def test_config_is_locked():
    cfg = tiny.get_config()
    with pytest.raises(AttributeError):
        cfg.data.sequence_length = 5


def test_cli_rejects_unknown_key_and_wrong_type(tmp_path):
    r = _cli("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.data.seqln=64")
    assert r.returncode != 0 and "seqln" in r.stderr
    r = _cli("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.data.seqlen=long")
    assert r.returncode != 0 and "seqlen" in r.stderr and "long" in r.stderr
    assert not (tmp_path / "results").exists()


def test_cli_seqlen_beyond_context_and_short_text(tmp_path):
    r = _cli("--config=configs/tiny.py", f"--workdir={tmp_path}/a", "--config.data.seqlen=4096")
    assert r.returncode != 0
    assert "data.seqlen=4096 exceeds the model's context length 256" in r.stderr
    short = tmp_path / "short.txt"
    short.write_text("too short")
    r = _cli(
        "--config=configs/tiny.py",
        f"--workdir={tmp_path}/b",
        "--config.data.source=file",
        f"--config.data.path={short}",
    )
    assert r.returncode != 0 and "short.txt: text has 9 tokens, shorter than one window" in r.stderr
    assert not (tmp_path / "b" / "results" / "evaluate.json").exists()


def test_cli_runs_tiny_config(tmp_path):
    r = _cli("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.progress=False")
    assert r.returncode == 0, r.stderr
    assert "evaluate  ppl" in r.stdout
