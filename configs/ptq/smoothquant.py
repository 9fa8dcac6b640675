"""SmoothQuant W8A8 (α = 0.5): int8 per-channel weights, int8 per-token dynamic activations.

    python -m experiments.run --config=configs/ptq/smoothquant.py --workdir=/tmp/ptq-sq \
      [--config.quantize.smoothquant.alpha=0.8] [--config.quantize.act_scales=static]
"""

from configs.ptq import common


def get_config(variant: str = ""):
    c = common.ptq_config(
        method="smoothquant",
        format="int8",
        group_size=0,
        granularity="channel",
        symmetric=True,
        activations="int8",
    )
    return common.finish(c, variant)
