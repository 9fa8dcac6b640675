"""Wanda (|W|·||X||, per output) on SmolLM2-135M, 50% unstructured, calibrated on 128 × 2048
tokens of WikiText-2 valid; WikiText-2 test perplexity.

    python -m experiments.run --config=configs/prune/wanda.py --workdir=/tmp/prune-wanda \
        [--config.prune.pattern=2:4] [--config.prune.calib.max_windows=32]
"""

from configs.prune import common


def get_config(variant: str = ""):
    c = common.base("wanda", "50%")
    return common.finish(c, variant)


def get_sweep():
    return common.PATTERN_SWEEP
