"""SparseGPT (OBS reconstruction, blocks of 128, 1% dampening) on SmolLM2-135M, 50%
unstructured, calibrated on 128 × 2048 tokens of WikiText-2 valid; WikiText-2 test perplexity.

    python -m experiments.run --config=configs/prune/sparsegpt.py --workdir=/tmp/prune-sgpt \
        [--config.prune.pattern=2:4]

N:M kernels are stored compressed (NMSparseArray); the results report stored bytes.
"""

from configs.prune import common


def get_config(variant: str = ""):
    c = common.base("sparsegpt", "50%")
    return common.finish(c, variant)


def get_sweep():
    return common.PATTERN_SWEEP
