"""AWQ W4 g128 (asymmetric int4): scale search (20-point α grid) + clipping search.

    python -m experiments.run --config=configs/ptq/awq.py --workdir=/tmp/ptq-awq \
      [--config.quantize.format=int3] [--config.quantize.awq.clip=False]
"""

from configs.ptq import common


def get_config(variant: str = ""):
    c = common.ptq_config(method="awq", format="int4", group_size=128, symmetric=False)
    return common.finish(c, variant)
