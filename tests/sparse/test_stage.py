"""The ``prune`` stage end to end through the runner (tiny model, pydoc text), and the
pruning configs."""

from __future__ import annotations

import importlib
import json
import os

import pytest

import shrinkjax.run
from shrinkjax.quant.array import QuantizedArray
from shrinkjax.sparse.array import NMSparseArray
from shrinkjax.sparse.stage import _with_defaults

CONFIGS = ("magnitude", "wanda", "sparsegpt", "sparsegpt_2of4_int4", "minitron", "gradual")


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_build_and_lock(name):
    mod = importlib.import_module(f"configs.prune.{name}")
    for variant in ("", "tiny"):
        c = mod.get_config(variant)
        assert "prune" in c.stages
        with pytest.raises(AttributeError):
            c.not_a_field = 1  # locked
        _with_defaults(c.prune)  # every field known to the stage
    for override in getattr(mod, "get_sweep", list)():
        c = mod.get_config()
        for key in override:
            node = c
            for part in key.split(".")[:-1]:
                node = node[part]
            assert key.split(".")[-1] in node, key
    with pytest.raises(ValueError, match="variant"):
        mod.get_config("huge")


def _run(name, tmp_path, **prune):
    c = importlib.import_module(f"configs.prune.{name}").get_config("tiny")
    c.stages = ("load", "prune", "evaluate")
    for k, v in prune.items():
        c.prune[k] = v
    ctx_results = shrinkjax.run.run(c, str(tmp_path))
    with open(os.path.join(tmp_path, "results", "prune.json")) as f:
        assert json.load(f)["method"] == c.prune.method
    return ctx_results


def test_sparsegpt_24_int4_stage_compresses_and_keeps_teacher(tmp_path):
    res = _run("sparsegpt_2of4_int4", tmp_path, save=True)
    p, ev = res["prune"], res["evaluate"]
    assert p["pattern"] == "2:4" and p["sparsity"] == 0.5 and p["pruned_linears"] == 14
    assert all(r["quant_group"] == 32 for r in p["layers"].values())
    # linears: 2:4 int4 g32 = 2 (int4 codes of half) + 1 (2-bit positions of half)
    # + (16-bit scale + 8-bit zero) / 32 bits per weight, instead of 32
    linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96)
    assert p["bytes_before"] - p["bytes"] == linear * 4 - linear * (2 + 1 + 24 / 32) / 8
    assert 0 < p["mean_rel_out_err"] < 0.2
    # the teacher is untouched: compare measured a real difference
    assert ev["kl"] > 0 and ev["top1_agree"] < 1
    # prune.save: the checkpoint holds the compressed linears, byte for byte
    from shrinkjax.io.checkpoint import load_checkpoint
    from shrinkjax.models.params import flat_params
    from shrinkjax.sparse.stage import stored_nbytes

    assert p["saved_to"] == os.path.join(tmp_path, "pruned_model")
    m2, tok = load_checkpoint(p["saved_to"])
    k = flat_params(m2)["layers.1.mlp.down_proj.kernel"]
    assert isinstance(k, NMSparseArray) and k.pattern == "2:4"
    assert isinstance(k.values, QuantizedArray)
    assert stored_nbytes(flat_params(m2)) == p["bytes"] and tok is not None


def test_save_is_refused_for_gradual_pruning(tmp_path):
    with pytest.raises(ValueError, match="prune.save: gradual pruning happens in the distill"):
        _run("gradual", tmp_path, save=True)


def test_magnitude_global_stage(tmp_path):
    res = _run("magnitude", tmp_path, scope="global", pattern="70%")
    p = res["prune"]
    assert p["sparsity"] == pytest.approx(0.7, abs=1e-6)
    per_linear = [r["sparsity"] for r in p["layers"].values()]
    # one global threshold: the kernels' sparsities differ (per layer they would all be 0.7)
    assert max(per_linear) - min(per_linear) > 0.01


def test_wanda_stage_nm_compressed_model(tmp_path):
    import shrinkjax.stages as stages
    from shrinkjax.sparse.stage import prune_stage

    c = importlib.import_module("configs.prune.wanda").get_config("tiny")
    c.prune.pattern = "4:8"
    ctx = stages.RunContext(config=c, workdir=str(tmp_path))
    stages.get("load")(ctx)
    res = prune_stage(ctx)
    assert res["sparsity"] == 0.5
    k = ctx.state["model"].layers[0].mlp.down_proj.kernel.get_value()
    assert isinstance(k, NMSparseArray) and k.pattern == "4:8"
    assert not isinstance(k.values, QuantizedArray)
    assert not isinstance(
        ctx.state["teacher"].layers[0].mlp.down_proj.kernel.get_value(), NMSparseArray
    )


def test_minitron_then_distill(tmp_path):
    c = importlib.import_module("configs.prune.minitron").get_config("tiny")
    c.train.steps = 2
    c.train.eval_every = 0
    c.train.checkpoint_every = 0
    res = shrinkjax.run.run(c, str(tmp_path))
    p = res["prune"]
    assert p["params"] == p["config_params"] < p["params_before"]
    assert p["student_spec"] == os.path.join(str(tmp_path), "pruned_model")
    assert res["distill"]["student_params"] == p["params"]  # the pruned model was healed
    assert res["evaluate"]["ppl"] > 0
