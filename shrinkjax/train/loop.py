"""The training loop: data by step, jitted step, late metrics, checkpoints, eval, SIGTERM.

Exact resume: the batch of step ``s`` is a pure function of (seed, s) (``batch_fn``), the RNG
lives in the state, and the state is restored from the latest checkpoint: a run killed at any
point and restarted reaches bitwise the same parameters as an uninterrupted one (same devices).

Stops:
* SIGTERM: the current step finishes, a checkpoint is saved, :class:`Preempted` is raised.
* A non-finite loss: :class:`NonFiniteLossError`; the step that produced it did not change the
  state, nothing after the last good checkpoint is saved, and the message names it.

The pruning hook: ``mask_update(step, student_params, masks) -> masks`` runs on the host
after every step when given (e.g. ``shrinkjax.sparse.schedule``'s ``update_masks`` at
``sparsity_at(step)``); the jitted step applies ``state.masks`` after every update.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from shrinkjax.train.metrics import LateFetcher, MetricsLogger, mfu


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(RuntimeError):
    """SIGTERM received: the state was checkpointed; rerun the same command to resume."""


@dataclasses.dataclass
class LoopConfig:
    steps: int
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end (when an eval_fn is given)
    checkpoint_every: int = 0  # 0 = only at the end
    progress: bool = True
    flops_per_token: float = 0.0
    peak_flops: float = 0.0  # 0 = from the device kind
    desc: str = "distill"


class _SigTerm:
    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def restore_or_init(state, shardings, ckpt):
    """(state, start step, meta): the latest checkpoint if there is one, else ``state``."""
    if ckpt is None or ckpt.latest_step() is None:
        return state, int(jax.device_get(state.step)), {}
    state, meta = ckpt.restore(state, shardings)
    return state, int(jax.device_get(state.step)), meta


def train_loop(
    state,
    step_fn: Callable,
    batch_fn: Callable,
    cfg: LoopConfig,
    *,
    batch_shardings=None,
    logger: MetricsLogger | None = None,
    ckpt=None,
    eval_fn: Callable | None = None,
    mask_update: Callable | None = None,
    meta: dict | None = None,
    on_metrics: Callable | None = None,
    apply_masks: Callable | None = None,
    state_shardings=None,
):
    """Run from ``state.step`` to ``cfg.steps``; returns (state, summary dict).

    ``batch_fn(step, state) -> dict`` of host arrays (may sample with the state's student);
    ``step_fn`` is the jitted ``train_step``; ``eval_fn(state) -> dict`` runs every
    ``eval_every`` steps and at the end; ``ckpt`` a :class:`Checkpointer`. New masks from
    ``mask_update`` are applied to the parameters right away with ``apply_masks`` (default
    params ⊙ masks) and the state is put back on ``state_shardings``.
    """
    from tqdm.auto import tqdm

    from shrinkjax.train.step import default_apply_masks

    apply_fn = jax.jit(apply_masks or default_apply_masks)
    start = int(jax.device_get(state.step))
    n_dev = len(jax.devices())
    fetcher = LateFetcher()
    last: dict = {}
    history = {"evals": []}
    good_step = ckpt.latest_step() if ckpt is not None else None
    tput = {"tokens": 0.0, "tok_s": float("nan"), "sum_dt": 0.0, "sum_tok": 0.0}
    # throughput: the time between fetching step s-1's and step s's metrics is step s's
    # duration when no pause (eval, checkpoint, compile of step `start`) came in between
    window = {"t": None, "step": None, "tokens": {}}
    meta = dict(meta or {})

    def handle(item):
        if item is None:
            return
        s, m = item
        if not m.get("finite", True) or not math.isfinite(m["loss"]):
            where = (
                f"the last good checkpoint is step {good_step} in {ckpt.directory}"
                if ckpt is not None and good_step is not None
                else "no checkpoint was saved"
            )
            raise NonFiniteLossError(
                f"non-finite loss ({m['loss']}) at step {s}: stopping. The step did not update "
                f"the state; {where}. Lower train.lr, raise train.warmup_steps, enable "
                f"train.clip_norm, or check the data/loss settings."
            )
        last.clear()
        last.update(m)
        now = time.perf_counter()
        n_tok = window["tokens"].pop(s, 0.0)
        if window["t"] is not None and window["step"] == s - 1 and now > window["t"]:
            dt = now - window["t"]
            tput["tok_s"] = n_tok / dt
            tput["sum_dt"] += dt
            tput["sum_tok"] += n_tok
        window["t"], window["step"] = now, s
        if on_metrics is not None:
            on_metrics(s, m)
        if logger is not None and ((s + 1) % max(cfg.log_every, 1) == 0 or s + 1 == cfg.steps):
            extra = {"tokens_per_s": tput["tok_s"]}
            u = (
                mfu(tput["tok_s"], cfg.flops_per_token, n_dev, cfg.peak_flops or None)
                if cfg.flops_per_token and math.isfinite(tput["tok_s"])
                else None
            )
            if u is not None:
                extra["mfu"] = u
            logger.log(s + 1, {k: v for k, v in m.items() if k != "finite"} | extra)

    def save(step):
        nonlocal good_step
        if ckpt is None:
            return
        handle(fetcher.flush())  # never checkpoint past an unseen non-finite loss
        ckpt.save(state, dict(meta, tokens_seen=tput["tokens"]), step=step)
        good_step = step
        window["t"] = None  # the pause is not training time

    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=cfg.desc,
        disable=not cfg.progress,
        unit="step",
        dynamic_ncols=True,
    )
    t_begin = time.perf_counter()
    with _SigTerm() as term:
        try:
            for step in range(start, cfg.steps):
                batch = batch_fn(step, state)
                n_tok = float(np.prod(np.shape(batch["tokens"])))
                if batch_shardings is not None:
                    batch = jax.device_put(batch, batch_shardings)
                state, metrics = step_fn(state, batch)
                tput["tokens"] += n_tok
                window["tokens"][step] = n_tok
                handle(fetcher.push(step, metrics))
                if mask_update is not None and state.masks is not None:
                    new_masks = mask_update(step + 1, state.params["student"], state.masks)
                    if new_masks is not state.masks:
                        # the new masks hold from now on: applied to the params at once (the
                        # step applies them after every later update)
                        student = apply_fn(state.params["student"], new_masks)
                        state = state.replace(
                            masks=new_masks, params={**state.params, "student": student}
                        )
                        if state_shardings is not None:
                            state = jax.device_put(state, state_shardings)
                bar.update(1)
                if last:
                    post = {"loss": f"{last['loss']:.4f}"}
                    if "kl" in last:
                        post["kl"] = f"{last['kl']:.4f}"
                    if math.isfinite(tput["tok_s"]):
                        post["tok/s"] = f"{tput['tok_s']:.0f}"
                    bar.set_postfix(post, refresh=False)
                done = step + 1
                if (
                    eval_fn is not None
                    and cfg.eval_every
                    and done % cfg.eval_every == 0
                    and done < cfg.steps
                ):
                    handle(fetcher.flush())
                    ev = eval_fn(state)
                    history["evals"].append({"step": done, **ev})
                    if logger is not None:
                        logger.log(done, ev, kind="eval")
                    window["t"] = None
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    save(done)
                if term.flag:
                    save(done)
                    if ckpt is not None:
                        ckpt.wait()
                    raise Preempted(f"SIGTERM at step {done}: checkpoint saved; rerun to resume")
            handle(fetcher.flush())
            if cfg.steps > start or (ckpt is not None and ckpt.latest_step() != cfg.steps):
                save(cfg.steps)
            final_eval = {}
            if eval_fn is not None:
                final_eval = eval_fn(state)
                history["evals"].append({"step": cfg.steps, **final_eval})
                if logger is not None:
                    logger.log(cfg.steps, final_eval, kind="eval")
        except BaseException as e:
            e.state = state  # the latest state (the caller's reference was donated)
            raise
        finally:
            bar.close()
            if ckpt is not None:
                ckpt.wait()
    wall = time.perf_counter() - t_begin
    summary = {
        "steps": cfg.steps,
        "start_step": start,
        "final_loss": last.get("loss", float("nan")),
        "final_kl": last.get("kl", float("nan")),
        "tokens_trained": tput["tokens"],
        "wall_seconds": wall,
        # steady state: the intervals between late fetches, compile/eval/save pauses excluded
        "tokens_per_s": tput["sum_tok"] / tput["sum_dt"] if tput["sum_dt"] else float("nan"),
        "evals": history["evals"],
        "final_eval": final_eval,
    }
    ts = summary["tokens_per_s"]
    u = (
        mfu(ts, cfg.flops_per_token, n_dev, cfg.peak_flops or None)
        if cfg.flops_per_token and math.isfinite(ts)
        else None
    )
    if u is not None:
        summary["mfu"] = u
    return state, summary


class StepBatcher:
    """Batches of fixed windows whose order is a pure function of (seed, step).

    Example ``i`` of the run (``i = step · batch + j``) is window ``perm_e[i mod W]`` of epoch
    ``e = i // W``, ``perm_e`` a permutation seeded by (seed, e): no state to save, and a
    resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(
        self,
        tokens_WxL: np.ndarray,
        loss_mask_WxL: np.ndarray | None,
        batch_size: int,
        seed: int,
        grad_accum: int = 1,
        shuffle: bool = True,
    ):
        if len(tokens_WxL) == 0:
            raise ValueError("no training windows")
        if batch_size % grad_accum:
            raise ValueError(
                f"batch_size={batch_size} is not a multiple of grad_accum={grad_accum}"
            )
        self.tokens = np.asarray(tokens_WxL, np.int32)
        self.loss_mask = (
            np.ones_like(self.tokens, bool)
            if loss_mask_WxL is None
            else np.asarray(loss_mask_WxL, bool)
        )
        self.batch_size, self.seed, self.grad_accum = batch_size, seed, grad_accum
        self.shuffle = shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def windows(self) -> int:
        return len(self.tokens)

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.windows

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            w = self.windows
            p = (
                np.random.default_rng([self.seed, epoch]).permutation(w)
                if self.shuffle
                else np.arange(w)
            )
            self._perm = (epoch, p)
        return self._perm[1]

    def indices(self, step: int) -> np.ndarray:
        i = step * self.batch_size + np.arange(self.batch_size)
        return np.asarray([self._permutation(int(k // self.windows))[k % self.windows] for k in i])

    def __call__(self, step: int, state=None) -> dict:
        idx = self.indices(step)
        batch = {"tokens": self.tokens[idx], "loss_mask": self.loss_mask[idx]}
        if self.grad_accum > 1:
            a = self.grad_accum
            batch = {k: v.reshape(a, v.shape[0] // a, *v.shape[1:]) for k, v in batch.items()}
        return batch
