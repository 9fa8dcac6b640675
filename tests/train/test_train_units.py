"""Loop behaviour: non-finite loss stops with the last good checkpoint, SIGTERM saves,
pruning masks stay applied, hidden-state distillation with a learned projection, data order,
FSDP rule, TensorBoard/JSONL files."""

from __future__ import annotations

import json
import os
import signal
import struct

import jax
import numpy as np
import pytest

from shrinkjax.distill.logit import Distiller
from shrinkjax.parallel.mesh import fsdp_spec
from shrinkjax.train import metrics
from shrinkjax.train.loop import NonFiniteLossError, Preempted, StepBatcher
from tests.train._driver import config, data, tiny_pair

# loop behaviour does not need the scanned layers / chunked loss (tested elsewhere): faster
# compiles
FAST = dict(scan_layers=False, chunk_tokens=0)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    teacher, student = tiny_pair()
    c = config(8, checkpoint_every=2, **FAST)
    dist = Distiller(teacher, student, c, str(tmp_path), dynamic_loss=True, progress=False)
    base = StepBatcher(data(), None, c.train.batch_size, 0)
    w = np.asarray([0.2, 0.8, 0.0, 0.0], np.float32)

    def batch_fn(step, state):  # tau = 0 at step 4 (the 5th update) divides by zero
        return dict(
            base(step),
            loss_weights=w,
            tau=np.float32(0.0 if step == 4 else 1.0),
            beta=np.float32(0.5),
        )

    with pytest.raises(NonFiniteLossError, match=r"at step 4.*last good checkpoint is step 4"):
        dist.fit(batch_fn)
    kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert kept == [2, 4]
    # the bad step did not touch the parameters
    assert all(np.isfinite(np.asarray(v)).all() for v in dist.state.params["student"].values())
    dist.close()


def test_sigterm_saves_and_masks_stay_applied(tmp_path):
    teacher, student = tiny_pair()
    c = config(10, checkpoint_every=100, **FAST)
    name = "layers.0.mlp.up_proj.kernel"
    shape = student.layers[0].mlp.up_proj.kernel.value.shape
    mask = np.ones(shape, np.float32)
    mask[:, ::2] = 0.0
    dist = Distiller(teacher, student, c, str(tmp_path), masks={name: mask}, progress=False)
    base = StepBatcher(data(), None, c.train.batch_size, 0)
    seen = []

    def update(step, params, masks):  # the gradual-pruning hook: called after every step
        seen.append(step)
        return masks

    def batch_fn(step, state):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return base(step)

    with pytest.raises(Preempted, match="step 3"):
        dist.fit(batch_fn, mask_update=update)
    assert seen == [1, 2, 3]
    assert dist.ckpt.latest_step() == 3
    w = np.asarray(dist.state.params["student"][name])
    assert np.all(w[:, ::2] == 0) and np.any(w[:, 1::2] != 0)
    dist.close()


def test_hidden_distillation_with_projection(tmp_path):
    from ml_collections import ConfigDict

    from shrinkjax.models.surgery import build_student

    teacher, _ = tiny_pair()
    sc = ConfigDict(
        dict(
            init="scratch",
            dim=16,
            n_layers=2,
            n_heads=2,
            n_kv_heads=1,
            hidden_dim=32,
            head_dim=0,
            vocab_size=0,
            tokenizer="",
            seed=0,
        )
    )
    student, _ = build_student(teacher, sc)
    c = config(3, checkpoint_every=-1, **FAST)
    with c.unlocked():
        c.distill.hidden_weight = 0.5
        c.distill.hidden_layers = ("1:2", "0:0")
    dist = Distiller(teacher, student, c, str(tmp_path), progress=False)
    proj0 = {k: np.asarray(v) for k, v in dist.state.params["proj"].items()}
    assert set(proj0) == {"proj.1_2", "proj.0_0"} and proj0["proj.1_2"].shape == (16, 32)
    got = []
    dist.fit(
        StepBatcher(data(), None, c.train.batch_size, 0), on_metrics=lambda s, m: got.append(m)
    )
    assert all(np.isfinite(m["hidden"]) and m["hidden"] > 0 for m in got)
    assert not np.allclose(np.asarray(dist.state.params["proj"]["proj.1_2"]), proj0["proj.1_2"])
    dist.close()


def test_step_batcher_is_a_pure_function_of_seed_and_step():
    toks = np.arange(10)[:, None] * np.ones((1, 4), np.int32)
    a, b = StepBatcher(toks, None, 3, seed=5), StepBatcher(toks, None, 3, seed=5)
    seq = [a(s)["tokens"][:, 0].tolist() for s in range(7)]
    assert seq == [b(s)["tokens"][:, 0].tolist() for s in reversed(range(7))][::-1]
    flat = sum(seq, [])
    assert sorted(flat[:9]) == sorted(set(flat[:9]))  # no repeats inside an epoch
    assert sorted(flat[:10]) == list(range(10))
    assert StepBatcher(toks, None, 3, seed=6)(0)["tokens"][:, 0].tolist() != seq[0]
    acc = StepBatcher(toks, None, 4, seed=5, grad_accum=2)(1)
    assert acc["tokens"].shape == (2, 2, 4)


def test_fsdp_rule():
    assert fsdp_spec((576, 1536), 4) == jax.sharding.PartitionSpec(None, "fsdp")
    assert fsdp_spec((49152, 576), 8) == jax.sharding.PartitionSpec("fsdp", None)
    assert fsdp_spec((6, 10), 4) == jax.sharding.PartitionSpec()
    assert fsdp_spec((10, 6), 2) == jax.sharding.PartitionSpec("fsdp", None)
    assert fsdp_spec((), 4) == jax.sharding.PartitionSpec()
    assert fsdp_spec((8, 8), 1) == jax.sharding.PartitionSpec()


