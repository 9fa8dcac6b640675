"""MXFP4 (OCP microscaling: E2M1 elements, E8M0 scale per 32), round to nearest, weight-only.

    python -m experiments.run --config=configs/ptq/mxfp4.py --workdir=/tmp/ptq-mxfp4 \
      [--config.quantize.method=gptq]
"""

from configs.ptq import common


def get_config(variant: str = ""):
    c = common.ptq_config(method="rtn", format="mxfp4", group_size=32, symmetric=True)
    return common.finish(c, variant)
