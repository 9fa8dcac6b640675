"""Sequence-level KD: the teacher samples completions of WikiText-2 prompts (saved to
``<workdir>/teacher_data``), the student (teacher minus layers 12–17) learns them with cross
entropy.

``distill.sequence.temperature`` is the teacher's *sampling* temperature; there is no loss
temperature here (plain cross entropy).

    python -m experiments.run --config=configs/distill/sequence.py --workdir=/tmp/kd-seq

CPU smoke run:

    python -m experiments.run --config=configs/distill/sequence.py:tiny --workdir=/tmp/kd-seq-tiny
"""

from configs.distill import common


def get_config(variant: str = ""):
    c = common.distill_base("sequence")
    c.distill.alpha = 1.0
    c.distill.divergence = "none"
    c.train.seqlen = c.distill.sequence.prompt_len + c.distill.sequence.max_new_tokens
    c.train.batch_size = 64
    c.train.steps = 250  # 8.2M tokens: ~1.1 epochs of the 16384 teacher sequences
    c.distill.sequence.num_prompts = 16384
    if variant == "tiny":
        c = common.tiny(c)
        c.train.seqlen = c.distill.sequence.prompt_len + c.distill.sequence.max_new_tokens
        variant = ""
    return common.finish(c, variant)
