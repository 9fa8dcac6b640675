"""A run killed with SIGKILL and resumed ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS = 14


def _cmd(workdir, out, sleep):
    return [
        sys.executable,
        os.path.join(HERE, "_driver.py"),
        "resume",
        str(workdir),
        str(STEPS),
        str(sleep),
        str(out),
    ]


def _env(cache):
    # the three processes share one persistent compilation cache: one compile, not three
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def test_sigkill_resume_is_bitwise_exact(tmp_path):
    ref_out, out = tmp_path / "ref.npz", tmp_path / "resumed.npz"
    r = subprocess.run(
        _cmd(tmp_path / "ref", ref_out, 0.0),
        cwd=ROOT,
        env=_env(tmp_path / "jax-cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    work = tmp_path / "killed"
    ckdir = work / "checkpoints"
    p = subprocess.Popen(
        _cmd(work, out, 0.15),
        cwd=ROOT,
        env=_env(tmp_path / "jax-cache"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and p.poll() is None:
        steps = [int(d) for d in os.listdir(ckdir) if d.isdigit()] if ckdir.is_dir() else []
        if steps and max(steps) >= 6:
            os.kill(p.pid, signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.02)
    p.wait(timeout=60)
    assert killed_at is not None, "the run finished before it could be killed"
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()
    assert killed_at < STEPS

    r = subprocess.run(
        _cmd(work, out, 0.0),
        cwd=ROOT,
        env=_env(tmp_path / "jax-cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = np.load(ref_out), np.load(out)
    assert int(a["__step"]) == int(b["__step"]) == STEPS
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert np.array_equal(a[k], b[k]), f"{k} differs after resume"
    # only the last 2 checkpoints are kept, the final one included
    kept = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
    assert kept[-1] == STEPS and len(kept) <= 2
