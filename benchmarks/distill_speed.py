"""Throughput of the logit-KD train step: shrinkjax vs the same step written plainly in PyTorch.

Both sides, on the same GPU, same batch of token ids, same weights:

* teacher SmolLM2-135M-Instruct (30 layers, bf16 weights, no grad) forward;
* student = the teacher without layers 12–17 (24 layers), f32 master weights, bf16 compute;
* forward KL(p_T ‖ p_S) at τ = 1 over every position but the last, AdamW, global-norm clip 1.

shrinkjax: the jitted, state-donating ``train_step`` of :mod:`shrinkjax.train.step` (layers in
a ``lax.scan``, cuDNN attention — einsum if cuDNN does not compile —, loss chunked over tokens
from the final hidden states). PyTorch: ``transformers`` ``LlamaForCausalLM`` with SDPA
attention under ``torch.autocast(bfloat16)``, full [B, L, V] logits, ``F.log_softmax`` KL,
fused AdamW; first eager, then ``torch.compile`` on the loss function (both models).

Always finishes within ``--budget_s`` (default 240 s; start-up of each side included), in
this order, each in its own subprocess (none holds GPU memory while another runs), writing
the JSON after each:

1. shrinkjax (it also writes the weights for the torch side, numpy ``.npz`` in
   ``--workdir``, so the torch side needs no JAX);
2. torch eager;
3. torch.compile, under a timeout of the budget left: ``"compile timed out"`` if it does not
   finish.

``torch_tokens_per_s`` is the best torch mode that finished; every mode is in ``torch``.

GPU:

    python benchmarks/distill_speed.py --out benchmarks/results

CPU smoke test (tiny random model; the torch side may run in another interpreter, e.g. a venv
with torch + transformers but no JAX):

    python benchmarks/distill_speed.py --quick --out /tmp/ds --torch_python /path/to/python

Writes ``<out>/distill_speed.json``: {"device", "seqlen", "shrinkjax_tokens_per_s",
"torch_tokens_per_s", "mfu", ...}.

Default shrinkjax step: layers unrolled, one unchunked loss, backward GEMMs in bf16 (the
fastest measured; H100, 2026-11-27: 228K tokens/s; with autodiff's f32 backward GEMMs 163K,
with that and the 8192-token chunked loss 136K, with both and the layer scan 124K — the
library keeps scan + chunks as its defaults: less memory, faster compiles). Variants to
measure (``--skip_torch`` for speed): ``--chunk`` (loss chunk), ``--scan`` (layers in a
``lax.scan``), ``--remat``, ``--no-bf16_backward`` (f32 backward GEMMs), ``--profile DIR`` (a
trace of 3 steps; ``scripts/trace_summary.py DIR``), ``--random_init`` (SmolLM2 shapes, random
weights: no GGUF needed), ``--loss`` (``dynamic``: all four loss terms with run-time weights,
the step ``benchmarks/distill_quality.py`` trains with by default; ``fkl_ce``/``ce``: its
``--static_loss`` steps), ``--seqlen``/``--batch``, e.g. the quality benchmark's shape:
``--skip_torch --seqlen 512 --batch 32 --loss dynamic``. The torch side runs with
``torch.set_float32_matmul_precision("high")`` (TF32 for any f32 matmul, like XLA's default
precision on GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# not this directory: its kernels.py would shadow the `kernels` package transformers probes
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="shrinkjax loss chunk in tokens (0 = one unchunked, non-rematerialised loss: "
        "fastest measured on the H100, ~13 GB more memory at 8 x 2048)",
    )
    p.add_argument("--attention", default=None, help="shrinkjax attention: cudnn | einsum")
    p.add_argument("--remat", default="none")
    p.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="shrinkjax: layers in a lax.scan (--scan) or unrolled (default, --no_scan: "
        "fastest measured)",
    )
    p.add_argument(
        "--loss",
        default="fkl",
        choices=("fkl", "fkl_ce", "ce", "dynamic"),
        help="shrinkjax loss: forward KL (the torch side's), 0.5 CE + 0.5 forward KL, CE "
        "without a teacher, or all four terms with run-time weights (distill_quality.py's "
        "default step)",
    )
    p.add_argument("--budget_s", type=float, default=240.0, help="wall seconds for everything")
    p.add_argument("--torch_python", default=sys.executable, help="interpreter for the torch side")
    p.add_argument(
        "--workdir",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "shrinkjax_distill_speed"),
        help="scratch: the weights handed to the torch side",
    )
    p.add_argument("--no_torch_compile", action="store_true")
    p.add_argument(
        "--random_init",
        action="store_true",
        help="SmolLM2-135M-shaped random weights instead of the GGUF (speed only: the same "
        "shapes, no 98 MB upload)",
    )
    p.add_argument(
        "--bf16_backward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="shrinkjax: backward GEMMs of the dense linears in bf16 (StepConfig."
        "low_precision_backward, dispatch.mixed_matmul; default, as PyTorch autocast does) "
        "or, with --no-bf16_backward, autodiff's f32 ones",
    )
    p.add_argument(
        "--profile",
        default="",
        help="shrinkjax: also trace 3 steps with jax.profiler into this directory (a "
        "Perfetto trace.json.gz; summarise with scripts/trace_summary.py)",
    )
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", default="", help=argparse.SUPPRESS)
    p.add_argument("--weights", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.seqlen = a.seqlen or (64 if q else 2048)
    a.batch = a.batch or (2 if q else 8)
    a.steps = a.steps or (3 if q else 20)
    a.attention = a.attention or ("einsum" if q else "cudnn")
    return a


def tiny_config():
    return dict(
        vocab_size=512,
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        max_seq_len=256,
    )


def pair(quick: bool, random_init: bool = False):
    """(teacher cfg, teacher flat numpy params, student cfg, student flat) — numpy only."""
    import numpy as np

    from shrinkjax.models.surgery import drop_layer_params

    if quick or random_init:
        from shrinkjax.io.gguf import SMOLLM2_CONFIG
        from shrinkjax.models.llama import LlamaConfig

        cfg = LlamaConfig(**tiny_config()) if quick else SMOLLM2_CONFIG
        rng = np.random.default_rng(0)
        from shrinkjax.models.llama import abstract_model
        from shrinkjax.models.params import flat_params

        shapes = {k: v.shape for k, v in flat_params(abstract_model(cfg)).items()}
        flat = {
            k: (rng.normal(size=s) * 0.05 if len(s) > 1 else np.ones(s)).astype(np.float32)
            for k, s in sorted(shapes.items())
        }
        drop = (1,) if quick else tuple(range(12, 18))
    else:
        from shrinkjax.io.gguf import read_gguf, smollm2_path

        cfg, flat, _ = read_gguf(smollm2_path(), progress=False)
        flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
        drop = tuple(range(12, 18))
    scfg, sflat = drop_layer_params(cfg, flat, drop)
    return cfg, flat, scfg, sflat


def cfg_dict(cfg) -> dict:
    """The fields the torch side needs (plain JSON: no JAX there)."""
    return {
        "vocab_size": cfg.vocab_size,
        "dim": cfg.dim,
        "hidden_dim": cfg.hidden_dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "head_width": cfg.head_width,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_seq_len": cfg.max_seq_len,
        "tie_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias,
    }


def save_weights(path: str, tcfg, tflat, scfg, sflat, fpt: float) -> None:
    """Both models' weights and configs, for the torch side (numpy only)."""
    import numpy as np

    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = {"teacher": cfg_dict(tcfg), "student": cfg_dict(scfg), "flops_per_token": fpt}
    arrays = {f"t/{k}": v for k, v in tflat.items()} | {f"s/{k}": v for k, v in sflat.items()}
    tmp = path + ".tmp.npz"
    np.savez(tmp, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    os.replace(tmp, path)


def batch_tokens(a, vocab: int):
    import numpy as np

    rng = np.random.default_rng(1)
    return rng.integers(0, vocab, (a.batch, a.seqlen)).astype(np.int32)


# ----------------------------------------------------------------------------- shrinkjax


def jax_worker(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from shrinkjax.distill import losses
    from shrinkjax.parallel.mesh import make_mesh
    from shrinkjax.train import metrics as metlib
    from shrinkjax.train import step as steplib
    from shrinkjax.train.state import TrainState

    tcfg, tflat, scfg, sflat = pair(a.quick, a.random_init)
    if a.weights:  # the torch side's copy, before anything can fail on the device
        save_weights(
            a.weights,
            tcfg,
            tflat,
            scfg,
            sflat,
            metlib.train_flops_per_token(scfg, a.seqlen, tcfg),
        )
    dtype = "float32" if a.quick else "bfloat16"
    tokens = batch_tokens(a, tcfg.vocab_size)
    batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens, bool)}
    if a.loss == "dynamic":  # as distill_quality.py: all four terms, weights at run time
        batch.update(
            loss_weights=np.asarray([0.5, 0.5, 0.0, 0.0], np.float32),
            tau=np.float32(1.0),
            beta=np.float32(0.5),
        )
    opt = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.0)
    )
    mesh = make_mesh()

    def build(attn):
        s_cfg = scfg.replace(dtype=dtype, attention_impl=attn, max_seq_len=max(a.seqlen, 64))
        t_cfg = tcfg.replace(dtype=dtype, attention_impl=attn, max_seq_len=max(a.seqlen, 64))
        params = {"student": {k: jnp.asarray(v, jnp.float32) for k, v in sflat.items()}, "proj": {}}
        frozen = {
            "teacher": {
                k: jnp.asarray(v, jnp.dtype(dtype) if v.ndim >= 2 else jnp.float32)
                for k, v in tflat.items()
            }
        }
        if a.loss == "ce":
            frozen = None
        from flax import nnx

        from shrinkjax.models.llama import abstract_model

        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt.init(params),
            rng=jax.random.PRNGKey(0),
            frozen=frozen,
            graphdef=nnx.graphdef(abstract_model(s_cfg)),
        )
        lc = {
            "ce": losses.LossConfig(alpha=1.0, divergence="none", chunk=a.chunk),
            "fkl_ce": losses.LossConfig(alpha=0.5, divergence="forward_kl", chunk=a.chunk),
        }.get(a.loss, losses.LossConfig(divergence="forward_kl", chunk=a.chunk))
        scfg_step = steplib.StepConfig(
            loss=lc,
            remat=a.remat,
            scan_layers=a.scan,
            low_precision_backward=a.bf16_backward,
        )
        fn = steplib.make_train_step(
            s_cfg, opt, scfg_step, teacher_cfg=None if a.loss == "ce" else t_cfg
        )
        step, ssh, bsh = steplib.jit_train_step(fn, mesh, state, batch)
        state = jax.device_put(state, ssh)
        b = jax.device_put(batch, bsh)
        t = time.perf_counter()
        compiled = step.lower(state, b).compile()
        return compiled, state, b, s_cfg, t_cfg, time.perf_counter() - t

    attn = a.attention
    try:
        step, state, b, s_cfg, t_cfg, compile_s = build(attn)
    except Exception as e:  # noqa: BLE001
        if attn == "einsum":
            raise
        print(
            f"[jax] attention {attn} failed to compile ({type(e).__name__}: "
            f"{str(e)[:300]}); using einsum",
            flush=True,
        )
        attn = "einsum"
        step, state, b, s_cfg, t_cfg, compile_s = build(attn)
    first = None
    for _ in range(a.warmup):
        state, m = step(state, b)
        first = first if first is not None else float(m["loss"])
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(a.steps):
        state, m = step(state, b)
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t
    if a.profile:
        with jax.profiler.trace(a.profile, create_perfetto_trace=True):
            for _ in range(3):
                state, m = step(state, b)
            jax.block_until_ready((state, m))
    tok_s = a.batch * a.seqlen * a.steps / dt
    fpt = metlib.train_flops_per_token(s_cfg, a.seqlen, None if a.loss == "ce" else t_cfg)
    return {
        "tokens_per_s": tok_s,
        "ms_per_step": 1000 * dt / a.steps,
        "mfu": metlib.mfu(tok_s, fpt),
        "flops_per_token": fpt,
        "attention": attn,
        "loss": a.loss,
        "chunk": a.chunk,
        "scan_layers": a.scan,
        "remat": a.remat,
        "backward": "bf16 (dispatch.mixed_matmul)" if a.bf16_backward else "f32 autodiff",
        "compile_seconds": compile_s,
        "first_loss": first,
        "last_loss": float(m["loss"]),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }


