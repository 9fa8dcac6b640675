"""Shared pieces of the post-training quantization configs (``configs/ptq/*.py``).

Not a config itself. Every PTQ config is ``configs.default.base()`` (load SmolLM2, evaluate)
plus a ``quantize`` section (``shrinkjax.quant.stage.default_config``) read by the
``quantize`` stage, run between ``load`` and ``evaluate``. Evaluation is the papers' protocol:
WikiText-2 raw test, seqlen 2048, every window; calibration: 128 random windows of 2048 tokens
of WikiText-2 valid. Data comes from ``$SHRINKJAX_DATA`` or ``../shared/data`` beside the
checkout (else ``.gpu_data/``).

Every PTQ config takes a variant after a colon: ``--config=configs/ptq/gptq.py:tiny`` is the
CPU-sized smoke run (the tiny random Llama in tests/golden, pydoc text).
"""

import os

from ml_collections import ConfigDict

from configs import default
from shrinkjax.quant.stage import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_TEACHER = default.TINY_TEACHER


def data_dir() -> str:
    env = os.environ.get("SHRINKJAX_DATA")
    if env:
        return env
    for cand in (os.path.join(ROOT, "..", "shared", "data"), os.path.join(ROOT, ".gpu_data")):
        if os.path.isdir(cand):
            return os.path.normpath(cand)
    return os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))


def quantize_section(**overrides) -> ConfigDict:
    """``default_config()`` with WikiText-2 valid as calibration text and ``overrides``."""
    q = default_config()
    q.calib.path = os.path.join(data_dir(), "wikitext-2-tokenized", "valid.txt")
    for k, v in overrides.items():
        q[k] = v
    return q


def ptq_config(**quantize) -> ConfigDict:
    """load -> quantize -> evaluate (WikiText-2 test perplexity at seqlen 2048)."""
    c = default.base()
    c.stages = ("load", "quantize", "evaluate")
    c.data.source = "file"
    c.data.path = os.path.join(data_dir(), "wikitext-2-raw", "test.txt")
    c.data.seqlen = 2048
    c.data.max_windows = 0
    c.data.batch_size = 4
    c.evaluate.metrics = ("perplexity", "samples")
    c.quantize = quantize_section(**quantize)
    return c


def tiny(c: ConfigDict) -> ConfigDict:
    """CPU-sized: the tiny random Llama (2 layers, K = 64/96), pydoc text, 4 × 32 tokens."""
    c = default.shrink_to_tiny(c)
    c.quantize.calib.update(source="pydoc", path="", windows=4, seqlen=32, batch_size=2)
    return c


def finish(c: ConfigDict, variant: str = "") -> ConfigDict:
    return default.finish(c, variant, tiny)
