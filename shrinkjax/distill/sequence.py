"""Flavour 2, sequence-level KD (Kim & Rush, 2016): the teacher writes completions of prompts
(batched, jitted KV-cache sampling from :mod:`shrinkjax.models.generate`), they are saved to
disk as a dataset, and the student is trained on them with plain cross entropy.

Dataset directory (``distill.sequence.dataset_dir``, default ``<workdir>/teacher_data``)::

    tokens.npy       int32 [N, P + T]   prompt followed by the teacher's completion
    loss_mask.npy    bool  [N, P + T]   True on completion tokens up to the first EOS
    meta.json        what produced it (prompts, sampling, teacher); reused when it matches
    shards-<hash>/   per-batch pieces while generating (a killed run resumes generation)

``distill.sequence.temperature``/``top_k``/``top_p`` are *sampling* settings of the teacher's
generation; they have nothing to do with the loss temperature ``distill.tau``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np
from flax import nnx

from shrinkjax.io.files import write_json
from shrinkjax.models.generate import Sampling, generate
from shrinkjax.models.params import nest
from shrinkjax.train.state import flat_state


def sampling_model(model, dtype: str | None = None, flat: dict | None = None):
    """A view of ``model`` (or of ``flat`` params with ``model``'s config) that samples in
    ``dtype`` with einsum attention (the KV-cache path); no weight copies."""
    from shrinkjax.models.llama import abstract_model

    cfg = model.cfg.replace(dtype=dtype or model.cfg.dtype, attention_impl="einsum")
    gd = nnx.graphdef(abstract_model(cfg))
    return nnx.merge(gd, nest(flat if flat is not None else flat_state(model)))


def sample_prompts(ids: np.ndarray, n: int, prompt_len: int, seed: int) -> np.ndarray:
    """``n`` prompts [n, prompt_len]: token slices at seeded random offsets of a stream."""
    if len(ids) <= prompt_len:
        raise ValueError(f"corpus has {len(ids)} tokens, fewer than prompt_len={prompt_len}")
    rng = np.random.default_rng([seed, 0x5EC])
    starts = rng.integers(0, len(ids) - prompt_len, size=n)
    return np.stack([ids[s : s + prompt_len] for s in starts]).astype(np.int32)


def completion_mask(gen_BxT: np.ndarray, eos_id: int | None) -> np.ndarray:
    """True on generated tokens up to and including the first EOS."""
    m = np.ones(gen_BxT.shape, bool)
    if eos_id is None:
        return m
    is_eos = gen_BxT == eos_id
    after = np.cumsum(is_eos, axis=1) - is_eos  # EOS tokens strictly before this one
    return after == 0


def sequences(
    prompts_BxP: np.ndarray, gen_BxT: np.ndarray, eos_id: int | None, train_on_prompt: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P+T], loss mask [B, P+T]) of prompt + completion."""
    toks = np.concatenate([prompts_BxP, gen_BxT], axis=1).astype(np.int32)
    pm = np.full(prompts_BxP.shape, bool(train_on_prompt))
    return toks, np.concatenate([pm, completion_mask(gen_BxT, eos_id)], axis=1)


class GenerationIncomplete(RuntimeError):
    """``generate_dataset`` stopped at its deadline; the finished batches are saved as shards
    and the same call resumes from them."""

    def __init__(self, done: int, total: int, out_dir: str):
        super().__init__(
            f"teacher generation stopped at its deadline after {done}/{total} batches "
            f"(shards kept in {out_dir}; the same call resumes)"
        )
        self.done, self.total, self.out_dir = done, total, out_dir


def _save_npz(path: str, **arrays) -> None:
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def generate_dataset(
    teacher,
    prompts_NxP: np.ndarray,
    out_dir: str,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    batch_size: int,
    seed: int,
    eos_id: int | None = None,
    dtype: str | None = None,
    train_on_prompt: bool = False,
    progress: bool = True,
    extra_meta: dict | None = None,
    deadline: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher completions of every prompt, saved in ``out_dir``; (tokens, loss_mask).

    Reuses a complete dataset whose meta matches; otherwise generates batch by batch (each
    batch seeded by (seed, batch index), saved as a shard so a killed run resumes). The last
    batch is padded with repeated prompts to keep one compiled program.

    ``deadline`` (a ``time.perf_counter()`` value): a batch that would end after it (judged by
    the previous batch's duration) is not started; :class:`GenerationIncomplete` is raised
    instead, the finished shards kept for the next call.
    """
    from tqdm.auto import tqdm

    n, p = prompts_NxP.shape
    meta = {
        "prompts": int(n),
        "prompt_len": int(p),
        "max_new_tokens": int(max_new_tokens),
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "seed": int(seed),
        "batch_size": int(batch_size),
        "eos_id": eos_id,
        "train_on_prompt": bool(train_on_prompt),
        "prompts_sha256": hashlib.sha256(prompts_NxP.tobytes()).hexdigest()[:16],
        **(extra_meta or {}),
    }
    meta_path = os.path.join(out_dir, "meta.json")
    tok_path, mask_path = (os.path.join(out_dir, f) for f in ("tokens.npy", "loss_mask.npy"))
    if os.path.isfile(meta_path) and os.path.isfile(tok_path) and os.path.isfile(mask_path):
        with open(meta_path) as f:
            if json.load(f) == json.loads(json.dumps(meta)):
                return np.load(tok_path), np.load(mask_path)
    # shards belong to one meta: a changed config never picks up another run's pieces
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    shard_dir = os.path.join(out_dir, f"shards-{key}")
    os.makedirs(shard_dir, exist_ok=True)
    model = sampling_model(teacher, dtype)
    n_batches = -(-n // batch_size)
    toks, masks = [], []
    last_dt = 0.0
    for b in tqdm(range(n_batches), desc="teacher generation", disable=not progress, unit="batch"):
        shard = os.path.join(shard_dir, f"{b:06d}.npz")
        if os.path.isfile(shard):
            with np.load(shard) as z:
                toks.append(z["tokens"])
                masks.append(z["loss_mask"])
            continue
        if deadline is not None and time.perf_counter() + last_dt > deadline:
            raise GenerationIncomplete(b, n_batches, out_dir)
        t0 = time.perf_counter()
        pr = prompts_NxP[b * batch_size : (b + 1) * batch_size]
        real = len(pr)
        if real < batch_size:
            pr = np.concatenate([pr, np.resize(pr, (batch_size - real, p))])
        gen = generate(model, pr, max_new_tokens, seed=int(seed) * 1_000_003 + b, sampling=sampling)
        t, m = sequences(pr[:real], gen[:real], eos_id, train_on_prompt)
        _save_npz(shard, tokens=t, loss_mask=m)
        last_dt = time.perf_counter() - t0
        toks.append(t)
        masks.append(m)
    tokens, loss_mask = np.concatenate(toks), np.concatenate(masks)
    np.save(tok_path + ".tmp.npy", tokens)
    os.replace(tok_path + ".tmp.npy", tok_path)
    np.save(mask_path + ".tmp.npy", loss_mask)
    os.replace(mask_path + ".tmp.npy", mask_path)
    write_json(meta_path, meta)
    shutil.rmtree(shard_dir, ignore_errors=True)  # the dataset is complete
    return tokens, loss_mask


def prompt_corpus(config, flavour: str, tokenizer, cache_dir: str = "") -> tuple[np.ndarray, int]:
    """(token ids of ``distill.data``, sequence length) for the prompt-based flavours
    (``flavour`` = ``sequence`` | ``onpolicy``), whose ``prompt_len + max_new_tokens`` must
    equal ``train.seqlen``."""
    from shrinkjax.data.sources import load_text
    from shrinkjax.data.windows import tokenize

    sec = config.distill[flavour]
    seqlen = int(sec.prompt_len) + int(sec.max_new_tokens)
    if seqlen != int(config.train.seqlen):
        raise ValueError(
            f"{flavour} KD: train.seqlen={config.train.seqlen} must equal "
            f"distill.{flavour}.prompt_len + max_new_tokens = {seqlen}"
        )
    d = config.distill.data
    prog = bool(config.get("progress", True))
    ids = tokenize(load_text(d.source, d.path), tokenizer, cache_dir=cache_dir, progress=prog)
    return ids, seqlen


def run_sequence(
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
    """Generate (or reuse) the teacher dataset, then train the student on it with CE."""
    from shrinkjax.distill import losses
    from shrinkjax.distill.logit import Distiller, eval_windows
    from shrinkjax.train.loop import StepBatcher

    tc, sc = config.train, config.distill.sequence
    prog = bool(config.get("progress", True))
    ids, seqlen = prompt_corpus(config, "sequence", tokenizer, cache_dir)
    seed = int(tc.get("seed", config.seed))
    prompts = sample_prompts(ids, int(sc.num_prompts), int(sc.prompt_len), seed)
    out_dir = sc.dataset_dir or os.path.join(workdir, "teacher_data")
    s = Sampling(float(sc.temperature), int(sc.top_k), float(sc.top_p))
    eos = tokenizer.eos_id if (tokenizer is not None and sc.stop_at_eos) else None
    tokens, mask = generate_dataset(
        teacher,
        prompts,
        out_dir,
        max_new_tokens=int(sc.max_new_tokens),
        sampling=s,
        batch_size=int(sc.batch_size),
        seed=seed,
        eos_id=eos,
        dtype=tc.compute_dtype,
        train_on_prompt=bool(sc.train_on_prompt),
        progress=prog,
    )
    ce = losses.LossConfig(alpha=1.0, divergence="none", chunk=int(tc.chunk_tokens))
    dist = Distiller(
        teacher,
        student,
        config,
        workdir,
        loss_cfg=ce,
        use_teacher=False,
        masks=masks,
        apply_masks=apply_masks,
    )
    ev = eval_windows(config, tokenizer, cache_dir, prog) if tc.eval_windows else None
    batcher = StepBatcher(tokens, mask, tc.batch_size, dist.seed, tc.grad_accum)
    summary = dist.fit(batcher, eval_tokens=ev, mask_update=mask_update, desc="sequence KD")
    summary.update(
        dataset_dir=out_dir,
        dataset_sequences=len(tokens),
        dataset_target_tokens=int(mask.sum()),
        epochs=batcher.epoch_of(int(tc.steps)),
    )
    return dist, summary
