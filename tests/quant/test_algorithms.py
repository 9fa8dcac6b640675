"""GPTQ, AWQ, SmoothQuant, LLM.int8() and W8A8 on a real SmolLM2 layer with real WikiText
calibration inputs (the ``smollm2`` / ``calib_tokens`` fixtures), plus the quantize stage end
to end on the tiny model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shrinkjax.calibrate import _block_taps, calibrate, embed_windows
from shrinkjax.quant import awq, formats, gptq
from shrinkjax.quant import methods as M
from shrinkjax.quant.array import QuantizedArray, QuantSpec
from shrinkjax.quant.llm_int8 import Int8OutlierArray, int8_matmul_decomposed, quantize_llm_int8
from shrinkjax.quant.smoothquant import W8A8Array, quantize_w8a8

LAYER = 5  # a middle block; its down_proj input has |x| >= 6 outlier features


def _mse(a, b):
    return float(jnp.mean((jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) ** 2))


def _mm(x, w):
    return jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)


@pytest.fixture(scope="module")
def real_block(smollm2, calib_tokens):
    """(model, block input h, mask, rope, taps {name: [T, K]}) for block LAYER."""
    model = smollm2.model
    n, seqlen = calib_tokens.shape
    h = embed_windows(model, jnp.asarray(calib_tokens), n)
    mask, rope = model.masks_and_rope(n, seqlen)
    for i in range(LAYER):
        h, _ = _block_taps(model.layers[i], h, mask, rope, None)
    taps: dict = {}
    model.layers[LAYER](h, rope, mask, taps=taps)
    taps = {k: v.reshape(-1, v.shape[-1]) for k, v in taps.items()}
    return model, h, mask, rope, taps


def _kernel(block, name):
    m = block
    for p in name.split("."):
        m = getattr(m, p)
    return m.kernel.value


# ---------------------------------------------------------------------------------------------
# GPTQ


def _naive_gptq(w, h, fmt, g, percdamp=0.01, perm=None, static_qp=None):
    """Unblocked GPTQ/OBQ in float64 numpy: quantize row k, spread its error with the current
    inverse Hessian, eliminate k from it. The blocked, jitted solver must agree."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    k = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    perm = np.arange(k) if perm is None else np.asarray(perm)
    w, h = w[perm], h[perm][:, perm]
    h += percdamp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    q = np.zeros_like(w)
    qp = None
    for r in range(k):
        if static_qp is not None:
            qp = jax.tree.map(lambda a, r=r: a[perm[r] // g : perm[r] // g + 1], static_qp)
        elif r % g == 0:
            qp = fmt.fit(jnp.asarray(w[r : r + g], jnp.float32))
        qr = np.asarray(fmt.fake_quant(jnp.asarray(w[r : r + 1], jnp.float32), qp), np.float64)
        err = (w[r] - qr[0]) / hinv[r, r]
        w[r + 1 :] -= np.outer(hinv[r + 1 :, r], err)
        q[r] = qr[0]
        hinv = hinv - np.outer(hinv[:, r], hinv[r, :]) / hinv[r, r]
    out = np.zeros_like(q)
    out[perm] = q
    return out


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_unblocked_reference(act_order):
    rng = np.random.default_rng(0)
    k, n, g = 96, 12, 16
    x = rng.normal(size=(400, k)) @ rng.normal(size=(k, k)) / np.sqrt(k)
    x[:, 5] = 0.0  # a dead input
    w = rng.normal(size=(k, n)).astype(np.float32)
    h = gptq.hessian(gptq.hessian_update(gptq.hessian_init(k), jnp.asarray(x, jnp.float32)))
    fmt = formats.make(QuantSpec("int4", group_size=g, symmetric=False))
    cfg = gptq.GPTQConfig(block_size=32, act_order=act_order)  # 3 blocks, 2 groups per block
    res = gptq.gptq_quantize(w, h, fmt, cfg)
    perm, static_qp = None, None
    if act_order:
        hh = np.array(h)
        hh[np.diag(hh) == 0, np.diag(hh) == 0] = 1
        perm = np.argsort(-np.diag(hh), kind="stable")
        w0 = np.where((np.diag(np.array(h)) == 0)[:, None], 0, w)
        static_qp = fmt.fit(jnp.asarray(w0), tensor_amax=jnp.max(jnp.abs(w0)))
    ref = _naive_gptq(w, h, fmt, g, perm=perm, static_qp=static_qp)
    got = np.asarray(res.w_hat)
    assert np.mean(np.abs(got - ref) > 1e-3) < 0.01  # rare rounding-boundary flips only
    assert np.all(got[5] == 0)  # dead input row
    # the stored QuantizedArray is exactly the solver's grid values
    assert isinstance(res.qarray, QuantizedArray)
    np.testing.assert_array_equal(np.asarray(res.qarray.dequantize()), got)


@pytest.mark.parametrize("fmt_name", ["int4", "int3"])
def test_gptq_beats_rtn_on_real_layer(real_block, fmt_name):
    """Layer-output error on real calibration inputs, int-k g128 (down_proj, K = 1536) and, at
    int4, the joint q/k/v solve (K = 576 at g128: 4 groups of 128 and a short one of 64)."""
    model, _, _, _, taps = real_block
    block = model.layers[LAYER]
    spec = QuantSpec(fmt_name, group_size=128, symmetric=False)
    cases = {"down": (taps["down_in"], _kernel(block, "mlp.down_proj"))}
    if fmt_name == "int4":
        qkv = jnp.concatenate([_kernel(block, f"attn.{p}_proj") for p in "qkv"], axis=1)
        cases["qkv"] = (taps["attn_in"], qkv)
    for name, (x, w) in cases.items():
        assert M.resolve_spec(spec, w.shape) == spec  # g128 kept, also for K = 576
        fmt = formats.make(spec)
        h = gptq.hessian(gptq.hessian_update(gptq.hessian_init(w.shape[0]), x))
        res = gptq.gptq_quantize(w, h, fmt)
        ng = -(-w.shape[0] // 128)
        assert res.qarray.scales.shape == (ng, w.shape[1]) == res.qarray.zeros.shape
        np.testing.assert_array_equal(np.asarray(res.qarray.dequantize()), np.asarray(res.w_hat))
        e_rtn = gptq.output_error(x, w, fmt.quantize(w).dequantize())
        e_gptq = gptq.output_error(x, w, res.w_hat)
        assert e_gptq < 0.5 * e_rtn, (name, fmt_name, e_gptq, e_rtn)
        # the Hessian predicts the measured error (H = 2 XᵀX / n)
        assert gptq.expected_output_error(h, w, res.w_hat) == pytest.approx(e_gptq, rel=1e-3)


@pytest.mark.parametrize(
    "act_order, block", [(False, 32), (False, 128), (True, 32)], ids=["g>B", "g<B", "act_order"]
)
def test_gptq_ragged_last_group_matches_unblocked_reference(act_order, block):
    """K = 200 at g64: 3 groups of 64 and a short one of 8 rows, fitted on those rows alone
    (the unblocked reference fits ``w[192:200]``); the stored groups are the solver's."""
    rng = np.random.default_rng(4)
    k, n, g = 200, 12, 64
    x = rng.normal(size=(600, k)) @ rng.normal(size=(k, k)) / np.sqrt(k)
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[192:] *= 0.05  # the short group is small: a neighbour's qparams would be far off
    h = gptq.hessian(gptq.hessian_update(gptq.hessian_init(k), jnp.asarray(x, jnp.float32)))
    fmt = formats.make(QuantSpec("int4", group_size=g, symmetric=False))
    res = gptq.gptq_quantize(w, h, fmt, gptq.GPTQConfig(block_size=block, act_order=act_order))
    perm, static_qp = None, None
    if act_order:
        perm = np.argsort(-np.diag(np.array(h)), kind="stable")
        static_qp = fmt.fit(jnp.asarray(w), tensor_amax=jnp.max(jnp.abs(w)))
        # static groups: the short group's qparams are those of its own 8 rows
        jax.tree.map(np.testing.assert_array_equal, fmt.fit(jnp.asarray(w[192:])),
                     jax.tree.map(lambda a: a[3:], static_qp))  # fmt: skip
    ref = _naive_gptq(w, h, fmt, g, perm=perm, static_qp=static_qp)
    got = np.asarray(res.w_hat)
    assert np.mean(np.abs(got - ref) > 1e-3) < 0.01
    qa = res.qarray
    assert qa.scales.shape == (4, n) and qa.zeros.shape == (4, n)
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), got)
    # codes/scales agree with from_groups on the stored qparams, and the short group's rows
    # sit on its own grid
    qp = {"scales": qa.scales, "zeros": qa.zeros}
    jax.tree.map(np.testing.assert_array_equal, fmt.from_groups(got, qp), qa)
    last = {"scales": qa.scales[3:], "zeros": qa.zeros[3:]}
    np.testing.assert_array_equal(np.asarray(fmt.fake_quant(got[192:], last)), got[192:])
    assert np.abs(got[192:]).max() < 0.2 * np.abs(got[:192]).max()
    # and GPTQ beats RTN on the layer output
    x32 = jnp.asarray(x, jnp.float32)
    e_rtn = gptq.output_error(x32, w, fmt.quantize(w).dequantize())
    assert gptq.output_error(x32, w, got) < 0.8 * e_rtn


def test_resolve_spec_keeps_ragged_int_groups():
    for spec in (QuantSpec("int4"), QuantSpec("int3", group_size=128, symmetric=False)):
        assert M.resolve_spec(spec, (576, 64)) == spec
    with pytest.raises(ValueError, match="not a multiple of 8"):  # packing is not a group size
        M.resolve_spec(QuantSpec("int3"), (572, 64))
    # formats without ragged groups still fall back to a divisor (NF4) or keep their blocks
    assert M.resolve_spec(QuantSpec("nf4", group_size=128), (576, 64)).group_size == 96
    assert M.resolve_spec(QuantSpec("mxfp4"), (576, 64)) == QuantSpec("mxfp4")


MSE_SPECS = [
    QuantSpec("int4", group_size=32, symmetric=False),
    QuantSpec("int3", group_size=32, symmetric=True),
    QuantSpec("nf4", group_size=32),
]


@pytest.mark.parametrize("spec", MSE_SPECS, ids=lambda s: s.describe())
def test_fit_mse_never_worse_than_minmax(spec):
    """The clipping grid search keeps the min-max fit (shrink 1) unless a clipped range has a
    smaller Σ|w - Q(w)|^2.4 — per group and column — and on heavy-tailed weights it clips."""
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.standard_t(3, size=(96, 40)), jnp.float32)
    fmt = formats.make(spec)
    amax = jnp.max(jnp.abs(w))

    def err(qp):
        d = jnp.abs(fmt.fake_quant(w, qp) - w).reshape(3, 32, 40)
        return np.asarray(jnp.sum(d**2.4, axis=1))

    plain = fmt.fit(w, tensor_amax=amax)
    searched = gptq.fit_mse(fmt, w, amax, grid=100, max_shrink=0.8, norm=2.4)
    e0, e1 = err(plain), err(searched)
    assert np.all(e1 <= e0 * (1 + 1e-6))
    assert np.mean(e1 < e0 * 0.99) > 0.3  # t(3) tails: clipping pays in most groups
    # a one-point grid is the plain min-max fit
    one = gptq.fit_mse(fmt, w, amax, grid=1, max_shrink=0.8, norm=2.4)
    jax.tree.map(np.testing.assert_array_equal, one, plain)


