"""On-policy distillation (GKD): for a fraction λ = 0.5 of steps the student samples
continuations of WikiText-2 prompts and minimises JSD(β = 0.5) to the teacher on its own
tokens; the other steps use corpus windows.

``distill.onpolicy.temperature`` is the student's *sampling* temperature; ``distill.tau`` is
the *loss* temperature.

Defaults follow the GKD paper (corpus prompts as context, plain JSD). The setting that beat
cross entropy in ``benchmarks/distill_quality.py`` (H100, 2026-11-27: 24.22 vs 24.35 ppl) scores
the prompts, taken from the step's data batch, and normalises JSD:

    python -m experiments.run --config=configs/distill/onpolicy.py --workdir=/tmp/kd-gkd \
      --config.distill.onpolicy.prompt_source=batch --config.distill.onpolicy.score_prompt=True \
      --config.distill.jsd_normalize=True --config.distill.alpha=0.5 \
      --config.distill.onpolicy.prompt_len=448 --config.distill.onpolicy.max_new_tokens=64

    python -m experiments.run --config=configs/distill/onpolicy.py --workdir=/tmp/kd-gkd

CPU smoke run:

    python -m experiments.run --config=configs/distill/onpolicy.py:tiny --workdir=/tmp/kd-gkd-tiny
"""

from configs.distill import common


def get_config(variant: str = ""):
    c = common.distill_base("onpolicy")
    c.distill.divergence = "jsd"
    c.distill.beta = 0.5
    c.train.seqlen = c.distill.onpolicy.prompt_len + c.distill.onpolicy.max_new_tokens
    c.train.batch_size = 64
    c.train.steps = 300
    if variant == "tiny":
        c = common.tiny(c)
        c.train.seqlen = c.distill.onpolicy.prompt_len + c.distill.onpolicy.max_new_tokens
        variant = ""
    return common.finish(c, variant)
