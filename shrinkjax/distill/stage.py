"""The ``distill`` stage: train a student from the loaded teacher, hand it to later stages.

Reads ``ctx.config.student`` (how the student is made; see
:func:`shrinkjax.models.surgery.build_student`), ``ctx.config.distill`` (flavour and loss) and
``ctx.config.train`` (optimizer, batch, mesh, checkpoints, logging); needs ``load`` first
(``ctx.state['teacher']``, ``ctx.state['tokenizer']``). Afterwards ``ctx.state['model']`` is the
trained student (f32), so a following ``evaluate`` stage measures it (and ``compare`` measures
it against the teacher).

Workdir: ``checkpoints/`` (orbax), ``metrics.jsonl`` (``kind`` train/eval lines), ``tb/``
(TensorBoard), ``teacher_data/`` (sequence KD). Rerunning the same command resumes.

Pruning hook: ``ctx.state['masks']`` (initial ``{param name: mask}``), ``ctx.state['mask_update']``
(``fn(step, params, masks) -> masks``, run after every step) and ``ctx.state['apply_masks']``
(``fn(params, masks) -> params``, inside the jitted step after every update; default
params ⊙ masks), when an earlier stage puts them there — e.g. from
``shrinkjax.sparse.schedule.gradual_hooks``.
"""

from __future__ import annotations

import numpy as np

from shrinkjax.stages import RunContext, register

FLAVOURS = ("logit", "sequence", "onpolicy")


@register("distill")
def distill_stage(ctx: RunContext) -> dict:
    from shrinkjax.models.params import param_count
    from shrinkjax.models.surgery import build_student

    if "teacher" not in ctx.state:
        raise ValueError("the distill stage needs a teacher: put the 'load' stage before it")
    c = ctx.config
    kind = c.distill.kind
    if kind not in FLAVOURS:
        raise ValueError(f"distill.kind must be one of {FLAVOURS}, got {kind!r}")
    teacher, tok = ctx.state["teacher"], ctx.state.get("tokenizer")
    student, _ = build_student(teacher, c.student, tok, dtype="float32")
    cache = c.data.get("cache_dir") or ctx.path("cache", "")
    hook = ctx.state.get("mask_update")
    if kind == "logit":
        from shrinkjax.distill.logit import run_logit as run
    elif kind == "sequence":
        from shrinkjax.distill.sequence import run_sequence as run
    else:
        from shrinkjax.distill.onpolicy import run_onpolicy as run
    dist, summary = run(
        teacher,
        student,
        tok,
        c,
        ctx.workdir,
        cache_dir=cache,
        mask_update=hook,
        masks=ctx.state.get("masks"),
        apply_masks=ctx.state.get("apply_masks"),
    )
    try:
        model = dist.student_model("float32")
    finally:
        dist.close()
    ctx.state.update(model=model, model_name=f"student ({kind} KD)")
    res = {
        "kind": kind,
        "student_layers": model.cfg.n_layers,
        "student_params": param_count(model),
        "teacher_params": param_count(teacher),
    }
    for k, v in summary.items():
        if isinstance(v, int | float | str | np.floating | np.integer):
            res[k] = v.item() if hasattr(v, "item") else v
    fe = summary.get("final_eval") or {}
    for k in ("ppl", "kl", "teacher_ppl"):
        if k in fe:
            res[f"eval_{k}"] = fe[k]
    res["evals"] = summary.get("evals", [])
    return res
