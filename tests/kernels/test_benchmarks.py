"""The kernel and decode benchmarks end to end on CPU (tiny shapes, kernels in interpret mode):
the JSON format, both prefill paths, the sweep applying its winner, the time budget."""

from __future__ import annotations

import json

import pytest

from shrinkjax.kernels import dispatch, driver, tuned
from tests.conftest import load_benchmark

_load = load_benchmark


def test_kernels_benchmark_grid_and_sweep(tmp_path, monkeypatch):
    kb = _load("kernels")
    monkeypatch.setattr(tuned, "TUNED", {})  # the sweep writes its winner here
    out = tmp_path / "k.json"
    args = ["--sweep", "--sweep-shape", "128x128", "--sweep-kernels", "mxfp4"]
    args += ["--sweep-budget-s", "4", "--shapes", "128x256", "--ms", "1,600"]
    args += ["--kernels", "int4_g128", "--max-calls", "2", "--jobs", "2", "--out", str(out)]
    kb.main(args)
    res = json.loads(out.read_text())
    assert res["copy_tbps"] > 0 and res["device"]
    rows = {r["M"]: r for r in res["rows"]}
    for r in rows.values():
        for key in ("kernel", "M", "K", "N", "us", "bytes", "xla_bf16_us", "torch_bf16_us"):
            assert key in r
        assert r["us"] > 0 and r["bw_frac"] > 0 and r["rel_err"] < 1e-2 and "error" not in r
        assert "torch_us" in r
    assert rows[1]["path"] == "fused" and rows[1]["dequant_dot_us"] is None
    assert rows[600]["path"] == "dequant_dot" and rows[600]["us"] == rows[600]["dequant_dot_us"]
    # int4 runs the tensor-core decode layout: its fused kernel stops at M = 128
    assert rows[600]["fused_us"] is None and rows[600]["dequant_us"] > 0
    assert rows[1]["cfg"][0] == "int4_tc"
    best = [d for d in res["decode_tuning"] if d["M"] == 1]
    assert best and best[0]["us"] <= best[0]["default_us"] and best[0]["bw_frac"] > 0
    assert "TUNED = {" in res["tuned_snippet"] and ("mxfp4", 1) in tuned.TUNED
    assert (tmp_path / "k.tuned.py").exists()


def test_kernels_benchmark_budget_skips_cells(tmp_path):
    kb = _load("kernels")
    out = tmp_path / "k.json"
    kb.main(["--out", str(out), "--shapes", "128x128", "--ms", "1,16", "--budget-s", "0"])
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 2 * len(kb.KERNELS)
    assert all(r["error"].startswith("skipped") and r["us"] is None for r in res["rows"])


def test_xla_baseline_reads_the_source_layout():
    """The tensor-core layouts are timed as packed; the XLA dequantize-then-dot baseline and the
    correctness reference read the layout each was converted from (same values)."""
    import numpy as np

    from shrinkjax.kernels import layouts as L
    from shrinkjax.kernels import reference as R

    kb = _load("kernels")
    sh = kb.Shape(128, 256, ["int4_g128", "mxfp4", "2:4_int4"], seed=0)
    want = {"int4_g128": L.PackedInt, "mxfp4": L.PackedMXFP4, "2:4_int4": L.Packed24}
    for kind, cls in want.items():
        pr = sh.probs[kind]
        assert isinstance(pr["src_ws"][0], cls) and not isinstance(pr["p"], cls)
        assert len(pr["src_ws"]) == len(pr["ws"]) and "source" not in pr["plain"]
        a = np.asarray(R.dequantize(pr["src_ws"][0]), np.float32)
        b = np.asarray(R.dequantize(pr["p"]), np.float32)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kernels", [False, True])
def test_decode_benchmark_quick(tmp_path, kernels):
    db = _load("decode")
    out = tmp_path / "d.json"
    args = ["--quick", "--out", str(out), "--batches", "2"]
    if kernels:  # packed weights through the Pallas kernels; the prefill (M = 16) dequant_dot
        args += ["--interpret-kernels", "--formats", "int4_g128", "--attention", "pallas_decode"]
        args += ["--prefill-tokens", "8", "--prefill-min-m", "16", "--norm", "deferred"]
    else:  # the reference path (what CPU dispatch does); rows also go into a kernels.json
        args += ["--formats", "bf16,2:4_bf16", "--kernels-json", str(tmp_path / "k.json")]
        args += ["--projections", "separate", "--profile", str(tmp_path / "prof")]
        (tmp_path / "k.json").write_text(json.dumps({"device": "x", "rows": []}))
    db.main(args)
    res = json.loads(out.read_text())
    rows = res["decode"]
    if not kernels:
        k = json.loads((tmp_path / "k.json").read_text())
        assert k["device"] == "x" and [(r["format"], r["batch"]) for r in k["decode"]] == [
            ("bf16", 2),
            ("2:4_bf16", 2),
        ]
    assert len(rows) == (1 if kernels else 2) and all("error" not in r for r in rows)
    assert res["projections"] == ("fused" if kernels else "separate")
    assert res["attention"] == ("pallas_decode" if kernels else "einsum")
    assert res["norm"] == ("deferred" if kernels else "plain")
    if not kernels:  # one trace per cell, summarised per decode step
        assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["24_bf16_b2", "bf16_b2"]
        assert all(r["profile"]["busy_ms_per_step"] > 0 for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in rows)
    if kernels:
        assert all(r["prefill_path"] == "dequant_dot" and r["prefill_ms"] > 0 for r in rows)
    # main() leaves the dispatch/kernels globals as it found them
    assert dispatch.PREFILL_MIN_M == 256 and not driver.use_kernel_backend()


def test_decode_lm_head_in_the_format():
    from shrinkjax.kernels import int4_tc

    db = _load("decode")
    model, nbytes = db.build_model(db.QUICK, "int4_g128", lm_head="format")
    assert isinstance(model.lm_head.kernel.value, int4_tc.TcInt4)
    _, bf16_bytes = db.build_model(db.QUICK, "int4_g128")
    assert nbytes["lm_head"] < bf16_bytes["lm_head"] / 3  # 4-bit codes + g128 scales
    with pytest.raises(ValueError, match="lm_head must be"):
        db.build_model(db.QUICK, "int4_g128", lm_head="int4")


def test_split_executions_by_device_gaps():
    kb = _load("kernels")
    ev = lambda ts, dur, name="k": dict(ts=ts, dur=dur, name=name)  # noqa: E731
    events = [ev(0, 5), ev(6, 3), ev(4, 1), ev(3000, 2), ev(3004, 4, "memcpyD2H"), ev(3003, 1)]
    # two executions: [0, 9) busy 9, then [3000, 3004) busy 3 (the memcpy is not a kernel)
    assert kb.split_executions(events, gap_us=2000.0) == [(0.0, 9.0, 9.0), (3000.0, 3004.0, 3.0)]
    assert len(kb.split_executions(events, gap_us=0.5)) == 4  # also at 5 -> 6 and 3002 -> 3003


def test_parse_shapes_names_the_bad_item():
    kb = _load("kernels")
    assert kb.parse_shapes("8192x8192, 4096x14336") == [(8192, 8192), (4096, 14336)]
    with pytest.raises(ValueError, match="shape '4096': expected KxN"):
        kb.parse_shapes("8192x8192,4096")
