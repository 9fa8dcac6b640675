"""``scripts/probe_call_kernels.py``: its spec parser (kinds with a colon, module constants and
tile keywords), the per-call summary of a traced execution, and a checked run in interpret
mode (no device timeline on the CPU)."""

import os
import sys

import jax
import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import probe_call_kernels as P  # noqa: E402


def test_specs_split_kind_m_constants_and_tiles():
    assert P.parse_spec("2:4_int4:16") == ("2:4_int4", 16, [], {})
    kind, m, sets, tiles = P.parse_spec("int4_g128:4:int4_tc.FEW_TOKENS=2,num_warps=4,xsum=sum")
    assert (kind, m) == ("int4_g128", 4)
    assert sets == [("int4_tc.FEW_TOKENS", 2)] and tiles == {"num_warps": 4, "xsum": "sum"}
    with pytest.raises(SystemExit, match="KIND in"):
        P.parse_spec("int3:1")
    with pytest.raises(SystemExit, match="M must be an integer"):
        P.parse_spec("mxfp4:one")


def test_per_call_sums_kernels_and_idle_gaps():
    ev = [  # two calls: a kernel then a sum, 1 µs idle before each second call
        dict(name="k", ts=0.0, dur=10.0),
        dict(name="sum", ts=10.0, dur=2.0),
        dict(name="k", ts=13.0, dur=10.0),
        dict(name="sum", ts=23.5, dur=2.0),
    ]
    got = P.per_call(ev, calls=2)
    assert got["span_us"] == pytest.approx(25.5 / 2)
    assert got["gap_us"] == pytest.approx(1.5 / 2)
    assert [(r["name"], r["us"], r["count"]) for r in got["kernels"]] == [
        ("k", 10.0, 1.0),
        ("sum", 2.0, 1.0),
    ]


def test_checked_run_restores_patched_constants(tmp_path, capsys):
    from shrinkjax.kernels import int4_tc

    before = int4_tc.FEW_TOKENS
    out = tmp_path / "r.json"
    rows = P.main(
        ["int4_g128:2:int4_tc.FEW_TOKENS=1,split_k=2", "--k", "256", "--n", "128"]
        + ["--calls", "2", "--json", str(out)]
    )
    assert int4_tc.FEW_TOKENS == before and out.exists()
    assert rows[0]["set"] == ["int4_tc.FEW_TOKENS=1", "split_k=2"] and rows[0]["rel_err"] < 2e-2
    gpu = jax.default_backend() == "gpu"  # (a GPU gives the timeline, the CPU says it has none)
    assert ("span" if gpu else "no device timeline") in capsys.readouterr().out


def test_keep_going_reports_a_failing_spec_and_runs_the_next(capsys):
    args = ["int4_g128:1:rows=48", "int4_g128:1", "--k", "256", "--n", "128", "--calls", "2"]
    with pytest.raises(ValueError, match="rows 48 must be a multiple of 64"):
        P.main(args)
    rows = P.main(args + ["--keep-going"])
    assert "rows 48 must be a multiple of 64" in rows[0]["error"] and rows[1]["rel_err"] < 2e-2
    assert "int4_g128:1:rows=48: FAILED: ValueError" in capsys.readouterr().out
