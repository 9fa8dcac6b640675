"""Decode tuning: the tuned-config table, the late-scale kernel variant, the budgeted search."""

from __future__ import annotations

import time

import numpy as np
import pytest

from shrinkjax.kernels import autotune, driver, tuned
from shrinkjax.kernels import layouts as L
from shrinkjax.kernels import reference as R
from shrinkjax.kernels.fp4_matmul import fp4_matmul
from shrinkjax.kernels.int_matmul import int_matmul
from shrinkjax.kernels.sparse_matmul import sparse24_matmul

from .test_kernels import check, make_24_int4, make_int, make_mxfp4, make_nvfp4, rand_x

BIG = 8192 * 8192 // 2


def test_tuned_table_lookup_rescale_and_overrides(monkeypatch):
    entry = dict(block_n=128, block_k=512, split_k=4, num_warps=8, num_stages=3, late_scale=True)
    monkeypatch.setattr(tuned, "TUNED", {("int4", 1): entry, ("mxfp4", 16): dict(block_n=256)})
    cfg = driver.choose_config(1, 8192, 8192, 128, BIG, kind="int4_g128")  # via "int4"
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k) == (16, 128, 512, 4)
    assert (cfg.num_warps, cfg.num_stages, cfg.late_scale, cfg.fma) == (8, 3, True, False)
    # half the N tiles -> twice the splits keeps the tuned program count
    assert driver.choose_config(1, 8192, 4096, 128, BIG, kind="int4_g32").split_k == 8
    # too few K chunks for the rescaled split: the largest power of two that divides
    assert driver.choose_config(1, 384, 1024, 128, BIG, kind="int4_g128").split_k == 1
    # explicit arguments win; other buckets and kinds use the heuristics
    cfg = driver.choose_config(1, 8192, 8192, 128, BIG, kind="int4_g128", block_n=64, split_k=2)
    assert (cfg.block_n, cfg.split_k, cfg.num_warps) == (64, 2, 8)
    heur = driver.choose_config(16, 8192, 8192, 128, BIG)
    assert driver.choose_config(16, 8192, 8192, 128, BIG, kind="int4_g128") == heur
    assert driver.choose_config(300, 8192, 8192, 128, BIG, kind="int4_g128").block_m == 128
    assert driver.choose_config(16, 8192, 8192, 64, BIG, kind="mxfp4").block_n == 256
    assert driver.choose_config(1, 8192, 8192, 64, BIG, kind="mxfp4").block_n == 64
    assert tuned.m_bucket(1) == 1 and tuned.m_bucket(9) == 16 and tuned.m_bucket(17) is None
    # config_for names the kernel kind
    p, _ = make_int(np.random.default_rng(0), 1024, 256, 4, 128, True)
    assert driver.kernel_kind(p) == "int4_g128" and driver.config_for(p, 1).late_scale
    # the driver used to live in layouts: the old names still resolve
    assert L.choose_config is driver.choose_config and L.TileConfig is driver.TileConfig


def test_tuned_fma_applies_only_where_valid(monkeypatch):
    monkeypatch.setattr(tuned, "TUNED", {("nvfp4", 1): dict(fma=True, block_n=32)})
    assert driver.choose_config(1, 4096, 4096, 32, BIG, kind="nvfp4").fma
    assert not driver.choose_config(1, 4096, 4096, 32, BIG, kind="nvfp4", fma=False).fma


@pytest.mark.parametrize("kind", ["int4_asym", "int4_sym", "mxfp4", "nvfp4", "int8", "24_int4"])
def test_late_scale_matches_reference(kind):
    """Scale / zero point applied to the dot result (decode variant) == the reference."""
    rng = np.random.default_rng(len(kind))
    if kind.startswith("int4"):
        p, w64 = make_int(rng, 256, 200, 4, 128, kind == "int4_asym")
        fn = int_matmul
    elif kind == "int8":
        p, w64 = make_int(rng, 256, 72, 8, 64, True)
        fn = int_matmul
    elif kind == "mxfp4":
        p, w64 = make_mxfp4(rng, 128, 96)
        fn = fp4_matmul
    elif kind == "nvfp4":
        p, w64 = make_nvfp4(rng, 128, 64)
        fn = fp4_matmul
    else:
        p, w64 = make_24_int4(rng, 512, 72, 128, True)
        fn = sparse24_matmul
    x = rand_x(rng, 3, p.k)
    y = fn(x, p, interpret=True, late_scale=True, block_n=64, split_k=2)
    check(y, x, w64, R.matmul_ref(x, p))