# ----------------------------------------------------------------------------- torch


def torch_worker(a, mode: str) -> dict:
    """``mode`` = ``eager`` or ``compile``; weights from ``a.weights`` (no JAX imported)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers

    with np.load(a.weights) as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
        tflat = {k[2:]: z[k] for k in z.files if k.startswith("t/")}
        sflat = {k[2:]: z[k] for k in z.files if k.startswith("s/")}
    tcfg, scfg = meta["teacher"], meta["student"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_float32_matmul_precision("high")  # TF32 for any f32 matmul, as XLA's default
    amp = torch.bfloat16 if dev == "cuda" else torch.float32

    def hf_model(cfg, flat, dtype):
        hc = transformers.LlamaConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["dim"],
            intermediate_size=cfg["hidden_dim"],
            num_hidden_layers=cfg["n_layers"],
            num_attention_heads=cfg["n_heads"],
            num_key_value_heads=cfg["n_kv_heads"],
            head_dim=cfg["head_width"],
            rms_norm_eps=cfg["norm_eps"],
            rope_theta=cfg["rope_theta"],
            max_position_embeddings=max(cfg["max_seq_len"], a.seqlen),
            tie_word_embeddings=cfg["tie_embeddings"],
            attention_bias=cfg["attention_bias"],
        )
        hc._attn_implementation = "sdpa"
        model = transformers.LlamaForCausalLM(hc)
        sd = {
            "model.embed_tokens.weight": flat["embed.embedding"],
            "model.norm.weight": flat["norm.scale"],
        }
        names = {
            "attn.q_proj": "self_attn.q_proj",
            "attn.k_proj": "self_attn.k_proj",
            "attn.v_proj": "self_attn.v_proj",
            "attn.o_proj": "self_attn.o_proj",
            "mlp.gate_proj": "mlp.gate_proj",
            "mlp.up_proj": "mlp.up_proj",
            "mlp.down_proj": "mlp.down_proj",
        }
        for i in range(cfg["n_layers"]):
            for ours, theirs in names.items():
                sd[f"model.layers.{i}.{theirs}.weight"] = flat[f"layers.{i}.{ours}.kernel"].T
            sd[f"model.layers.{i}.input_layernorm.weight"] = flat[f"layers.{i}.attn_norm.scale"]
            sd[f"model.layers.{i}.post_attention_layernorm.weight"] = flat[
                f"layers.{i}.mlp_norm.scale"
            ]
        if not cfg["tie_embeddings"]:
            sd["lm_head.weight"] = flat["lm_head.kernel"].T
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [
            m
            for m in missing
            if not (cfg["tie_embeddings"] and m == "lm_head.weight") and "rotary" not in m
        ]
        if missing or unexpected:
            raise RuntimeError(
                f"state dict mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        return model.to(dev, dtype)

    teacher = hf_model(tcfg, tflat, amp).eval().requires_grad_(False)
    student = hf_model(scfg, sflat, torch.float32).train()
    opt = torch.optim.AdamW(
        student.parameters(),
        lr=1e-4,
        betas=(0.9, 0.95),
        weight_decay=0.0,
        **({"fused": True} if dev == "cuda" else {}),
    )
    tokens = torch.from_numpy(batch_tokens(a, tcfg["vocab_size"]).astype(np.int64)).to(dev)

    def loss_fn(tokens):
        with torch.no_grad(), torch.autocast(dev, amp, enabled=dev == "cuda"):
            t_logits = teacher(tokens).logits
        with torch.autocast(dev, amp, enabled=dev == "cuda"):
            s_logits = student(tokens).logits
        lt = F.log_softmax(t_logits[:, :-1].float(), -1)
        ls = F.log_softmax(s_logits[:, :-1].float(), -1)
        return (lt.exp() * (lt - ls)).sum(-1).mean()

    fn = torch.compile(loss_fn) if mode == "compile" else loss_fn

    def step():
        loss = fn(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t = time.perf_counter()
    first = float(step())  # compiles in "compile" mode
    compile_s = time.perf_counter() - t
    for _ in range(max(a.warmup - 1, 0)):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync()
    dt = time.perf_counter() - t
    tok_s = a.batch * a.seqlen * a.steps / dt
    return {
        "tokens_per_s": tok_s,
        "ms_per_step": 1000 * dt / a.steps,
        "mode": "torch.compile" if mode == "compile" else "eager",
        "first_step_seconds": compile_s,
        "first_loss": first,
        "last_loss": float(loss),
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "flops_per_token": meta["flops_per_token"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# ----------------------------------------------------------------------------- driver


def run_worker(a, kind: str, timeout: float, python: str, env: dict) -> dict:
    """Run one side in a subprocess (own process group, killed whole at the timeout);
    its result dict, or {"status": why it has none}."""
    out = os.path.join(a.workdir, f"result_{kind}.json")
    if os.path.exists(out):
        os.remove(out)
    if timeout < 5:
        return {"status": f"not run: {timeout:.0f}s of the budget left"}
    argv = [python, os.path.abspath(__file__), "--worker", kind, "--worker_out", out]
    argv += ["--out", a.out]
    if kind != "jax" or not a.skip_torch:  # the shrinkjax side writes it, torch reads it
        argv += ["--weights", os.path.join(a.workdir, "weights.npz")]
    for k in ("seqlen", "batch", "steps", "warmup", "chunk", "attention", "remat", "loss"):
        argv += [f"--{k}", str(getattr(a, k))]
    argv += [
        f
        for f, on in (
            ("--quick", a.quick),
            ("--scan", a.scan),
            ("--random_init", a.random_init),
            ("--bf16_backward", a.bf16_backward),
        )
        if on
    ]
    if a.profile and kind == "jax":
        argv += ["--profile", a.profile]
    print(f"--- {kind} (timeout {timeout:.0f}s)", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its children (compile workers)
        proc.wait()
        what = "compile timed out" if kind == "torch_compile" else "timed out"
        print(f"{kind}: {what} after {timeout:.0f}s", flush=True)
        return {"status": f"{what} after {timeout:.0f}s"}
    wall = time.perf_counter() - t
    if rc != 0 or not os.path.exists(out):
        print(f"{kind} worker failed (exit {rc})", flush=True)
        return {"status": f"failed (exit {rc})", "wall_seconds": wall}
    with open(out) as f:
        res = json.load(f)
    os.remove(out)
    res.update(status="ok", wall_seconds=wall)
    return res


def main(argv=None):
    t_start = time.perf_counter()
    a = parse(argv)
    if a.worker:
        res = jax_worker(a) if a.worker == "jax" else torch_worker(a, a.worker.split("_")[1])
        with open(a.worker_out, "w") as f:
            json.dump(res, f)
        return res
    env0 = dict(os.environ)  # the workers' environment, as given
    # the driver never touches the device: JAX on CPU here (numbers, table)
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        return drive(a, t_start, env0)
    finally:
        os.environ.clear()
        os.environ.update(env0)


def drive(a, t_start: float, env0: dict) -> dict:
    left = lambda: a.budget_s - (time.perf_counter() - t_start)
    a.workdir += "_quick" if a.quick else ""
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.workdir, exist_ok=True)
    weights = os.path.join(a.workdir, "weights.npz")
    if os.path.exists(weights):  # never hand the torch side another run's weights
        os.remove(weights)
    from shrinkjax.eval.report import table
    from shrinkjax.io.files import write_json
    from shrinkjax.train import metrics as metlib

    out = {
        "device": None,
        "seqlen": a.seqlen,
        "batch": a.batch,
        "shrinkjax_tokens_per_s": None,
        "torch_tokens_per_s": None,
        "mfu": None,
        "torch_mfu": None,
        "torch_mode": None,
        "speedup_vs_torch": None,
        "budget_s": a.budget_s,
        "shrinkjax": None,
        "torch": {},
        "setup": "teacher SmolLM2-135M-Instruct (30 layers, bf16, frozen) + student with "
        "layers 12-17 dropped (24 layers, f32 master, bf16 compute), forward KL, "
        "AdamW, clip 1.0"
        + ("; random weights of its shapes (--random_init)" if a.random_init else "")
        if not a.quick
        else "tiny random 4-layer teacher (CPU)",
    }
    path = os.path.join(a.out, "distill_speed.json")

    def save():
        th = [
            (k, v)
            for k, v in out["torch"].items()
            if isinstance(v, dict) and v.get("status") == "ok"
        ]
        if th:
            mode, best = max(th, key=lambda kv: kv[1]["tokens_per_s"])
            out["torch_tokens_per_s"] = best["tokens_per_s"]
            out["torch_mode"] = best["mode"]
            name = best["device"]
            peak = next((v for k, v in metlib.PEAK_BF16 if k in name), None)
            fpt = best.get("flops_per_token")
            out["torch_mfu"] = best["tokens_per_s"] * fpt / peak if peak and fpt else None
            out["device"] = out["device"] or name
        jx = out["shrinkjax"]
        if jx and jx.get("status") == "ok" and out["torch_tokens_per_s"]:
            out["speedup_vs_torch"] = jx["tokens_per_s"] / out["torch_tokens_per_s"]
        out["seconds"] = time.perf_counter() - t_start
        write_json(path, out)

    # 1. shrinkjax (leaves ~90 s for torch eager when the budget is tight)
    reserve = 0.0 if a.skip_torch else min(90.0, a.budget_s / 3)
    jx = run_worker(a, "jax", left() - reserve, sys.executable, env0)
    out["shrinkjax"] = jx
    if jx.get("status") == "ok":
        out.update(device=jx["device"], shrinkjax_tokens_per_s=jx["tokens_per_s"], mfu=jx["mfu"])
    save()
    # 2. torch eager, 3. torch.compile (each its own process: the torch side never imports
    # JAX, and never shares the GPU with it)
    if not a.skip_torch:
        if not os.path.exists(weights):
            out["torch"]["note"] = "no weights from the shrinkjax side"
        else:
            modes = ["eager"] + ([] if a.no_torch_compile else ["compile"])
            for mode in modes:  # eager first: compile gets whatever is left
                r = run_worker(a, f"torch_{mode}", left() - 5.0, a.torch_python, env0)
                out["torch"]["torch.compile" if mode == "compile" else "eager"] = r
                save()
    save()
    rows = []
    if jx.get("status") == "ok":
        rows.append(
            {
                "framework": "shrinkjax",
                "tokens/s": jx["tokens_per_s"],
                "ms/step": jx["ms_per_step"],
                "mfu": jx["mfu"] if jx["mfu"] is not None else "-",
                "mode": f"{jx['attention']}, {jx['loss']}",
                "first loss": jx["first_loss"],
            }
        )
    else:
        rows.append({"framework": "shrinkjax", "tokens/s": jx.get("status")})
    for mode, r in out["torch"].items():
        if not isinstance(r, dict):
            continue
        if r.get("status") == "ok":
            rows.append(
                {
                    "framework": "torch",
                    "tokens/s": r["tokens_per_s"],
                    "ms/step": r["ms_per_step"],
                    "mode": mode,
                    "first loss": r["first_loss"],
                }
            )
        else:
            rows.append({"framework": "torch", "tokens/s": r.get("status"), "mode": mode})
    print(
        table(
            rows,
            title=f"\nlogit-KD step, {a.batch} x {a.seqlen} tokens, {out['device']} "
            f"({out['seconds']:.0f}s of {a.budget_s:.0f}s)",
        )
    )
    if out["speedup_vs_torch"]:
        print(f"shrinkjax / torch ({out['torch_mode']}) = {out['speedup_vs_torch']:.2f}x")
    return out


if __name__ == "__main__":
    main()
