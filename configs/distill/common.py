"""Shared sections of the distillation configs (``student``, ``distill``, ``train``).

Not a config itself: ``logit.py``, ``sequence.py`` and ``onpolicy.py`` build on
:func:`distill_base` and pick a flavour. Every config takes a variant after a colon:
``--config=configs/distill/logit.py:tiny`` is the CPU-sized run (the tiny random Llama in
tests/golden, pydoc text) that tests and smoke checks use.

Two temperatures, never to be confused:

* ``distill.tau`` — the *loss* temperature: logits are divided by τ before the softmax of
  both teacher and student in the divergence, which is multiplied by τ² (Hinton et al.).
* ``distill.sequence.temperature`` / ``distill.onpolicy.temperature`` — the *sampling*
  temperature when the teacher (sequence KD) or the student (on-policy) generates text.
"""

import os

from ml_collections import ConfigDict

from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("SHRINKJAX_DATA", os.path.join(ROOT, "..", "shared", "data"))
TINY_TEACHER = default.TINY_TEACHER


def data_file(*parts: str) -> str:
    return os.path.normpath(os.path.join(DATA, *parts))


def distill_base(kind: str) -> ConfigDict:
    c = default.base()
    c.stages = ("load", "distill", "evaluate")
    c.model.teacher = "smollm2"
    # evaluation text (the evaluate stage, and the periodic eval of train.eval_windows windows)
    c.data.source = "file"
    c.data.path = data_file("wikitext-2-raw", "test.txt")
    c.data.seqlen = 2048
    c.data.max_windows = 0
    c.data.batch_size = 4
    c.evaluate.metrics = ("perplexity", "compare", "samples")
    c.student = ConfigDict(
        dict(
            init="drop_layers",  # drop_layers | scratch | load
            drop_layers="12-17",  # teacher layers removed (init=drop_layers): "12-17", "3,5", ...
            spec="",  # init=load: a model file/directory (must share the teacher's tokenizer)
            tokenizer="",  # optional student tokenizer dir, checked against the teacher's
            # init=scratch: sizes (0 = the teacher's); the vocabulary must be the teacher's
            vocab_size=0,
            dim=0,
            n_layers=0,
            n_heads=0,
            n_kv_heads=0,
            hidden_dim=0,
            head_dim=0,
            seed=0,
        )
    )
    c.distill = ConfigDict(
        dict(
            kind=kind,  # logit | sequence | onpolicy
            # loss = alpha * CE(labels) + (1 - alpha) * tau^2 * D(p_T, p_S), loss temperature tau
            # (never CE on the student's own on-policy samples: (1 - alpha) * D there)
            alpha=0.0,
            divergence="forward_kl",  # forward_kl | reverse_kl | jsd | none
            tau=1.0,  # LOSS temperature (not the sampling temperature)
            beta=0.5,  # JSD(beta): 0 = forward KL, 1 = reverse KL
            jsd_normalize=False,  # JSD(beta) / (beta (1 - beta)): a KL's curvature at p_S = p_T
            teacher_top_k=0,  # >0: only the teacher's top-k logits (renormalised)
            hidden_weight=0.0,  # >0: + MSE of hidden states (learned proj. if widths differ)
            hidden_layers=("",),  # "student:teacher" layer pairs; "" = last of each
            data=ConfigDict(
                dict(
                    source="file",
                    path=data_file("wikitext-2-tokenized", "valid.txt"),
                    max_windows=0,
                )
            ),  # training text
            sequence=ConfigDict(
                dict(
                    num_prompts=2048,
                    prompt_len=64,
                    max_new_tokens=448,
                    temperature=1.0,  # SAMPLING temperature of the teacher's generation
                    top_k=0,
                    top_p=1.0,
                    batch_size=256,
                    dataset_dir="",
                    stop_at_eos=True,
                    train_on_prompt=False,
                )
            ),
            onpolicy=ConfigDict(
                dict(
                    lam=0.5,  # fraction of steps on student samples
                    num_prompts=4096,
                    prompt_len=64,
                    max_new_tokens=448,
                    temperature=1.0,  # SAMPLING temperature of the student's generation
                    top_k=0,
                    top_p=1.0,
                    stop_at_eos=True,
                    # corpus: num_prompts random slices of prompt_len tokens; batch: the first
                    # prompt_len tokens of the step's data batch (same stream as off-policy)
                    prompt_source="corpus",
                    score_prompt=False,  # batch prompts: score them like data (CE + D)
                )
            ),
        )
    )
    c.train = ConfigDict(
        dict(
            steps=1000,
            batch_size=16,
            seqlen=2048,
            grad_accum=1,
            optimizer="adamw",
            lr=2e-4,
            schedule="cosine",
            warmup_steps=50,
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.0,
            clip_norm=1.0,
            momentum=0.9,
            compute_dtype="bfloat16",
            attention_impl="cudnn",
            scan_layers=True,
            remat="none",  # none | full | dots
            # backward GEMMs of bf16 linears in bf16 with f32 accumulation, as PyTorch autocast
            # (H100, 2026-11-27: 1.24x the quality step and 1.40x the 8x2048 step; fkl ppl
            # 24.06 vs 24.09 with f32 backward GEMMs). False: autodiff's f32 cotangent GEMMs
            low_precision_backward=True,
            chunk_tokens=4096,  # tokens per chunk of the vocabulary-sized loss
            mesh_data=-1,
            mesh_fsdp=1,  # mesh axes (-1 = all remaining devices)
            seed=0,
            log_every=10,
            eval_every=200,
            eval_windows=16,
            eval_batch_size=4,
            checkpoint_every=200,  # steps; 0 = only at the end, -1 = never
            keep_checkpoints=3,
            tensorboard=True,
            peak_flops=0.0,  # 0 = from the device kind (for MFU)
        )
    )
    return c


def tiny(c: ConfigDict) -> ConfigDict:
    """CPU-sized: tiny random teacher (2 layers, vocab 128), 1-layer student, pydoc text."""
    c = default.shrink_to_tiny(c)
    c.student.drop_layers = "1"
    c.distill.data.source = "pydoc"
    c.distill.data.path = ""
    c.distill.data.max_windows = 64
    c.distill.sequence.update(num_prompts=8, prompt_len=8, max_new_tokens=24, batch_size=4)
    c.distill.onpolicy.update(num_prompts=8, prompt_len=8, max_new_tokens=24)
    c.train.update(
        steps=6,
        batch_size=4,
        seqlen=32,
        lr=3e-3,
        warmup_steps=1,
        compute_dtype="float32",
        attention_impl="einsum",
        chunk_tokens=64,
        log_every=1,
        eval_every=3,
        eval_windows=2,
        eval_batch_size=2,
        checkpoint_every=2,
        keep_checkpoints=2,
        tensorboard=True,
    )
    return c


def finish(c: ConfigDict, variant: str) -> ConfigDict:
    return default.finish(c, variant, tiny)
