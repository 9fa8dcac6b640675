"""``scripts/probe_mgpu_int4.py``'s Mosaic GPU kernels (bare int4, and int4 with a scale per 128
K rows): clear errors for tiles they do not take,
its variants lower for CUDA on this CPU machine (Mosaic GPU lowers in Python; only the PTX
step needs the GPU), and on a GPU it equals float32 on random int4 codes."""

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from probe_mgpu_int4 import mgpu_int4_g128_gemv, mgpu_int4_gemv, tile_weight  # noqa: E402

VARIANTS = [  # (tokens, tile_k, steps, wgs, split, x_tokens_major, w_tiled, cluster)
    (16, 256, 2, 1, "k", False, False, 1),
    (8, 512, 2, 2, "k", True, False, 1),
    (16, 256, 2, 2, "rows", True, False, 1),
    (8, 512, 2, 2, "k", True, True, 1),
    (16, 256, 2, 2, "rows", True, True, 1),
    (8, 512, 2, 3, "stages", True, False, 1),  # 3 consumer groups: 2 sums parked
    (8, 512, 2, 2, "k", True, False, 2),  # x multicast to a cluster of 2 CTAs
    (16, 256, 2, 2, "k", False, False, 4),
]


def _weight(codes, tiled, rows, tile_k):
    """int4 W [N, K], or tile_weight's blocks of it."""
    return jnp.asarray(tile_weight(codes, rows, tile_k) if tiled else codes).astype(jnp.int4)


def test_tile_weight_makes_each_stage_one_block():
    w = np.arange(4 * 6).reshape(4, 6)
    got = tile_weight(w, 2, 3)  # [N / 2, K / 3, 2, 3]
    assert got.shape == (2, 2, 2, 3)
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(got[i, j], w[2 * i : 2 * i + 2, 3 * j : 3 * j + 3])


