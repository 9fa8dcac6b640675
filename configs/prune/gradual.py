"""Gradual magnitude pruning of SmolLM2-135M to 50% during logit distillation from its dense
self (Zhu & Gupta 2017 cubic schedule: 0 → 50% between steps 0 and 600, masks recomputed
every 50 steps and re-applied after every update, kept in the training checkpoints).

The ``prune`` stage (method ``gradual``) hands ``ctx.state['masks']`` / ``['mask_update']`` to
the ``distill`` stage, whose student here is the whole teacher (``drop_layers=""``).

    python -m experiments.run --config=configs/prune/gradual.py --workdir=/tmp/gradual
"""

from configs.distill import common as distill_common
from shrinkjax.sparse.stage import default_config


def get_config(variant: str = ""):
    c = distill_common.distill_base("logit")
    c.stages = ("load", "prune", "distill", "evaluate")
    c.prune = default_config()
    c.prune.method = "gradual"
    c.prune.pattern = ""  # unstructured, at the schedule's sparsity
    c.prune.schedule.update(
        initial_sparsity=0.0, final_sparsity=0.5, begin_step=0, end_step=600, frequency=50
    )
    c.student.init = "drop_layers"
    c.student.drop_layers = ""  # the student is the full model
    c.train.update(steps=800, batch_size=16, seqlen=2048)
    if variant == "tiny":
        c = distill_common.tiny(c)
        c.student.drop_layers = ""
        c.prune.schedule.update(end_step=4, frequency=2)
    elif variant:
        raise ValueError(f"unknown config variant {variant!r} (known: tiny)")
    c.lock()
    return c
