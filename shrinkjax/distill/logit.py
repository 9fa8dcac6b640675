"""Flavour 1, logit KD, and the :class:`Distiller` every flavour trains with.

The distiller turns a teacher, a student and a config (``distill``/``train`` sections) into a
sharded, jitted ``train_step`` over a ``Mesh``, a checkpointer, a metrics logger and an
evaluator, and runs :func:`shrinkjax.train.loop.train_loop` with a batch function:

* logit KD: windows of a text corpus, teacher forward inside the step (frozen);
* sequence-level KD (:mod:`.sequence`): teacher completions from disk, cross entropy only;
* on-policy GKD (:mod:`.onpolicy`): a fraction λ of batches sampled by the student itself.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from shrinkjax.distill import losses
from shrinkjax.parallel import mesh as meshlib
from shrinkjax.train import loop as looplib
from shrinkjax.train import metrics as metlib
from shrinkjax.train import state as statelib
from shrinkjax.train import step as steplib


def loss_config(dcfg, chunk: int = 4096) -> losses.LossConfig:
    return losses.LossConfig(
        alpha=float(dcfg.alpha),
        divergence=dcfg.divergence,
        tau=float(dcfg.tau),
        beta=float(dcfg.beta),
        teacher_top_k=int(dcfg.teacher_top_k),
        chunk=int(chunk),
        jsd_normalize=bool(dcfg.get("jsd_normalize", False)),
    )


def hidden_pairs(dcfg, n_student: int, n_teacher: int) -> tuple[tuple[int, int], ...]:
    """(student layer, teacher layer) pairs from ``distill.hidden_layers`` ("s:t" strings or
    pairs); empty = the last layer of each."""
    if not dcfg.hidden_weight:
        return ()
    spec = tuple(p for p in (dcfg.hidden_layers or ()) if p)
    if not spec:
        return ((n_student - 1, n_teacher - 1),)
    out = []
    for p in spec:
        s, t = (int(x) for x in (p.split(":") if isinstance(p, str) else p))
        if not (0 <= s < n_student and 0 <= t < n_teacher):
            raise ValueError(
                f"distill.hidden_layers pair {p!r} out of range "
                f"(student 0..{n_student - 1}, teacher 0..{n_teacher - 1})"
            )
        out.append((s, t))
    return tuple(out)


class Distiller:
    """Everything one distillation run needs; ``fit(batch_fn)`` trains (resuming if a
    checkpoint exists in ``<workdir>/checkpoints``).

    ``dynamic_loss``: batches carry the loss mix (``loss_weights``, ``tau``, ``beta``);
    ``ce_mask``: batches carry a ``ce_mask`` (see :mod:`shrinkjax.train.step`)."""

    def __init__(
        self,
        teacher,
        student,
        config,
        workdir: str,
        *,
        use_teacher: bool | None = None,
        loss_cfg: losses.LossConfig | None = None,
        dynamic_loss: bool = False,
        ce_mask: bool = False,
        apply_masks=None,
        masks: dict | None = None,
        progress: bool | None = None,
    ):
        tc, dc = config.train, config.distill
        self.config, self.workdir = config, workdir
        self.progress = bool(config.get("progress", True)) if progress is None else progress
        self.loss_cfg = loss_cfg or loss_config(dc, tc.chunk_tokens)
        self.optimizer, self.schedule = statelib.optimizer_from_config(tc)
        self.apply_masks = apply_masks
        pairs = hidden_pairs(dc, student.cfg.n_layers, teacher.cfg.n_layers)
        if use_teacher is None:
            use_teacher = self.loss_cfg.needs_teacher or bool(pairs) or dynamic_loss
        compute, attn = tc.compute_dtype, tc.attention_impl
        self.student_cfg = student.cfg.replace(dtype=compute, attention_impl=attn)
        self.teacher_cfg = teacher.cfg.replace(dtype=compute, attention_impl=attn)
        seed = int(tc.get("seed", config.seed))
        self.seed = seed
        proj = statelib.init_projections(student.cfg, teacher.cfg, pairs, seed)
        state = statelib.create_train_state(
            student,
            self.optimizer,
            seed=seed,
            compute_dtype=compute,
            attention_impl=attn,
            teacher=teacher if use_teacher else None,
            proj=proj,
            masks=masks,
        )
        self.step_cfg = steplib.StepConfig(
            loss=self.loss_cfg,
            grad_accum=int(tc.grad_accum),
            hidden_weight=float(dc.hidden_weight),
            hidden_pairs=pairs,
            scan_layers=bool(tc.scan_layers),
            remat=tc.remat,
            low_precision_backward=bool(tc.get("low_precision_backward", False)),
        )
        fn = steplib.make_train_step(
            self.student_cfg,
            self.optimizer,
            self.step_cfg,
            self.teacher_cfg if use_teacher else None,
            self.schedule,
            apply_masks,
        )
        self.mesh = meshlib.make_mesh(int(tc.mesh_data), int(tc.mesh_fsdp))
        dp = meshlib.data_parallel_size(self.mesh)
        mb = tc.batch_size // tc.grad_accum
        if mb % dp:
            raise ValueError(
                f"train.batch_size / grad_accum = {mb} is not a multiple of the "
                f"{dp} data-parallel devices of the mesh"
            )
        shape = (tc.grad_accum, mb, tc.seqlen) if tc.grad_accum > 1 else (tc.batch_size, tc.seqlen)
        example = {"tokens": np.zeros(shape, np.int32), "loss_mask": np.ones(shape, bool)}
        if ce_mask:  # batches carry their own cross-entropy mask (on-policy samples)
            example["ce_mask"] = np.ones(shape, bool)
        if dynamic_loss:
            example.update(
                loss_weights=np.zeros(4, np.float32), tau=np.float32(1.0), beta=np.float32(0.5)
            )
        self.batch_axis = 1 if tc.grad_accum > 1 else 0
        self.step_fn, self.state_sh, self.batch_sh = steplib.jit_train_step(
            fn, self.mesh, state, example, self.batch_axis
        )
        self.state = jax.device_put(state, self.state_sh)
        self.teacher_eval_flat = None
        if not use_teacher:  # the evaluator still reports KL to the teacher
            tflat = statelib.frozen_params(teacher, compute)
            self.teacher_eval_flat = jax.device_put(
                tflat, meshlib.param_shardings(self.mesh, tflat)
            )
        self.ckpt = None
        if tc.checkpoint_every >= 0:
            from shrinkjax.train.checkpoint import Checkpointer

            self.ckpt = Checkpointer(
                os.path.join(workdir, "checkpoints"), keep=int(tc.keep_checkpoints)
            )
        self.logger = metlib.MetricsLogger(workdir, tensorboard=bool(tc.tensorboard))
        eval_cfg = self.student_cfg.replace(attention_impl="einsum")
        teval_cfg = self.teacher_cfg.replace(attention_impl="einsum")
        self.evaluator = metlib.Evaluator(
            steplib.Forward(eval_cfg, bool(tc.scan_layers)),
            steplib.Forward(teval_cfg, bool(tc.scan_layers)),
            chunk=int(tc.chunk_tokens),
        )
        self.eval_tokens: np.ndarray | None = None
        self.flops_per_token = metlib.train_flops_per_token(
            self.student_cfg, int(tc.seqlen), self.teacher_cfg if use_teacher else None
        )

    # ------------------------------------------------------------------ pieces

    def teacher_flat(self, state=None):
        state = state or self.state
        if state.frozen is not None:
            return state.frozen["teacher"]
        return self.teacher_eval_flat

    def evaluate(self, state=None, tokens_WxL: np.ndarray | None = None) -> dict:
        """Student perplexity, teacher perplexity and KL(p_T‖p_S) on the eval windows."""
        state = state or self.state
        toks = self.eval_tokens if tokens_WxL is None else tokens_WxL
        if toks is None or len(toks) == 0:
            return {}
        bs = int(self.config.train.eval_batch_size)
        dp = meshlib.data_parallel_size(self.mesh)
        bs = max(dp, bs - bs % dp)
        sh = meshlib.batch_sharding(self.mesh, 2)
        return self.evaluator(
            state.params["student"],
            toks,
            bs,
            self.teacher_flat(state),
            progress=False,
            shardings=sh,
        )

    def restore(self) -> int:
        """Resume from the latest checkpoint (if any); returns the step."""
        self.state, start, _ = looplib.restore_or_init(self.state, self.state_sh, self.ckpt)
        return start

    def fit(
        self,
        batch_fn,
        steps: int | None = None,
        eval_tokens: np.ndarray | None = None,
        mask_update=None,
        desc: str = "distill",
        on_metrics=None,
    ) -> dict:
        tc = self.config.train
        if eval_tokens is not None:
            self.eval_tokens = eval_tokens
        self.restore()
        cfg = looplib.LoopConfig(
            steps=int(steps or tc.steps),
            log_every=int(tc.log_every),
            eval_every=int(tc.eval_every),
            checkpoint_every=max(int(tc.checkpoint_every), 0),
            progress=self.progress,
            flops_per_token=self.flops_per_token,
            peak_flops=float(tc.peak_flops),
            desc=desc,
        )
        eval_fn = self.evaluate if self.eval_tokens is not None else None
        meta = {"seed": self.seed, "kind": self.config.distill.kind}
        try:
            self.state, summary = looplib.train_loop(
                self.state,
                self.step_fn,
                batch_fn,
                cfg,
                batch_shardings=self.batch_sh,
                logger=self.logger,
                ckpt=self.ckpt,
                eval_fn=eval_fn,
                mask_update=mask_update,
                meta=meta,
                on_metrics=on_metrics,
                apply_masks=self.apply_masks,
                state_shardings=self.state_sh,
            )
        except BaseException as e:
            if getattr(e, "state", None) is not None:
                self.state = e.state
            raise
        return summary

    def student_model(self, dtype: str = "float32"):
        """The trained student as an ordinary model (f32 by default) for later stages."""
        from shrinkjax.models.params import model_from_params

        flat = {k: np.asarray(jax.device_get(v)) for k, v in self.state.params["student"].items()}
        cfg = self.student_cfg.replace(dtype=dtype, attention_impl="einsum")
        return model_from_params(cfg, flat, source="distill")

    def close(self):
        if self.ckpt is not None:
            self.ckpt.close()
        self.logger.close()


# ----------------------------------------------------------------------------- data


def corpus_windows(
    text_cfg, tokenizer, seqlen: int, cache_dir: str = "", progress: bool = True
) -> np.ndarray:
    """Non-overlapping token windows [W, seqlen] of a text source (``source``/``path``)."""
    from shrinkjax.data.sources import load_text
    from shrinkjax.data.windows import tokenize, windows

    text = load_text(text_cfg.source, text_cfg.path)
    ids = tokenize(text, tokenizer, cache_dir=cache_dir, progress=progress)
    toks, _ = windows(ids, seqlen, max_windows=int(text_cfg.get("max_windows", 0) or 0))
    return toks


def eval_windows(config, tokenizer, cache_dir: str = "", progress: bool = True) -> np.ndarray:
    """Held-out windows for eval perplexity (the ``data`` section, ``train.eval_windows``)."""
    from shrinkjax.data.sources import load_text
    from shrinkjax.data.windows import tokenize, windows

    d = config.data
    text = load_text(d.source, d.path)
    ids = tokenize(text, tokenizer, cache_dir=cache_dir, progress=progress)
    toks, _ = windows(ids, d.seqlen, max_windows=int(config.train.eval_windows))
    return toks


def run_logit(
    teacher,
    student,
    tokenizer,
    config,
    workdir: str,
    cache_dir: str = "",
    mask_update=None,
    masks=None,
    apply_masks=None,
) -> tuple[Distiller, dict]:
    """Logit KD on ``distill.data``: windows of ``train.seqlen`` tokens of a text source, or
    (``source='dataset'``, ``path`` = a directory with ``tokens.npy``/``loss_mask.npy``) a
    saved sequence dataset such as the teacher text written by sequence KD."""
    tc = config.train
    prog = bool(config.get("progress", True))
    d = config.distill.data
    mask = None
    if d.source == "dataset":  # a saved sequence dataset (e.g. teacher text of sequence KD)
        toks = np.load(os.path.join(d.path, "tokens.npy"))
        mask = np.load(os.path.join(d.path, "loss_mask.npy"))
        if toks.shape[1] != tc.seqlen:
            raise ValueError(
                f"{d.path}: sequences of {toks.shape[1]} tokens, train.seqlen={tc.seqlen}"
            )
    else:
        toks = corpus_windows(d, tokenizer, tc.seqlen, cache_dir, prog)
    dist = Distiller(teacher, student, config, workdir, masks=masks, apply_masks=apply_masks)
    ev = eval_windows(config, tokenizer, cache_dir, prog) if tc.eval_windows else None
    batcher = looplib.StepBatcher(toks, mask, tc.batch_size, dist.seed, tc.grad_accum)
    summary = dist.fit(batcher, eval_tokens=ev, mask_update=mask_update, desc="logit KD")
    summary["train_windows"] = len(toks)
    summary["epochs"] = batcher.epoch_of(int(tc.steps))
    return dist, summary