def test_gptq_mse_grid_on_real_layer(real_block):
    """GPTQ with the clipping search still beats RTN by far on a real layer, and its stored
    qparams reproduce its dequantized weight."""
    model, _, _, _, taps = real_block
    x, w = taps["down_in"], _kernel(model.layers[LAYER], "mlp.down_proj")
    fmt = formats.make(QuantSpec("int4", group_size=128, symmetric=False))
    h = gptq.hessian(gptq.hessian_update(gptq.hessian_init(w.shape[0]), x))
    for cfg in (gptq.GPTQConfig(mse_grid=20), gptq.GPTQConfig(mse_grid=20, act_order=True)):
        res = gptq.gptq_quantize(w, h, fmt, cfg)
        np.testing.assert_array_equal(np.asarray(res.qarray.dequantize()), np.asarray(res.w_hat))
        e_rtn = gptq.output_error(x, w, fmt.quantize(w).dequantize())
        assert gptq.output_error(x, w, res.w_hat) < 0.5 * e_rtn


def test_gptq_cholesky_failure_falls_back(caplog):
    k, n = 32, 8
    w = np.random.default_rng(1).normal(size=(k, n)).astype(np.float32)
    h = -jnp.eye(k)  # negative definite: Cholesky fails at every damping
    fmt = formats.make(QuantSpec("int4", group_size=16))
    res = gptq.gptq_quantize(w, h, fmt, gptq.GPTQConfig(damp_retries=1))
    assert res.fallback == "rtn"
    np.testing.assert_array_equal(np.asarray(res.w_hat), np.asarray(fmt.quantize(w).dequantize()))


