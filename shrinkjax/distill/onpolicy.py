"""Flavour 3, on-policy distillation (GKD, Agarwal et al., 2024).

For a fraction λ (``distill.onpolicy.lam``) of steps the *current* student samples
continuations of prompts (jitted KV-cache sampling with the state's parameters), the teacher
scores them inside the train step, and the student minimises the configured divergence
(``distill.divergence``, usually ``jsd`` with ``distill.beta``) on its own tokens. The other
steps use fixed data: windows of the corpus. Which steps are on-policy, which prompts they
use and the sampling seed are pure functions of (seed, step), so a resumed run repeats them
exactly.

Prompts (``distill.onpolicy.prompt_source``): ``corpus`` — ``num_prompts`` slices of
``prompt_len`` tokens at random offsets of the corpus; ``batch`` — the first
``prompt_len`` tokens of the off-policy batch of the same step (on-policy steps then consume
the same data stream as off-policy ones, only the tail is the student's).

``distill.onpolicy.score_prompt``: the prompt is context only (False: the GKD paper's
setting), or its tokens are scored like an off-policy batch (True: the loss mask of the data
on the prompt, cross entropy included; the step then spends the student and teacher forward
passes it computes anyway on every position, not only the sampled tail).

``distill.onpolicy.temperature`` (and ``top_k``/``top_p``) is the student's *sampling*
temperature; the loss temperature is ``distill.tau``.

With ``distill.alpha`` > 0 (divergence blended with hard-label cross entropy), cross entropy
never scores the student's own samples (they are not labels): every batch carries a
``ce_mask`` (see :mod:`shrinkjax.train.step`) that is False on sampled tokens, so on-policy
steps are ``alpha · CE`` on scored prompt tokens ``+ (1 − alpha) · D`` on every scored token.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from shrinkjax.models.generate import Sampling, generate
from shrinkjax.models.params import nest
from shrinkjax.train.loop import StepBatcher

PROMPT_SOURCES = ("corpus", "batch")


class OnPolicyBatcher:
    """``batch_fn(step, state)``: off-policy batches from ``base``, on-policy ones sampled by
    the state's student from ``prompts_NxP`` or, when it is None, from the first
    ``seqlen − max_new_tokens`` tokens of the base batch of that step (both [B, P + T]).

    Every batch has a ``ce_mask`` (the off-policy one = its loss mask; on-policy: the scored
    prompt tokens, never the sampled ones). ``score_prompt``: on-policy prompts are scored
    with the base data's loss mask (``prompts_NxP`` None only) instead of being context.

    ``dynamic``: per-batch entries of a dynamic-loss step (``loss_weights`` [4] over
    :data:`shrinkjax.distill.losses.TERMS`, ``tau``, ``beta``) added to every batch.
    """

    def __init__(
        self,
        base: StepBatcher,
        prompts_NxP: np.ndarray | None,
        *,
        lam: float,
        max_new_tokens: int,
        sampling: Sampling,
        seed: int,
        student_cfg,
        eos_id: int | None = None,
        dynamic: dict | None = None,
        score_prompt: bool = False,
    ):
        from shrinkjax.models.llama import abstract_model

        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"onpolicy.lam must be in [0, 1], got {lam}")
        seqlen = base.tokens.shape[1]
        if prompts_NxP is None:
            if not 0 < max_new_tokens < seqlen:
                raise ValueError(
                    f"onpolicy.max_new_tokens={max_new_tokens} must be in [1, {seqlen - 1}] "
                    f"to continue prompts cut from the {seqlen}-token data windows"
                )
            self.prompts = None
        else:
            if score_prompt:
                raise ValueError(
                    "score_prompt needs the prompts to come from the data batches "
                    "(prompt_source='batch'): corpus prompts have no loss mask"
                )
            p = prompts_NxP.shape[1]
            if seqlen != p + max_new_tokens:
                raise ValueError(
                    f"off-policy windows have length {seqlen}, on-policy "
                    f"sequences {p} + {max_new_tokens}: they must match"
                )
            self.prompts = StepBatcher(prompts_NxP, None, base.batch_size, seed + 1)
        self.base, self.lam, self.seed = base, float(lam), int(seed)
        self.max_new_tokens, self.sampling, self.eos_id = int(max_new_tokens), sampling, eos_id
        self.score_prompt = bool(score_prompt)
        cfg = student_cfg.replace(attention_impl="einsum")
        self.graphdef = nnx.graphdef(abstract_model(cfg))
        self.onpolicy_steps = 0
        self.dynamic = None if dynamic is None else {k: np.asarray(v) for k, v in dynamic.items()}

    def is_onpolicy(self, step: int) -> bool:
        return bool(np.random.default_rng([self.seed, step, 0x6CD]).random() < self.lam)

    def _flat_base(self, step: int) -> dict:
        b = self.base(step)
        return {k: v.reshape(-1, v.shape[-1]) for k, v in b.items()}

    def sample(self, step: int, state) -> dict:
        """The on-policy batch of ``step`` ([B, P + T] tokens, loss and CE masks)."""
        from shrinkjax.distill.sequence import completion_mask

        if self.prompts is None:
            data = self._flat_base(step)
            p = data["tokens"].shape[1] - self.max_new_tokens
            prompts = data["tokens"][:, :p]
            prompt_mask = (
                data["loss_mask"][:, :p]
                if self.score_prompt and "loss_mask" in data
                else np.full(prompts.shape, self.score_prompt)
            )
        else:
            prompts = self.prompts(step)["tokens"]
            prompt_mask = np.zeros(prompts.shape, bool)
        model = nnx.merge(self.graphdef, nest(state.params["student"]))
        gen = np.asarray(
            generate(
                model,
                prompts,
                self.max_new_tokens,
                sampling=self.sampling,
                seed=(self.seed * 1_000_003 + step) % (2**31 - 1),
            )
        )
        toks = np.concatenate([prompts, gen], axis=1).astype(np.int32)
        sampled = completion_mask(gen, self.eos_id)
        return {
            "tokens": toks,
            "loss_mask": np.concatenate([prompt_mask, sampled], axis=1),
            "ce_mask": np.concatenate([prompt_mask, np.zeros_like(sampled)], axis=1),
        }

    def __call__(self, step: int, state=None) -> dict:
        if not self.is_onpolicy(step):
            batch = self.base(step)
            batch = {**batch, "ce_mask": batch["loss_mask"]}  # data: CE on every target
        else:
            if state is None:
                raise ValueError("on-policy batches need the train state (the student samples)")
            self.onpolicy_steps += 1
            batch = self.sample(step, state)
            a = self.base.grad_accum
            if a > 1:
                batch = {k: v.reshape(a, v.shape[0] // a, *v.shape[1:]) for k, v in batch.items()}
        return batch if self.dynamic is None else {**batch, **self.dynamic}


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
    from shrinkjax.distill.logit import Distiller, eval_windows
    from shrinkjax.distill.sequence import prompt_corpus, sample_prompts

    tc, oc = config.train, config.distill.onpolicy
    prog = bool(config.get("progress", True))
    ids, seqlen = prompt_corpus(config, "onpolicy", tokenizer, cache_dir)
    d = config.distill.data
    toks, _ = windows(ids, seqlen, max_windows=int(d.get("max_windows", 0) or 0))
    source = str(oc.prompt_source)
    if source not in PROMPT_SOURCES:
        raise ValueError(
            f"distill.onpolicy.prompt_source must be one of {PROMPT_SOURCES}, got {source!r}"
        )
    # cross entropy is masked off the student's samples by each batch's ce_mask
    dist = Distiller(
        teacher, student, config, workdir, masks=masks, apply_masks=apply_masks, ce_mask=True
    )
    prompts = None
    if source == "corpus":
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
        score_prompt=bool(oc.score_prompt),
    )
    ev = eval_windows(config, tokenizer, cache_dir, prog) if tc.eval_windows else None
    summary = dist.fit(batcher, eval_tokens=ev, mask_update=mask_update, desc="on-policy KD")
    summary.update(
        onpolicy_steps=batcher.onpolicy_steps, lam=float(oc.lam), train_windows=len(toks)
    )
    return dist, summary
