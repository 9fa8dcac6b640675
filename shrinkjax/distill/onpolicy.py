"""Flavour 3, on-policy distillation (GKD, Agarwal et al., 2024).

For a fraction λ (``distill.onpolicy.lam``) of steps the *current* student samples
continuations of prompts (jitted KV-cache sampling with the state's parameters), the teacher
scores them inside the train step, and the student minimises the configured divergence
(``distill.divergence``, usually ``jsd`` with ``distill.beta``) on its own tokens only (the
prompt is context, not target). The other steps use fixed data: windows of the corpus.
Which steps are on-policy, which prompts they use and the sampling seed are pure functions of
(seed, step), so a resumed run repeats them exactly.

``distill.onpolicy.temperature`` (and ``top_k``/``top_p``) is the student's *sampling*
temperature; the loss temperature is ``distill.tau``.

With ``distill.alpha`` > 0 (divergence blended with hard-label cross entropy), the
cross-entropy weight is 0 on on-policy steps: the student's own samples are not labels. The
step then takes its loss mix per batch (``loss_weights``, see :mod:`shrinkjax.train.step`):
off-policy batches ``alpha · CE + (1 − alpha) · D``, on-policy batches ``(1 − alpha) · D``.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from shrinkjax.models.generate import Sampling, generate
from shrinkjax.models.params import nest
from shrinkjax.train.loop import StepBatcher


class OnPolicyBatcher:
    """``batch_fn(step, state)``: off-policy batches from ``base``, on-policy ones sampled by
    the state's student from ``prompts`` (both [B, P + T]).

    ``dynamic``: per-batch entries of a dynamic-loss step (``loss_weights`` [4] over
    :data:`shrinkjax.distill.losses.TERMS`, ``tau``, ``beta``) added to every batch; on
    on-policy batches the cross-entropy weight (``loss_weights[0]``) is set to 0, the other
    weights unchanged (student samples are not labels).
    """

    def __init__(
        self,
        base: StepBatcher,
        prompts_NxP: np.ndarray,
        *,
        lam: float,
        max_new_tokens: int,
        sampling: Sampling,
        seed: int,
        student_cfg,
        eos_id: int | None = None,
        dynamic: dict | None = None,
    ):
        from shrinkjax.models.llama import abstract_model

        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"onpolicy.lam must be in [0, 1], got {lam}")
        p = prompts_NxP.shape[1]
        if base.tokens.shape[1] != p + max_new_tokens:
            raise ValueError(
                f"off-policy windows have length {base.tokens.shape[1]}, on-policy "
                f"sequences {p} + {max_new_tokens}: they must match"
            )
        self.base, self.lam, self.seed = base, float(lam), int(seed)
        self.max_new_tokens, self.sampling, self.eos_id = int(max_new_tokens), sampling, eos_id
        self.prompts = StepBatcher(prompts_NxP, None, base.batch_size, seed + 1)
        cfg = student_cfg.replace(attention_impl="einsum")
        self.graphdef = nnx.graphdef(abstract_model(cfg))
        self.onpolicy_steps = 0
        self.dynamic_off = self.dynamic_on = None
        if dynamic is not None:
            self.dynamic_off = {k: np.asarray(v) for k, v in dynamic.items()}
            self.dynamic_on = dict(self.dynamic_off)
            if "loss_weights" in dynamic:
                w = np.array(dynamic["loss_weights"], np.float32)
                w[0] = 0.0  # TERMS[0] = "ce"
                self.dynamic_on["loss_weights"] = w

    def is_onpolicy(self, step: int) -> bool:
        return bool(np.random.default_rng([self.seed, step, 0x6CD]).random() < self.lam)

    def sample(self, step: int, state) -> dict:
        from shrinkjax.distill.sequence import sequences

        prompts = self.prompts(step)["tokens"]
        model = nnx.merge(self.graphdef, nest(state.params["student"]))
        gen = generate(
            model,
            prompts,
            self.max_new_tokens,
            sampling=self.sampling,
            seed=(self.seed * 1_000_003 + step) % (2**31 - 1),
        )
        toks, mask = sequences(prompts, gen, self.eos_id, train_on_prompt=False)
        return {"tokens": toks, "loss_mask": mask}

    def __call__(self, step: int, state=None) -> dict:
        if not self.is_onpolicy(step):
            batch = self.base(step)
            return batch if self.dynamic_off is None else {**batch, **self.dynamic_off}
        if state is None:
            raise ValueError("on-policy batches need the train state (the student samples)")
        self.onpolicy_steps += 1
        batch = self.sample(step, state)
        a = self.base.grad_accum
        if a > 1:
            batch = {k: v.reshape(a, v.shape[0] // a, *v.shape[1:]) for k, v in batch.items()}
        return batch if self.dynamic_on is None else {**batch, **self.dynamic_on}


def run_onpolicy(
    teacher,
    student,
    tokenizer,
    config,
    workdir: str,
    cache_dir: str = "",
    mask_update=None,
    masks=None,
    apply_masks=None,
):
    """GKD: corpus windows for off-policy steps, student samples for a fraction λ."""
    from shrinkjax.data.windows import windows
    from shrinkjax.distill import losses
    from shrinkjax.distill.logit import Distiller, eval_windows, loss_config
    from shrinkjax.distill.sequence import prompt_corpus, sample_prompts

    tc, oc = config.train, config.distill.onpolicy
    prog = bool(config.get("progress", True))
    ids, seqlen = prompt_corpus(config, "onpolicy", tokenizer, cache_dir)
    d = config.distill.data
    toks, _ = windows(ids, seqlen, max_windows=int(d.get("max_windows", 0) or 0))
    lcfg = loss_config(config.distill, tc.chunk_tokens)
    # alpha > 0: the loss mix changes per batch (no cross entropy on the student's samples)
    dynamic = lcfg.alpha > 0 and lcfg.needs_teacher
    dist = Distiller(
        teacher,
        student,
        config,
        workdir,
        masks=masks,
        apply_masks=apply_masks,
        dynamic_loss=dynamic,
    )
    dyn = None
    if dynamic:
        dyn = {
            "loss_weights": np.asarray(losses.weight_vector(lcfg), np.float32),
            "tau": np.float32(lcfg.tau),
            "beta": np.float32(lcfg.beta),
        }
    prompts = sample_prompts(ids, int(oc.num_prompts), int(oc.prompt_len), dist.seed + 17)
    base = StepBatcher(toks, None, tc.batch_size, dist.seed, tc.grad_accum)
    eos = tokenizer.eos_id if (tokenizer is not None and oc.stop_at_eos) else None
    batcher = OnPolicyBatcher(
        base,
        prompts,
        lam=float(oc.lam),
        max_new_tokens=int(oc.max_new_tokens),
        sampling=Sampling(float(oc.temperature), int(oc.top_k), float(oc.top_p)),
        seed=dist.seed,
        student_cfg=dist.student_cfg,
        eos_id=eos,
        dynamic=dyn,
    )
    ev = eval_windows(config, tokenizer, cache_dir, prog) if tc.eval_windows else None
    summary = dist.fit(batcher, eval_tokens=ev, mask_update=mask_update, desc="on-policy KD")
    summary.update(
        onpolicy_steps=batcher.onpolicy_steps, lam=float(oc.lam), train_windows=len(toks)
    )
    return dist, summary
