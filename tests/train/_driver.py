"""Subprocess drivers for the resume and multi-device tests (run as scripts).

python tests/train/_driver.py resume WORKDIR STEPS SLEEP OUT.npz
python tests/train/_driver.py mesh OUT.npz     (with XLA_FLAGS=...device_count=8)
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def tiny_pair(seed: int = 0):
    from shrinkjax.models.llama import LlamaConfig, init_model
    from shrinkjax.models.surgery import drop_layers

    cfg = LlamaConfig(
        vocab_size=96, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64
    )
    teacher = init_model(cfg, seed=seed + 1)
    return teacher, drop_layers(teacher, (1,))


def config(steps: int, **train):
    from configs.distill import common

    c = common.tiny(common.distill_base("logit"))
    c.train.update(
        steps=steps,
        batch_size=16,
        seqlen=16,
        lr=1e-2,
        warmup_steps=2,
        eval_every=0,
        eval_windows=0,
        log_every=1,
        tensorboard=False,
        **train,
    )
    c.distill.divergence = "jsd"
    c.distill.alpha = 0.2
    c.lock()
    return c


def data(n: int = 64, seqlen: int = 16):
    rng = np.random.default_rng(123)
    return rng.integers(0, 96, (n, seqlen)).astype(np.int32)


def resume(workdir: str, steps: int, sleep: float, out: str):
    from shrinkjax.distill.logit import Distiller
    from shrinkjax.train.loop import StepBatcher

    teacher, student = tiny_pair()
    c = config(steps, checkpoint_every=3, keep_checkpoints=2)
    dist = Distiller(teacher, student, c, workdir, progress=False)
    batcher = StepBatcher(data(), None, c.train.batch_size, dist.seed)

    def slow(step, state):
        time.sleep(sleep)
        return batcher(step, state)

    dist.fit(slow)
    dist.close()
    np.savez(
        out,
        **{k: np.asarray(v) for k, v in dist.state.params["student"].items()},
        __step=np.asarray(dist.state.step),
        __rng=np.asarray(dist.state.rng),
    )


def mesh(out: str):
    import jax

    from shrinkjax.distill.logit import Distiller
    from shrinkjax.train.loop import StepBatcher

    assert len(jax.devices()) == 8, jax.devices()
    results = {}
    for name, (d, f, accum) in {"one": (1, 1, 1), "dp2_fsdp4_accum2": (2, 4, 2)}.items():
        teacher, student = tiny_pair()
        c = config(3, checkpoint_every=-1, mesh_data=d, mesh_fsdp=f, grad_accum=accum)
        if name == "one":
            # a 1x1 mesh on the first device only
            import shrinkjax.parallel.mesh as m

            orig = m.make_mesh
            m.make_mesh = lambda data, fsdp, devices=None: orig(1, 1, jax.devices()[:1])
            try:
                dist = Distiller(teacher, student, c, "/tmp/unused", progress=False)
            finally:
                m.make_mesh = orig
        else:
            dist = Distiller(teacher, student, c, "/tmp/unused", progress=False)
        batcher = StepBatcher(data(), None, c.train.batch_size, dist.seed, accum)
        state = dist.state
        losses = []
        for s in range(3):
            b = jax.device_put(batcher(s), dist.batch_sh)
            state, met = dist.step_fn(state, b)
            losses.append(float(met["loss"]))
        p = state.params["student"]
        sharded = any("fsdp" in str(v.sharding.spec) for v in p.values())
        n_dev = len(p["embed.embedding"].sharding.device_set)
        results[name] = (p, losses, sharded, n_dev)
        dist.logger.close()
    out_d = {}
    for name, (p, losses, sharded, n_dev) in results.items():
        for k, v in p.items():
            out_d[f"{name}/{k}"] = np.asarray(v)
        out_d[f"{name}/__losses"] = np.asarray(losses)
        out_d[f"{name}/__sharded"] = np.asarray(sharded)
        out_d[f"{name}/__ndev"] = np.asarray(n_dev)
    np.savez(out, **out_d)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if sys.argv[1] == "resume":
        resume(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "mesh":
        mesh(sys.argv[2])
    else:
        raise SystemExit(f"unknown driver {sys.argv[1]}")
