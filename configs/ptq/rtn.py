"""Round-to-nearest W4 g128 (asymmetric int4, the data-free baseline).

    python -m experiments.run --config=configs/ptq/rtn.py --workdir=/tmp/ptq-rtn \
      [--config.quantize.format=int3]
"""

from configs.ptq import common


def get_config(variant: str = ""):
    c = common.ptq_config(method="rtn", format="int4", group_size=128, symmetric=False)
    return common.finish(c, variant)
