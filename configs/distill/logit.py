"""Logit KD: SmolLM2-135M-Instruct teaches itself minus layers 12–17 on WikiText-2 valid text.

Forward KL at loss temperature τ = 1 (``distill.tau``), teacher forward inside the jitted
step, bf16 compute, cuDNN attention, seqlen 2048; eval on WikiText-2 raw test.

    python -m experiments.run --config=configs/distill/logit.py --workdir=/tmp/kd-logit

CPU smoke run (tiny random teacher):

    python -m experiments.run --config=configs/distill/logit.py:tiny --workdir=/tmp/kd-tiny

Rerunning the same command resumes from the last checkpoint in the workdir.
"""

from configs.distill import common


def get_config(variant: str = ""):
    c = common.distill_base("logit")
    # 200 x 16 x 2048 = 6.6M tokens, ~23 epochs of WikiText-2 valid: for more distinct text
    # set distill.data.source='dataset', distill.data.path=<a sequence-KD teacher_data dir>
    c.train.steps = 200
    return common.finish(c, variant)
