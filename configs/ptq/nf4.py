"""NF4 (QLoRA 4-bit NormalFloat, blocks of 64), round to nearest, weight-only.

    python -m experiments.run --config=configs/ptq/nf4.py --workdir=/tmp/ptq-nf4 \
      [--config.quantize.double_quant=True] [--config.quantize.method=gptq]
"""

from configs.ptq import common


def get_config(variant: str = ""):
    c = common.ptq_config(method="rtn", format="nf4", group_size=64, symmetric=True)
    return common.finish(c, variant)
