"""scripts/trace_summary.py on a hand-made trace: per-name totals and the ordered sequence."""

from __future__ import annotations

import gzip
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))

import trace_summary as TS  # noqa: E402


def _trace():
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "python host"}},
    ]
    dev = [  # out of order on purpose; (ts, dur) in µs
        {"ph": "X", "pid": 1, "name": "int4_tc_k", "ts": 10.0, "dur": 5.0},
        {"ph": "X", "pid": 1, "name": "input_reduce_fusion", "ts": 0.0, "dur": 2.0},
        {"ph": "X", "pid": 1, "name": "input_reduce_fusion", "ts": 16.0, "dur": 1.5},
    ]
    host = [{"ph": "X", "pid": 2, "name": "PjitFunction", "ts": 0.0, "dur": 100.0}]
    return {"traceEvents": meta + dev + host}


def test_summary_and_sequence(tmp_path, capsys):
    path = os.path.join(tmp_path, "x.trace.json.gz")
    with gzip.open(path, "wt") as f:
        json.dump(_trace(), f)
    s = TS.main([str(tmp_path), "--steps", "1", "--sequence", "1:5"])
    assert s["events"] == 3  # host events are not device time
    assert s["busy_ms_per_step"] == (5.0 + 2.0 + 1.5) / 1e3
    assert s["span_ms_per_step"] == 17.5 / 1e3
    by_name = {r["name"]: r for r in s["kernels"]}
    assert by_name["input_reduce_fusion"]["calls_per_step"] == 2
    # events 1 and 2 by start time: the kernel (gap 8 µs after the first reduce), then a reduce
    assert [(r["index"], r["name"], r["gap_us"]) for r in s["sequence"]] == [
        (1, "int4_tc_k", 8.0),
        (2, "input_reduce_fusion", 1.0),
    ]
    assert "int4_tc_k" in capsys.readouterr().out
