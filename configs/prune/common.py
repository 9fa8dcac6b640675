"""Shared pieces of the pruning configs: ``base()`` plus a ``prune`` section and WikiText-2.

Not a config itself. Every pruning config takes a variant after a colon:
``--config=configs/prune/wanda.py:tiny`` is the CPU-sized smoke run (the tiny random Llama in
tests/golden, pydoc text for calibration and evaluation) that tests use.
"""

import os

from ml_collections import ConfigDict

from configs import default
from shrinkjax.sparse.stage import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("SHRINKJAX_DATA", os.path.join(ROOT, "..", "shared", "data"))
WIKITEXT_TEST = os.path.normpath(os.path.join(DATA, "wikitext-2-raw", "test.txt"))
WIKITEXT_CALIB = os.path.normpath(os.path.join(DATA, "wikitext-2-tokenized", "valid.txt"))
TINY_TEACHER = default.TINY_TEACHER


def base(method: str, pattern: str = "50%") -> ConfigDict:
    """``configs.default.base()`` + ``prune`` (method, pattern) + WikiText-2 test perplexity
    at seqlen 2048 (the Wanda / SparseGPT protocol), compared with the dense teacher."""
    c = default.base()
    c.stages = ("load", "prune", "evaluate")
    c.prune = default_config()
    c.prune.method = method
    c.prune.pattern = pattern
    c.prune.calib.path = WIKITEXT_CALIB
    c.data.source = "file"
    c.data.path = WIKITEXT_TEST
    c.data.seqlen = 2048
    c.data.max_windows = 0
    c.data.batch_size = 4
    c.evaluate.metrics = ("perplexity", "compare", "samples")
    return c


PATTERN_SWEEP = [{"prune.pattern": p} for p in ("50%", "2:4", "4:8")]


def tiny(c: ConfigDict) -> ConfigDict:
    """CPU-sized: the tiny random Llama (2 layers, K = 64/96), pydoc text, 4 × 32 tokens."""
    c = default.shrink_to_tiny(c)
    c.prune.calib.update(source="pydoc", path="", seqlen=32, max_windows=4, batch_size=2)
    return c


def finish(c: ConfigDict, variant: str = "") -> ConfigDict:
    return default.finish(c, variant, tiny)
