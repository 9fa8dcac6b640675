"""SparseGPT 2:4 with joint int4 quantization (asymmetric, groups of 128 input rows) of the
kept weights; stored as NMSparseArray over int4 values (≈3.2 bits per weight).

    python -m experiments.run --config=configs/prune/sparsegpt_2of4_int4.py \
        --workdir=/tmp/prune-sgpt-24-int4
"""

from configs.prune import common


def get_config(variant: str = ""):
    c = common.base("sparsegpt", "2:4")
    c.prune.quant = "int4"
    c.prune.quant_group_size = 128
    c.prune.quant_symmetric = False
    if variant == "tiny":
        c.prune.quant_group_size = 32  # the tiny model's K is 64 / 96
    return common.finish(c, variant)
