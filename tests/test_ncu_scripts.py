"""``scripts/ncu_kernel.py`` (the profiled program: checks the kernel against the reference
before the profiled calls; interpret mode here) and ``scripts/ncu_stalls.py`` (the summary of
ncu's per-instruction page)."""

import os
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import ncu_kernel  # noqa: E402
import ncu_stalls  # noqa: E402


def test_kernel_runs_checked_and_patches_constants(capsys):
    from shrinkjax.kernels import int4_tc

    before = int4_tc.FEW_TOKENS
    try:
        ncu_kernel.main(
            ["--kind", "int4_g128", "--k", "256", "--n", "256", "--m", "2", "--calls", "1"]
            + ["--set", "int4_tc.FEW_TOKENS=1", "--tile", "split_k=2"]
        )
        assert int4_tc.FEW_TOKENS == 1
    finally:
        int4_tc.FEW_TOKENS = before
    out = capsys.readouterr().out
    assert "tiles={'split_k': 2}: rel. err" in out and "made 1 calls" in out


def test_bad_assignments_are_named():
    with pytest.raises(SystemExit, match="--set takes NAME=VALUE, got 'FEW_TOKENS'"):
        ncu_kernel.parse_assignments(["FEW_TOKENS"], "set")
    with pytest.raises(SystemExit, match="int4_tc has no NO_SUCH"):
        ncu_kernel.patch_constants([("int4_tc.NO_SUCH", 1)])


def test_stalls_are_summed_by_reason_and_the_loop_found(tmp_path):
    head = '"Kernel Name","k",\n'
    cols = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"]
    cols += ["stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]
    rows = [
        ["0x0", "LDG.E R1, [R2]", "3", "10", "0", "3", "0"],
        ["0x10", "FADD R3, R1, R1", "40", "80", "35", "5", "30"],
        ["0x20", "HMMA R4, R5, R6", "2", "80", "0", "2", "0"],
    ]
    path = tmp_path / "k.sass.csv"
    lines = [",".join(f'"{c}"' for c in r) for r in [cols] + rows]
    path.write_text(head + "\n".join(lines) + "\n")
    text = ncu_stalls.summarize(str(path), min_samples=10)
    assert "45 samples; main loop 2 instructions, 42 samples" in text
    assert "by reason: long_sb 35, wait 10" in text  # "(Not Issued)" columns not counted
    assert "FADD R3, R1, R1" in text and "long_sb:35 wait:5" in text
    assert "LDG.E" not in text  # under --min-samples


def test_a_page_without_stall_sampling_is_named(tmp_path):
    path = tmp_path / "k.sass.csv"
    path.write_text('"Address","Source","Instructions Executed"\n"0x0","NOP","1"\n')
    with pytest.raises(SystemExit, match=r"k.sass.csv: no column \['Warp Stall Sampling"):
        ncu_stalls.summarize(str(path))