# ---------------------------------------------------------------------------------------------
# AWQ


def test_awq_beats_rtn_on_real_layer(real_block):
    """Scale searched on 3 windows, error measured on the held-out 4th."""
    model, _, _, _, taps = real_block
    block = model.layers[LAYER]
    x = taps["attn_in"]
    train, test = x[:384], x[384:]
    ws = [_kernel(block, f"attn.{p}_proj") for p in "qkv"]
    spec = QuantSpec("int4", group_size=128, symmetric=False)
    assert M.resolve_spec(spec, ws[0].shape) == spec  # K = 576: a short last group of 64
    fmt = formats.make(spec)
    s, alpha, losses = awq.search_scale(train, ws, [fmt] * 3, jnp.mean(jnp.abs(train), axis=0))
    assert alpha > 0 and float(jnp.min(losses)) < float(losses[0])
    w = jnp.concatenate(ws, axis=1)
    y = _mm(test, w)
    e_rtn = _mse(_mm(test, awq.fake_quant(fmt, w)), y)
    e_awq = _mse(_mm(test / s, awq.fake_quant(fmt, w * s[:, None])), y)
    assert e_awq < 0.9 * e_rtn, (e_awq, e_rtn)
    # clipping search never increases the in-sample error of the partial outputs
    wc, ratio = awq.search_clip(train[:256], ws[2], fmt=fmt)
    assert float(jnp.min(ratio)) >= 0.5
    assert wc.shape == ws[2].shape and ratio.shape == (5, ws[2].shape[1])
    e0 = _mse(_mm(train, awq.fake_quant(fmt, ws[2])), _mm(train, ws[2]))
    e1 = _mse(_mm(train, awq.fake_quant(fmt, wc)), _mm(train, ws[2]))
    assert e1 <= e0 * 1.05


