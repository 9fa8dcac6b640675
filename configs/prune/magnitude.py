"""Magnitude pruning of SmolLM2-135M (no data), 50% per layer; WikiText-2 test perplexity.

    python -m experiments.run --config=configs/prune/magnitude.py --workdir=/tmp/prune-mag \
        [--config.prune.pattern=2:4] [--config.prune.scope=global]

Patterns: "50%" (any unstructured sparsity), "2:4", "4:8"; scope: layer | output | global.
"""

from configs.prune import common


def get_config(variant: str = ""):
    c = common.base("magnitude", "50%")
    c.prune.scope = "layer"
    return common.finish(c, variant)


def get_sweep():
    return common.PATTERN_SWEEP