def test_clear_errors_for_tiles_it_does_not_take():
    w = jax.ShapeDtypeStruct((192, 512), jnp.int4)
    x = jax.ShapeDtypeStruct((512, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="K 512 must be multiples of tile_m 64 / tile_k 384"):
        jax.eval_shape(functools.partial(mgpu_int4_gemv, tile_k=384), w, x)
    with pytest.raises(
        ValueError,
        match=r"wgs must be 1 or 2 \(3: split 'stages'\) and split .* got 3, 'k'",
    ):
        jax.eval_shape(functools.partial(mgpu_int4_gemv, wgs=3), w, x)
    with pytest.raises(ValueError, match=r"wgs must be 1 or 2 .* got 4, 'stages'"):  # (hangs)
        jax.eval_shape(functools.partial(mgpu_int4_gemv, wgs=4, split="stages"), w, x)
    with pytest.raises(
        ValueError, match="N 192 must be a multiple of 128 rows per CTA x cluster 1"
    ):
        jax.eval_shape(functools.partial(mgpu_int4_gemv, wgs=2, split="rows"), w, x)
    with pytest.raises(ValueError, match="N 192 must be a multiple of 64 rows per CTA x cluster 4"):
        jax.eval_shape(functools.partial(mgpu_int4_gemv, cluster=4), w, x)
    tiled = jax.ShapeDtypeStruct((3, 2, 64, 256), jnp.int4)  # blocks of 64 x 256
    with pytest.raises(ValueError, match=r"needs blocks of \(64, 512\), got \(64, 256\)"):
        jax.eval_shape(functools.partial(mgpu_int4_gemv, tile_k=512, w_tiled=True), tiled, x)


@pytest.mark.parametrize("t,tile_k,steps,wgs,split,tokens_major,w_tiled,cluster", VARIANTS)
def test_variants_lower_for_cuda(t, tile_k, steps, wgs, split, tokens_major, w_tiled, cluster):
    rows = 64 * wgs if split == "rows" else 64
    shape = (256 // rows, 2048 // tile_k, rows, tile_k) if w_tiled else (256, 2048)
    w = jax.ShapeDtypeStruct(shape, jnp.int4)
    x = jax.ShapeDtypeStruct((t, 2048) if tokens_major else (2048, t), jnp.bfloat16)
    fn = functools.partial(
        mgpu_int4_gemv, tile_k=tile_k, steps=steps, wgs=wgs, split=split,
        x_tokens_major=tokens_major, w_tiled=w_tiled, num_sms=4, cluster=cluster,
    )  # fmt: skip
    text = jax.jit(fn).trace(w, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize("t,tile_k,steps,wgs,split,tokens_major,w_tiled,cluster", VARIANTS)
def test_gpu_equals_float32(t, tile_k, steps, wgs, split, tokens_major, w_tiled, cluster):
    rng = np.random.default_rng([t, tile_k, wgs])
    codes = rng.integers(-8, 8, size=(256, 2048), dtype=np.int8)
    xt = rng.standard_normal((2048, t)).astype(np.float32)
    xb = jnp.asarray(xt, jnp.bfloat16)
    w = _weight(codes, w_tiled, 64 * wgs if split == "rows" else 64, tile_k)
    y = mgpu_int4_gemv(
        w, xb.T if tokens_major else xb, tile_k=tile_k, steps=steps, wgs=wgs, split=split,
        x_tokens_major=tokens_major, w_tiled=w_tiled, cluster=cluster,
    )  # fmt: skip
    want = codes.astype(np.float64) @ np.asarray(xb, np.float64)
    err = np.linalg.norm(np.asarray(y, np.float64) - want) / np.linalg.norm(want)
    assert y.shape == (256, t) and err < 1e-2


CHUNKED = [  # (tokens, tile_k, wgs, chunk, overlap, split)
    (8, 512, 2, 128, False, "k"),
    (8, 1024, 2, 256, True, "k"),
    (16, 512, 1, None, True, "k"),
    (8, 512, 3, None, False, "stages"),  # stages 0, 3 / 1, 4 / 2, 5 to groups 0 / 1 / 2
    (16, 256, 2, 128, False, "stages"),
]


@pytest.mark.parametrize("t,tile_k,wgs,chunk,overlap,split", CHUNKED)
def test_chunked_and_overlapped_lower_for_cuda(t, tile_k, wgs, chunk, overlap, split):
    w = jax.ShapeDtypeStruct((256, 2048), jnp.int4)
    x = jax.ShapeDtypeStruct((t, 2048), jnp.bfloat16)
    fn = functools.partial(
        mgpu_int4_gemv, tile_k=tile_k, wgs=wgs, x_tokens_major=True, num_sms=4, chunk=chunk,
        overlap=overlap, steps=3, split=split,
    )  # fmt: skip
    assert "mosaic_gpu" in jax.jit(fn).trace(w, x).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("t,tile_k,wgs,chunk,overlap,split", CHUNKED)
def test_gpu_chunked_and_overlapped_equal_float64(t, tile_k, wgs, chunk, overlap, split):
    rng = np.random.default_rng([t, tile_k, wgs, 5])
    codes = rng.integers(-8, 8, size=(256, 2048), dtype=np.int8)
    x = jnp.asarray(rng.standard_normal((t, 2048)), jnp.bfloat16)
    y = mgpu_int4_gemv(
        jnp.asarray(codes).astype(jnp.int4), x, tile_k=tile_k, wgs=wgs, x_tokens_major=True,
        chunk=chunk, overlap=overlap, steps=3, split=split,
    )  # fmt: skip
    want = codes.astype(np.float64) @ np.asarray(x, np.float64).T
    err = np.linalg.norm(np.asarray(y, np.float64) - want) / np.linalg.norm(want)
    assert y.shape == (256, t) and err < 1e-2


def test_chunk_must_divide_a_groups_part():
    w = jax.ShapeDtypeStruct((256, 2048), jnp.int4)
    x = jax.ShapeDtypeStruct((8, 2048), jnp.bfloat16)
    with pytest.raises(ValueError, match="chunk 384 must divide a group's 256 columns"):
        jax.eval_shape(
            functools.partial(mgpu_int4_gemv, tile_k=512, wgs=2, x_tokens_major=True, chunk=384),
            w, x,
        )  # fmt: skip


def test_stream_only_lowers_for_cuda_without_mma():
    w = jax.ShapeDtypeStruct((256, 2048), jnp.int4)
    x = jax.ShapeDtypeStruct((8, 2048), jnp.bfloat16)
    texts = {}
    for stream_only in (False, True):
        fn = functools.partial(
            mgpu_int4_gemv, tile_k=512, wgs=2, x_tokens_major=True, num_sms=4,
            stream_only=stream_only,
        )  # fmt: skip
        texts[stream_only] = str(jax.make_jaxpr(fn)(w, x))
    assert "wgmma_wait" in texts[False] and "wgmma_wait" not in texts[True]
    assert texts[True].count("copy_gmem_to_smem") == texts[False].count("copy_gmem_to_smem") > 0


@pytest.mark.gpu
def test_gpu_stream_only_writes_zeros():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.integers(-8, 8, size=(256, 2048), dtype=np.int8)).astype(jnp.int4)
    x = jnp.asarray(rng.standard_normal((8, 2048)), jnp.bfloat16)
    y = mgpu_int4_gemv(w, x, tile_k=512, wgs=2, x_tokens_major=True, stream_only=True)
    assert y.shape == (256, 8) and not np.asarray(y).any()


G128_VARIANTS = [  # (tokens, tile_k, steps, wgs, w_tiled, zeros, cluster)
    (8, 512, 2, 2, False, False, 1),
    (16, 256, 2, 1, False, False, 1),
    (8, 512, 2, 2, True, False, 1),
    (8, 512, 2, 2, False, True, 1),
    (16, 512, 2, 2, True, True, 1),
    (8, 512, 2, 2, False, False, 2),
    (16, 512, 2, 2, False, True, 4),
]


def test_g128_clear_errors():
    w = jax.ShapeDtypeStruct((128, 1024), jnp.int4)
    x = jax.ShapeDtypeStruct((8, 1024), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((8, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"tile_k / wgs \(2; 1 or 2\) a multiple of 128"):
        jax.eval_shape(functools.partial(mgpu_int4_g128_gemv, tile_k=128), w, s, x)
    bad = jax.ShapeDtypeStruct((128, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"scales must be \[K / 128, N\] = \(8, 128\)"):
        jax.eval_shape(mgpu_int4_g128_gemv, w, bad, x)
    with pytest.raises(ValueError, match=r"zeros must be \[K / 128, N\] = \(8, 128\)"):
        jax.eval_shape(mgpu_int4_g128_gemv, w, s, x, bad)


@pytest.mark.parametrize("t,tile_k,steps,wgs,w_tiled,zeros,cluster", G128_VARIANTS)
def test_g128_lowers_for_cuda(t, tile_k, steps, wgs, w_tiled, zeros, cluster):
    shape = (4, 2048 // tile_k, 64, tile_k) if w_tiled else (256, 2048)
    w = jax.ShapeDtypeStruct(shape, jnp.int4)
    s = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16)
    x = jax.ShapeDtypeStruct((t, 2048), jnp.bfloat16)
    fn = functools.partial(
        mgpu_int4_g128_gemv, tile_k=tile_k, steps=steps, wgs=wgs, w_tiled=w_tiled, num_sms=4,
        cluster=cluster,
    )  # fmt: skip
    args = (w, s, x, s) if zeros else (w, s, x)  # (zero points: bf16, laid out as the scales)
    assert "mosaic_gpu" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("t,tile_k,steps,wgs,w_tiled,zeros,cluster", G128_VARIANTS)
def test_gpu_g128_equals_float64(t, tile_k, steps, wgs, w_tiled, zeros, cluster):
    rng = np.random.default_rng([t, tile_k, wgs, 128])
    codes = rng.integers(-8, 8, size=(256, 2048), dtype=np.int8)
    s = jnp.asarray(rng.uniform(0.5, 1.5, size=(16, 256)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((t, 2048)), jnp.bfloat16)
    z = rng.integers(-8, 8, size=(16, 256)).astype(np.float64) if zeros else np.zeros((16, 256))
    w = _weight(codes, w_tiled, 64, tile_k)
    zb = jnp.asarray(z, jnp.bfloat16) if zeros else None
    y = mgpu_int4_g128_gemv(
        w, s, x, zb, tile_k=tile_k, steps=steps, wgs=wgs, w_tiled=w_tiled, cluster=cluster
    )
    deq = codes.astype(np.float64) - np.repeat(z, 128, 0).T
    dense = deq * np.repeat(np.asarray(s, np.float64), 128, 0).T
    want = dense @ np.asarray(x, np.float64).T
    err = np.linalg.norm(np.asarray(y, np.float64) - want) / np.linalg.norm(want)
    assert y.shape == (256, t) and err < 1e-2


XSUM_VARIANTS = [(8, 512, 2, 1), (16, 256, 1, 1), (8, 512, 2, 2)]  # (tokens, tile_k, wgs, cluster)


@pytest.mark.parametrize("t,tile_k,wgs,cluster", XSUM_VARIANTS)
def test_g128_xsum_zeros_lower_for_cuda(t, tile_k, wgs, cluster):
    w = jax.ShapeDtypeStruct((256, 2048), jnp.int4)
    s = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16)
    x = jax.ShapeDtypeStruct((t, 2048), jnp.bfloat16)
    fn = functools.partial(
        mgpu_int4_g128_gemv, tile_k=tile_k, wgs=wgs, cluster=cluster, num_sms=4, zero_mode="xsum"
    )
    assert (
        "mosaic_gpu" in jax.jit(fn).trace(w, s, x, s).lower(lowering_platforms=("cuda",)).as_text()
    )


def test_x_with_another_k_than_the_weight_is_an_error():
    w = jax.ShapeDtypeStruct((256, 2048), jnp.int4)
    s = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16)
    tk, kt = (
        jax.ShapeDtypeStruct((8, 1024), jnp.bfloat16),
        jax.ShapeDtypeStruct((1024, 16), jnp.bfloat16),
    )
    with pytest.raises(ValueError, match=r"x \[T, K\] must have K = 2048 .* got shape \(8, 1024\)"):
        jax.eval_shape(functools.partial(mgpu_int4_gemv, x_tokens_major=True), w, tk)
    with pytest.raises(ValueError, match=r"x\^T \[K, T\] must have K = 2048 .* \(1024, 16\)"):
        jax.eval_shape(mgpu_int4_gemv, w, kt)
    with pytest.raises(ValueError, match=r"x \[T, K\] must have K = 2048"):
        jax.eval_shape(mgpu_int4_g128_gemv, w, s, tk)


def test_g128_unknown_zero_mode_is_an_error():
    w = jax.ShapeDtypeStruct((256, 2048), jnp.int4)
    s = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16)
    x = jax.ShapeDtypeStruct((8, 2048), jnp.bfloat16)
    with pytest.raises(ValueError, match="zero_mode must be 'codes' or 'xsum', got 'sum'"):
        jax.eval_shape(functools.partial(mgpu_int4_g128_gemv, zero_mode="sum"), w, s, x, s)


@pytest.mark.gpu
@pytest.mark.parametrize("t,tile_k,wgs,cluster", XSUM_VARIANTS)
def test_gpu_g128_xsum_zeros_equal_float64(t, tile_k, wgs, cluster):
    rng = np.random.default_rng([t, tile_k, wgs, cluster, 7])
    codes = rng.integers(-8, 8, size=(256, 2048), dtype=np.int8)
    s = jnp.asarray(rng.uniform(0.5, 1.5, size=(16, 256)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((t, 2048)), jnp.bfloat16)
    z = rng.integers(-8, 8, size=(16, 256)).astype(np.float64)
    w = jnp.asarray(codes).astype(jnp.int4)
    kw = dict(tile_k=tile_k, wgs=wgs, cluster=cluster)
    y = mgpu_int4_g128_gemv(w, s, x, jnp.asarray(z, jnp.bfloat16), zero_mode="xsum", **kw)
    dense = (codes - np.repeat(z, 128, 0).T) * np.repeat(np.asarray(s, np.float64), 128, 0).T
    want = dense @ np.asarray(x, np.float64).T
    err = np.linalg.norm(np.asarray(y, np.float64) - want) / np.linalg.norm(want)
    assert y.shape == (256, t) and err < 1e-2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--x-layout", "kt,kx"], "--x-layout takes tk / kt, got 'kx'"),
        (["--w-layout", "tile"], "--w-layout takes rowmajor / tiled / packed / packed-nosub, got"),
        (["--w-layout", "packed", "--x-layout", "kt"], "--w-layout packed runs --split k"),
        (["--w-layout", "packed-nosub", "--scaled"], "packed-nosub is the bare kernel's"),
        (["--mma-k", "32"], "--mma-k takes 256 / 128 / 64, got '32'"),
        (["--split", "n"], "--split takes k / rows / stages, got 'n'"),
        (["--scaled", "--x-layout", "kt"], "--scaled runs --split k with --x-layout tk only"),
        (["--zeros"], "--zeros goes with --scaled"),
        (["--scaled", "--zero-mode", "xsum"], "--zero-mode goes with --zeros"),
        (["--zero-mode", "sum"], "--zero-mode takes codes / xsum, got 'sum'"),
        (["--overlap", "0,2"], "--overlap takes 0 / 1, got '2'"),
        (["--scaled", "--stream-only"], "--stream-only / --chunk / --overlap are the bare"),
        (["--scaled", "--overlap", "1"], "--stream-only / --chunk / --overlap are the bare"),
    ],
)
def test_cli_rejects_bad_flags_by_name(argv, message, capsys):
    from probe_mgpu_int4 import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_untimed_checks_then_runs_the_calls(capsys):
    from probe_mgpu_int4 import main

    main(["--k", "2048", "--n", "256", "--tokens", "8", "--untimed", "--calls", "2"])
    out = capsys.readouterr().out
    assert "2 calls more (untimed)" in out and "FAILED" not in out


def _trace(path, ranges_by_tid):
    """A Chrome trace as Mosaic GPU's profiler writes it: per tid, ranges (name, start, end)
    in cycles, stamped ``ts = (start_ns + cycles) / 1000``."""
    events = []
    for tid, ranges in ranges_by_tid.items():
        for name, a, b in ranges:
            events.append(dict(name=name, ph="B", ts=(5e6 + a) / 1e3, pid=1, tid=tid))
            events.append(dict(name=name, ph="E", ts=(5e6 + b) / 1e3, pid=1, tid=tid))
    path.write_text(json.dumps({"displayTimeUnit": "ns", "traceEvents": events}))
    return str(path)


def test_summarize_profile_splits_each_groups_span(tmp_path):
    from probe_mgpu_int4 import summarize_profile

    stage = lambda t0: [
        ("upcast", t0, t0 + 50),
        ("mma", t0 + 50, t0 + 60),
        ("wait", t0 + 60, t0 + 100),
    ]  # noqa: E731
    group0 = [("Init", 0, 10), *stage(110), *stage(400), ("finish", 600, 700)]
    # 2 CTAs of 1 consumer group (tid 1, 3) and a producer with only "Init" (tid 2, 4)
    path = _trace(
        tmp_path / "t.json",
        {1: group0, 2: [("Init", 0, 5)], 3: [(n, a + 2, b + 2) for n, a, b in group0], 4: []},
    )
    got = summarize_profile(path, wgs=1)
    assert list(got) == [0]  # (the producer recorded no work)
    g = got[0]
    assert g["ctas"] == 2 and g["span"] == pytest.approx(590)  # 110 .. 700
    assert g["upcast"] == pytest.approx(100) and g["upcast n"] == 2
    assert g["wait"] == pytest.approx(80) and g["finish"] == pytest.approx(100)
    assert g["between"] == pytest.approx(590 - 100 - 20 - 80 - 100)
    assert g["before_first"] == pytest.approx(100)


@pytest.mark.gpu
def test_gpu_profile_counts_each_stages_ranges(tmp_path, capsys):
    from probe_mgpu_int4 import main

    out_json = tmp_path / "p.json"
    main([
        "--k", "2048", "--n", "256", "--tokens", "8", "--calls", "2", "--tile-k", "512",
        "--profile", str(tmp_path / "prof"), "--json", str(out_json),
    ])  # fmt: skip
    assert "FAILED" not in capsys.readouterr().out
    [row] = json.loads(out_json.read_text())["rows"]
    for g in ("0", "1"):  # 2 groups, each its half of 4 stages: one wgmma per stage
        st = row["profile"][g]
        assert st["ctas"] == 4
        assert (st["upcast n"], st["mma n"], st["wait n"], st["finish n"]) == (4, 4, 4, 1)


def test_plot_mgpu_profile_draws_each_groups_ranges(tmp_path):
    pytest.importorskip("matplotlib")
    from plot_mgpu_profile import load_ranges, main

    stage = lambda t0: [("upcast", t0, t0 + 50), ("mma", t0 + 50, t0 + 60)]  # noqa: E731
    trace = _trace(tmp_path / "t.json", {1: [("Init", 0, 10), *stage(100), *stage(300)], 2: []})
    assert load_ranges(trace) == {
        1: [("upcast", 0, 50), ("mma", 50, 60), ("upcast", 200, 250), ("mma", 250, 260)]
    }
    main(["a=" + trace, "--wgs", "1", "--ctas", "1", "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["nolabel", "--out", str(tmp_path / "q.png")])
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match=r"bad.json: not a profiler trace \(no 'traceEvents'"):
        load_ranges(str(tmp_path / "bad.json"))