def _fake_cost(c):
    """A synthetic cost with a unique optimum; fma and late_scale are worse."""
    if c.get("fma") or c.get("late_scale"):
        return 100.0
    return (
        10.0
        + abs(np.log2(c["block_n"] / 128))
        + abs(np.log2(c["split_k"] / 2))
        + abs(c["num_stages"] - 3)
        + abs(np.log2(c["block_k"] / 512))
        + abs(np.log2(c["num_warps"] / 8))
    )


def _normalize(c):
    if c["split_k"] > 4 and c["block_k"] > 1024:
        raise ValueError("split too fine for this block_k")
    return tuple(sorted(c.items()))


def test_autotune_search_finds_optimum_and_respects_budget(tmp_path):
    calls = []

    def evaluate(cands):
        calls.append(len(cands))
        return [
            RuntimeError("compile failed")
            if c["block_n"] == 64 and c["split_k"] == 4
            else _fake_cost(c)
            for c in cands
        ]

    default = dict(block_n=64, block_k=256, split_k=8, num_warps=4, num_stages=4)
    kw = dict(default=default, chunk=128, dots_per_chunk=2, m=1, weight_bytes_per_elem=0.5)
    best, recs = autotune.search(evaluate, _normalize, deadline=time.perf_counter() + 30, **kw)
    assert {k: best[k] for k in ("block_n", "split_k", "num_stages", "num_warps", "block_k")} == {
        "block_n": 128,
        "split_k": 2,
        "num_stages": 3,
        "num_warps": 8,
        "block_k": 512,
    }
    assert best["us"] == 10.0
    assert any("compile failed" in r.get("error", "") for r in recs)
    assert any(r.get("error", "").startswith("skipped") for r in recs)  # smem estimate
    measured = [tuple(sorted(r["cfg"].items())) for r in recs if "us" in r]
    assert len(measured) == len(set(measured))  # each config measured once
    assert max(autotune.block_k_options(128, 2)) == 1024  # unroll cap: 8 chunks x 2 tiles
    assert autotune.block_k_options(256, 8) == (256, 512)
    # an expired deadline measures nothing
    calls.clear()
    best, recs = autotune.search(evaluate, _normalize, deadline=time.perf_counter() - 1, **kw)
    assert best is None and not calls
    # the snippet is valid Python for tuned.py
    src = autotune.format_table(
        {("int4_g128", 1): dict(block_n=256, block_k=512, split_k=2, num_warps=8, num_stages=3)},
        device="test",
    )
    ns = {}
    exec(src, ns)
    want = {("int4_g128", 1): dict(block_n=256, block_k=512, split_k=2, num_warps=8, num_stages=3)}
    assert ns["TUNED"] == want
    # ... and a literal that tuned.py reads through $SHRINKJAX_TUNED without running it
    path = tmp_path / "k.tuned.py"
    path.write_text(src)
    assert tuned.read_snippet(str(path)) == want


def test_shared_memory_overflow_drops_stages_or_names_the_tiles():
    """Triton's shared-memory rejection (seen on the H100 for block_n=256 at 4 stages): without
    an explicit num_stages the fused kernel retries with fewer stages; with one, a ValueError
    names the tiles."""
    import jax.numpy as jnp

    from tests.kernels.test_kernels import make_int

    rng = np.random.default_rng(0)
    p, _ = make_int(rng, 128, 64, 4, 64, True)
    x = jnp.asarray(rng.normal(size=(2, 128)), jnp.float32)
    seen = []

    def kernel_2d(x2, packed, cfg, interpret):
        seen.append(cfg.num_stages)
        if cfg.num_stages > 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Shared memory size limit exceeded: requested")
        return jnp.zeros((x2.shape[0], packed.n), jnp.float32)

    y = driver.run_packed(kernel_2d, x, p, interpret=True, block_n=64, num_warps=4)
    assert y.shape == (2, 64) and seen[-1] == 2 and seen == sorted(seen, reverse=True)
    with pytest.raises(ValueError, match="shared memory"):
        driver.run_packed(kernel_2d, x, p, interpret=True, block_n=64, num_stages=4)


def test_unknown_tile_argument_is_a_clear_error():
    import jax.numpy as jnp

    from tests.kernels.test_kernels import make_int

    p, _ = make_int(np.random.default_rng(1), 128, 64, 4, 64, True)
    with pytest.raises(TypeError, match=r"unknown tile arguments \['blockn'\]"):
        int_matmul(jnp.ones((2, 128), jnp.float32), p, interpret=True, blockn=64)
