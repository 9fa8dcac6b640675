"""Minitron-style structural pruning of SmolLM2-135M to ~90M parameters, then healing by
logit distillation from the dense teacher (prune-then-heal).

Width pruning (the paper's recommendation over depth): embedding channels 576 → 512 and MLP
channels 1536 → 896, heads (9 query / 3 kv) and layers (30) kept = 90,077,696 parameters.
Importance from 128 × 2048 calibration tokens of WikiText-2 valid. The ``prune`` stage saves the
pruned model to ``<workdir>/pruned_model`` and points ``student.spec`` there; ``distill`` then
trains it (logit KD, forward KL, τ = 1) for ``train.steps × train.batch_size × train.seqlen``
tokens (default 400 × 16 × 2048 = 13.1M) of WikiText-2 valid; ``evaluate`` reports the healed
WikiText-2 test perplexity (the pre-healing perplexity is ``results/prune.json``'s ``ppl``).

    python -m experiments.run --config=configs/prune/minitron.py --workdir=/tmp/minitron \\
        [--config.train.steps=200] [--config.prune.minitron.n_layers=26]

``:tiny`` is a CPU smoke run (tiny random Llama, a few KD steps).
"""

from configs.distill import common as distill_common
from configs.prune import common
from shrinkjax.sparse.stage import default_config


def get_config(variant: str = ""):
    c = distill_common.distill_base("logit")
    c.stages = ("load", "prune", "distill", "evaluate")
    c.prune = default_config()
    c.prune.method = "minitron"
    c.prune.calib.path = common.WIKITEXT_CALIB
    c.prune.minitron.update(dim=512, hidden_dim=896)
    c.prune.evaluate = True  # perplexity before healing
    c.student.init = "load"
    c.student.spec = ""  # filled by the prune stage with its checkpoint
    c.train.update(steps=400, batch_size=16, seqlen=2048, lr=2e-4, warmup_steps=40)
    if variant == "tiny":
        c = distill_common.tiny(c)
        c.student.init = "load"
        c.prune.calib.update(source="pydoc", path="", seqlen=32, max_windows=4, batch_size=2)
        c.prune.minitron.update(dim=48, hidden_dim=64, n_heads=2, n_kv_heads=1, n_layers=0)
    elif variant:
        raise ValueError(f"unknown config variant {variant!r} (known: tiny)")
    c.lock()
    return c


def get_sweep():
    return [
        {"prune.minitron.dim": 512, "prune.minitron.hidden_dim": 896},  # width: 90.1M
        {"prune.minitron.dim": 0, "prune.minitron.hidden_dim": 0, "prune.minitron.n_layers": 18},
        {
            "prune.minitron.dim": 512,
            "prune.minitron.hidden_dim": 1024,
            "prune.minitron.n_layers": 27,
        },
    ]
