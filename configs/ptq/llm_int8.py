"""LLM.int8(): vector-wise int8 with outlier input features (|x| >= 6) multiplied in fp16.

python -m experiments.run --config=configs/ptq/llm_int8.py --workdir=/tmp/ptq-int8
"""

from configs.ptq import common


def get_config(variant: str = ""):
    c = common.ptq_config(
        method="llm_int8", format="int8", group_size=0, granularity="channel", symmetric=True
    )
    return common.finish(c, variant)
