"""NVFP4 (E2M1 elements, E4M3 scale per 16, FP32 tensor scale), round to nearest, weight-only.

    python -m experiments.run --config=configs/ptq/nvfp4.py --workdir=/tmp/ptq-nvfp4 \
      [--config.quantize.method=gptq]
"""

from configs.ptq import common


def get_config(variant: str = ""):
    c = common.ptq_config(method="rtn", format="nvfp4", group_size=16, symmetric=True)
    return common.finish(c, variant)