def _fold_only(method_obj, model, tokens):
    """Run a method on block LAYER; (model, block input h, block outputs before, after)."""
    q = nnx.clone(model)
    n, seqlen = tokens.shape
    h = embed_windows(model, jnp.asarray(tokens), n)
    mask, rope = model.masks_and_rope(n, seqlen)
    for i in range(LAYER):
        h, _ = _block_taps(model.layers[i], h, mask, rope, None)
    q.layers = nnx.List(list(q.layers)[: LAYER + 1])  # later blocks are not needed
    q.cfg = q.cfg.replace(n_layers=LAYER + 1)
    calibrate(q, jnp.asarray(tokens), method_obj, batch_size=n, progress=False)
    before, _ = _block_taps(model.layers[LAYER], h, mask, rope, None)
    after, _ = _block_taps(q.layers[LAYER], h, mask, rope, None)
    return q, h, before, after


def _rel_to_block(h, before, after) -> float:
    """Max change of the block output relative to the block's own contribution (out - in)."""
    return float(jnp.max(jnp.abs(after - before)) / jnp.max(jnp.abs(before - h)))


def _layer_assigned(model, spec):
    names = (
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    return {f"layers.{LAYER}.{nm}.kernel": spec for nm in names}


def test_awq_folding_keeps_the_float_function(smollm2, calib_tokens):
    """All four folds (attn_norm, mlp_norm, v_proj columns under GQA, up_proj columns)."""
    model = smollm2.model
    spec = QuantSpec("int4", group_size=64, symmetric=False)
    meth = M.AWQMethod(
        _layer_assigned(model, spec), model.cfg, M.AWQConfig(quantize=False, max_tokens=512)
    )
    q, h, before, after = _fold_only(meth, model, calib_tokens)
    blk = q.layers[LAYER]
    assert not np.allclose(
        np.asarray(blk.attn_norm.scale.value), np.asarray(model.layers[LAYER].attn_norm.scale.value)
    )
    rel = _rel_to_block(h, before, after)
    assert rel < 1e-5, rel


# ---------------------------------------------------------------------------------------------
# SmoothQuant / W8A8


def test_smoothquant_folding_keeps_the_float_function(smollm2, calib_tokens):
    model = smollm2.model
    meth = M.W8A8Method(_layer_assigned(model, QuantSpec("int8")), alpha=0.5, quantize=False)
    q, h, before, after = _fold_only(meth, model, calib_tokens)
    assert not np.allclose(
        np.asarray(q.layers[LAYER].mlp_norm.scale.value),
        np.asarray(model.layers[LAYER].mlp_norm.scale.value),
    )
    rel = _rel_to_block(h, before, after)
    assert rel < 1e-5, rel


def test_smoothquant_w8a8_block_close_to_float(smollm2, calib_tokens):
    model = smollm2.model
    meth = M.W8A8Method(_layer_assigned(model, QuantSpec("int8")), alpha=0.5)
    q, h, before, after = _fold_only(meth, model, calib_tokens)
    assert isinstance(_kernel(q.layers[LAYER], "attn.q_proj"), W8A8Array)
    # error of the block's contribution to the residual stream (out - in)
    rel = float(jnp.linalg.norm(after - before) / jnp.linalg.norm(before - h))
    assert rel < 0.05, rel


def test_w8a8_matmul_matches_manual(real_block):
    model, _, _, _, taps = real_block
    x, w = taps["attn_in"], _kernel(model.layers[LAYER], "attn.q_proj")
    for kind in ("int8", "fp8_e4m3"):
        wa = quantize_w8a8(w, kind)
        from shrinkjax.kernels import dispatch

        y = dispatch.linear(x, wa)
        qmax = 127.0 if kind == "int8" else 448.0
        sx = jnp.max(jnp.abs(x), axis=1, keepdims=True) / qmax
        if kind == "int8":
            xq = jnp.clip(jnp.round(x / sx), -127, 127)
        else:
            xq = (x / sx).astype(jnp.float8_e4m3fn).astype(jnp.float32)
        manual = _mm(xq, wa.weight_values()) * sx * wa.w_scale
        np.testing.assert_allclose(np.asarray(y), np.asarray(manual), rtol=1e-4, atol=1e-4)
        rel = float(jnp.linalg.norm(y - _mm(x, w)) / jnp.linalg.norm(_mm(x, w)))
        assert rel < (0.03 if kind == "int8" else 0.06), (kind, rel)
        assert wa.bits_per_weight == pytest.approx(8 + 32 / w.shape[0])


@pytest.mark.parametrize("kind", ["fp8_e4m3", "int8"])
def test_gptq_w8a8_keeps_gptq_weights(real_block, kind):
    """GPTQ on the per-channel 8-bit grid, then W8A8 with dynamic per-token activations: the
    W8A8 kernel holds GPTQ's weights bit for bit, and its layer error beats RTN W8A8's."""
    from shrinkjax.kernels import dispatch
    from shrinkjax.quant.smoothquant import w8a8_from_quantized

    model, _, _, _, taps = real_block
    x, w = taps["down_in"], _kernel(model.layers[LAYER], "mlp.down_proj")
    fmt = formats.make(QuantSpec(kind, granularity="channel", symmetric=True))
    h = gptq.hessian(gptq.hessian_update(gptq.hessian_init(w.shape[0]), x))
    res = gptq.gptq_quantize(w, h, fmt)
    wa = w8a8_from_quantized(res.qarray, kind)
    np.testing.assert_array_equal(np.asarray(wa.dequantize()), np.asarray(res.w_hat))
    y = _mm(x, w)
    e_gptq = _mse(dispatch.linear(x, wa), y)
    e_rtn = _mse(dispatch.linear(x, quantize_w8a8(w, kind)), y)
    assert e_gptq < e_rtn, (kind, e_gptq, e_rtn)
    with pytest.raises(ValueError, match="per-channel symmetric"):
        w8a8_from_quantized(formats.make(QuantSpec("int4", group_size=64)).quantize(w), kind)


# ---------------------------------------------------------------------------------------------
# LLM.int8()


def test_llm_int8_close_to_float_and_decomposition(real_block):
    model, _, _, _, taps = real_block
    x, w = taps["down_in"], _kernel(model.layers[LAYER], "mlp.down_proj")
    outliers = int(jnp.sum(jnp.max(jnp.abs(x), axis=0) >= 6.0))
    assert outliers > 0  # this real input has outlier features
    y = _mm(x, w)
    wa = quantize_llm_int8(w)
    assert isinstance(wa, Int8OutlierArray)
    err = _mse(int8_matmul_decomposed(x, wa), y)
    rel = (err / float(jnp.mean(y**2))) ** 0.5
    assert rel < 0.04, rel  # per-token int8 of this heavy-tailed SwiGLU input: ~2.7%
    # without the 16-bit decomposition (threshold = inf) the int8 error is larger
    plain = quantize_llm_int8(w, threshold=float("inf"))
    assert err < _mse(int8_matmul_decomposed(x, plain), y)
    # every feature an outlier: the whole product is the fp16 one with dequantized rows
    allout = quantize_llm_int8(w, threshold=0.0)
    y16 = jnp.matmul(
        x.astype(jnp.float16), wa.dequantize(jnp.float16), preferred_element_type=jnp.float32
    )
    np.testing.assert_allclose(
        np.asarray(int8_matmul_decomposed(x, allout)), np.asarray(y16), rtol=1e-3, atol=1e-3
    )
    # the paper's exact fp16 outlier rows
    exact = quantize_llm_int8(w, keep_fp16=True)
    assert _mse(int8_matmul_decomposed(x, exact), y) <= err * 1.0001


# ---------------------------------------------------------------------------------------------
# The quantize stage, end to end on the tiny model


@pytest.mark.parametrize("name", ["gptq", "awq", "smoothquant", "llm_int8", "fp8"])
def test_quantize_stage_end_to_end(tmp_path, name):
    """``configs/ptq/<name>.py:tiny``: load -> quantize -> evaluate on the tiny Llama."""
    import importlib

    from shrinkjax.io.checkpoint import load_checkpoint
    from shrinkjax.models.params import flat_params
    from shrinkjax.run import run

    c = importlib.import_module(f"configs.ptq.{name}").get_config("tiny")
    c.unlock()
    c.evaluate.metrics = ("perplexity", "compare") if name == "gptq" else ("perplexity",)
    c.quantize.save = name in ("smoothquant", "llm_int8")
    if name == "fp8":
        c.quantize.act_scales = "static"  # calibrated per-tensor activation scales
    c.lock()
    res = run(c, str(tmp_path))
    q = res["quantize"]
    assert q["quantized"] == 14 and q["kept_float"] == 2  # 2 layers × 7; embed + lm_head
    assert q["model_bytes"] < q["model_bytes_before"]
    assert np.isfinite(res["evaluate"]["ppl"])
    if name in ("gptq", "awq"):
        assert 4.0 < q["bits_per_weight"] < 5.0
        assert "int4" in q["spec"]
    if name == "gptq":  # the teacher is untouched: the comparison sees a real difference
        assert res["evaluate"]["kl"] > 0
    if c.quantize.save:
        m2, _ = load_checkpoint(q["saved_to"])
        w = flat_params(m2)["layers.0.attn.q_proj.kernel"]
        assert type(w).__name__ == ("W8A8Array" if name == "smoothquant" else "Int8OutlierArray")
    if name == "fp8":
        assert "static" in q["activations"]


@pytest.mark.parametrize(
    "name", ["rtn", "gptq", "awq", "smoothquant", "llm_int8", "fp8", "nf4", "mxfp4", "nvfp4"]
)
def test_ptq_configs_resolve(name):
    """Every PTQ config builds (full and :tiny) and its spec is a valid format."""
    import importlib

    from shrinkjax.quant.stage import METHODS, spec_from_config

    mod = importlib.import_module(f"configs.ptq.{name}")
    for variant in ("", "tiny"):
        c = mod.get_config(variant)
        assert c.stages == ("load", "quantize", "evaluate")
        assert c.quantize.method in METHODS
        formats.make(spec_from_config(c.quantize))
    if hasattr(mod, "get_sweep"):
        for override in mod.get_sweep():
            c = mod.get_config().unlock()
            for k, v in override.items():
                node = c
                for part in k.split(".")[:-1]:
                    node = node[part]
                node[k.split(".")[-1]] = v
            formats.make(spec_from_config(c.quantize))


def test_quantize_stage_gptq_fp8_w8a8(tiny_llama):
    """``quantize.method=gptq`` with FP8 activations: every quantized kernel ends up a W8A8
    kernel (GPTQ-rounded E4M3 weights, dynamic per-token E4M3 activations)."""
    import importlib

    from shrinkjax.models.params import flat_params
    from shrinkjax.quant.stage import quantize_model

    c = importlib.import_module("configs.ptq.fp8").get_config("tiny")
    c.unlock()
    c.quantize.method = "gptq"
    model = nnx.clone(tiny_llama.model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.cfg.vocab_size, size=(4, 32)).astype(np.int32)
    res = quantize_model(model, c.quantize, tokens=tokens, progress=False)
    kernels = {p: v for p, v in flat_params(model).items() if p.startswith("layers.")}
    w8 = [p for p, v in kernels.items() if isinstance(v, W8A8Array)]
    assert w8 and len(w8) == res["quantized"]
    assert all(kernels[p].kind == "fp8_e4m3" and kernels[p].act_scale is None for p in w8)
    # the W8A8 model computes close to (but not exactly) the float one
    ref = tiny_llama.model(jnp.asarray(tokens))[0]
    got = model(jnp.asarray(tokens))[0]
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert 0.0 < rel < 0.1, rel