def test_tensorboard_and_jsonl(tmp_path):
    assert metrics.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    log = metrics.MetricsLogger(str(tmp_path))
    log.log(3, {"loss": 1.5, "finite_only": float("nan"), "tag": "x"})
    log.close()
    line = json.loads(open(tmp_path / "metrics.jsonl").read())
    assert line["step"] == 3 and line["loss"] == 1.5 and line["kind"] == "train"
    (ev,) = os.listdir(tmp_path / "tb")
    recs = metrics.read_records(str(tmp_path / "tb" / ev))
    assert len(recs) == 2 and b"brain.Event:2" in recs[0]
    assert b"train/loss" in recs[1] and struct.pack("<f", 1.5) in recs[1]
    assert b"finite_only" not in recs[1]


def test_flops_and_mfu():
    from shrinkjax.models.llama import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536
    )
    # SmolLM2-135M: ~106M block params + 28M head
    assert 1.3e8 < metrics.matmul_params(cfg) < 1.4e8
    f = metrics.forward_flops_per_token(cfg, 2048)
    assert f == 2 * metrics.matmul_params(cfg) + 4 * 30 * 2048 * 576
    assert metrics.mfu(1000.0, 1e9, 1, peak=1e12) == pytest.approx(1.0)
    assert metrics.peak_flops(jax.devices("cpu")[0]) is None


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_ce_mask_keeps_cross_entropy_off_masked_targets(grad_accum):
    """ce_mask = loss_mask is the unmasked step; an all-False ce_mask leaves (1 − α)·D only,
    with the divergence still over every target and the same token count."""
    from shrinkjax.distill.logit import loss_config
    from shrinkjax.train import state as statelib
    from shrinkjax.train import step as steplib

    teacher, student = tiny_pair()
    c = config(1, grad_accum=grad_accum, **FAST)
    opt, _ = statelib.optimizer_from_config(c.train)
    scfg = student.cfg.replace(dtype="float32", attention_impl="einsum")
    tcfg = teacher.cfg.replace(dtype="float32", attention_impl="einsum")
    step_cfg = steplib.StepConfig(
        loss=loss_config(c.distill, 0), grad_accum=grad_accum, scan_layers=False
    )
    fn = jax.jit(steplib.make_train_step(scfg, opt, step_cfg, tcfg))
    state = statelib.create_train_state(student, opt, seed=0, teacher=teacher)
    toks = data(16)
    mask = np.random.default_rng(4).random(toks.shape) < 0.8
    shape = (grad_accum, 16 // grad_accum, 16) if grad_accum > 1 else (16, 16)
    batch = {"tokens": toks.reshape(shape), "loss_mask": mask.reshape(shape)}

    _, plain = fn(state, batch)
    _, same = fn(state, dict(batch, ce_mask=batch["loss_mask"]))
    _, none = fn(state, dict(batch, ce_mask=np.zeros(shape, bool)))
    np.testing.assert_allclose(same["loss"], plain["loss"], rtol=1e-6)
    assert float(plain["ce"]) > 1.0 and float(none["ce"]) == 0.0
    np.testing.assert_allclose(none["jsd"], plain["jsd"], rtol=1e-6)
    np.testing.assert_allclose(none["loss"], 0.8 * float(plain["jsd"]), rtol=1e-5)
    assert float(none["tokens"]) == float(plain["tokens"])


def test_low_precision_backward_keeps_the_forward_and_close_gradients():
    """bf16 compute: the bf16-backward step has the same loss (forward unchanged) and
    gradients within bf16 rounding of autodiff's f32-backward step."""
    from shrinkjax.distill.logit import loss_config
    from shrinkjax.train import state as statelib
    from shrinkjax.train import step as steplib

    teacher, student = tiny_pair()
    c = config(1, **FAST)
    opt, _ = statelib.optimizer_from_config(c.train)
    scfg = student.cfg.replace(dtype="bfloat16", attention_impl="einsum")
    tcfg = teacher.cfg.replace(dtype="bfloat16", attention_impl="einsum")
    state = statelib.create_train_state(student, opt, seed=0, teacher=teacher)
    toks = data(16)
    batch = {"tokens": toks, "loss_mask": np.ones(toks.shape, bool)}
    out = {}
    for low in (False, True):
        sc = steplib.StepConfig(
            loss=loss_config(c.distill, 0), scan_layers=False, low_precision_backward=low
        )
        fn = jax.jit(steplib.make_train_step(scfg, opt, sc, tcfg))
        new, m = fn(jax.tree.map(lambda x: x.copy(), state), batch)
        out[low] = (m, new.params["student"])
    np.testing.assert_array_equal(out[True][0]["loss"], out[False][0]["loss"])
    np.testing.assert_allclose(out[True][0]["grad_norm"], out[False][0]["grad_norm"], rtol=0.02)
    assert out[True][0]["grad_norm"] != out[False][0]["grad_norm"]  # the rule did apply
    # the first Adam update is ~lr · sign(g): the same direction for nearly every weight
    k = "layers.0.mlp.up_proj.kernel"
    d = {
        lo: np.asarray(p[k]) - np.asarray(state.params["student"][k]) for lo, (_, p) in out.items()
    }
    agree = np.mean(np.sign(d[True]) == np.sign(d[False]))
    assert agree > 0.95, agree
