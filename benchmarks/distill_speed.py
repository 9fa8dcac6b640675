"""Throughput of the logit-KD train step: shrinkjax vs the same step written plainly in PyTorch.

Both sides, on the same GPU, same batch of token ids, same weights:

* teacher SmolLM2-135M-Instruct (30 layers, bf16 weights, no grad) forward;
* student = the teacher without layers 12–17 (24 layers), f32 master weights, bf16 compute;
* forward KL(p_T ‖ p_S) at τ = 1 over every position but the last, AdamW, global-norm clip 1.

shrinkjax: the jitted, state-donating ``train_step`` of :mod:`shrinkjax.train.step` (layers in
a ``lax.scan``, cuDNN attention — einsum if cuDNN does not compile —, loss chunked over tokens
from the final hidden states). PyTorch: ``transformers`` ``LlamaForCausalLM`` with SDPA
attention under ``torch.autocast(bfloat16)``, ``torch.compile`` on both models (eager if it
fails), full [B, L, V] logits, ``F.log_softmax`` KL, fused AdamW. Each side runs in its own
subprocess so neither holds GPU memory while the other runs.

GPU:

    python benchmarks/distill_speed.py --out benchmarks/results

CPU smoke test (tiny random model; the torch side only if torch + transformers import):

    python benchmarks/distill_speed.py --quick --out /tmp/ds

Writes ``<out>/distill_speed.json``: {"device", "seqlen", "shrinkjax_tokens_per_s",
"torch_tokens_per_s", "mfu", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--chunk", type=int, default=8192, help="shrinkjax loss chunk (tokens)")
    p.add_argument("--attention", default=None, help="shrinkjax attention: cudnn | einsum")
    p.add_argument("--remat", default="none")
    p.add_argument("--no_torch_compile", action="store_true")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.seqlen = a.seqlen or (64 if q else 2048)
    a.batch = a.batch or (2 if q else 8)
    a.steps = a.steps or (3 if q else 20)
    a.attention = a.attention or ("einsum" if q else "cudnn")
    return a


def pair(quick: bool):
    """(teacher cfg, teacher flat numpy params, student cfg, student flat) — numpy only."""
    import numpy as np

    from shrinkjax.models.surgery import drop_layer_params

    if quick:
        from shrinkjax.models.llama import LlamaConfig

        cfg = LlamaConfig(
            vocab_size=512,
            dim=64,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            hidden_dim=128,
            max_seq_len=256,
        )
        rng = np.random.default_rng(0)
        from shrinkjax.models.llama import abstract_model
        from shrinkjax.models.params import flat_params

        shapes = {k: v.shape for k, v in flat_params(abstract_model(cfg)).items()}
        flat = {
            k: (rng.normal(size=s) * 0.05 if len(s) > 1 else np.ones(s)).astype(np.float32)
            for k, s in shapes.items()
        }
        drop = (1,)
    else:
        from shrinkjax.io.gguf import read_gguf, smollm2_path

        cfg, flat, _ = read_gguf(smollm2_path(), progress=False)
        flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
        drop = tuple(range(12, 18))
    scfg, sflat = drop_layer_params(cfg, flat, drop)
    return cfg, flat, scfg, sflat


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

    tcfg, tflat, scfg, sflat = pair(a.quick)
    dtype = "float32" if a.quick else "bfloat16"
    tokens = batch_tokens(a, tcfg.vocab_size)
    batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens, bool)}
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
        scfg_step = steplib.StepConfig(
            loss=losses.LossConfig(divergence="forward_kl", chunk=a.chunk), remat=a.remat
        )
        fn = steplib.make_train_step(s_cfg, opt, scfg_step, teacher_cfg=t_cfg)
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
    tok_s = a.batch * a.seqlen * a.steps / dt
    fpt = metlib.train_flops_per_token(s_cfg, a.seqlen, t_cfg)
    return {
        "tokens_per_s": tok_s,
        "ms_per_step": 1000 * dt / a.steps,
        "mfu": metlib.mfu(tok_s, fpt),
        "flops_per_token": fpt,
        "attention": attn,
        "compile_seconds": compile_s,
        "first_loss": first,
        "last_loss": float(m["loss"]),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }


# ----------------------------------------------------------------------------- torch


def torch_worker(a) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers

    tcfg, tflat, scfg, sflat = pair(a.quick)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    amp = torch.bfloat16 if dev == "cuda" else torch.float32

    def hf_model(cfg, flat, dtype):
        hc = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.dim,
            intermediate_size=cfg.hidden_dim,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_width,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            max_position_embeddings=max(cfg.max_seq_len, a.seqlen),
            tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=cfg.attention_bias,
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
        for i in range(cfg.n_layers):
            for ours, theirs in names.items():
                sd[f"model.layers.{i}.{theirs}.weight"] = flat[f"layers.{i}.{ours}.kernel"].T
            sd[f"model.layers.{i}.input_layernorm.weight"] = flat[f"layers.{i}.attn_norm.scale"]
            sd[f"model.layers.{i}.post_attention_layernorm.weight"] = flat[
                f"layers.{i}.mlp_norm.scale"
            ]
        if not cfg.tie_embeddings:
            sd["lm_head.weight"] = flat["lm_head.kernel"].T
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [
            m
            for m in missing
            if not (cfg.tie_embeddings and m == "lm_head.weight") and "rotary" not in m
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
    tokens = torch.from_numpy(batch_tokens(a, tcfg.vocab_size).astype(np.int64)).to(dev)

    def loss_fn(tokens):
        with torch.no_grad(), torch.autocast(dev, amp, enabled=dev == "cuda"):
            t_logits = teacher(tokens).logits
        with torch.autocast(dev, amp, enabled=dev == "cuda"):
            s_logits = student(tokens).logits
        lt = F.log_softmax(t_logits[:, :-1].float(), -1)
        ls = F.log_softmax(s_logits[:, :-1].float(), -1)
        return (lt.exp() * (lt - ls)).sum(-1).mean()

    compiled = "eager"
    fn = loss_fn
    if not a.no_torch_compile:
        try:
            fn = torch.compile(loss_fn)
            compiled = "torch.compile"
        except Exception as e:  # noqa: BLE001
            print(f"[torch] torch.compile unavailable ({e}); eager", flush=True)

    def step():
        loss = fn(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t = time.perf_counter()
    try:
        first = float(step())
    except Exception as e:  # noqa: BLE001
        if compiled == "eager":
            raise
        print(
            f"[torch] compiled step failed ({type(e).__name__}: {str(e)[:300]}); eager", flush=True
        )
        fn, compiled = loss_fn, "eager"
        first = float(step())
    compile_s = time.perf_counter() - t
    for _ in range(max(a.warmup - 1, 0)):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync()
    dt = time.perf_counter() - t
    from shrinkjax.train import metrics as metlib

    tok_s = a.batch * a.seqlen * a.steps / dt
    fpt = metlib.train_flops_per_token(scfg, a.seqlen, tcfg)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    peak = next((v for k, v in metlib.PEAK_BF16 if k in name), None)
    return {
        "tokens_per_s": tok_s,
        "ms_per_step": 1000 * dt / a.steps,
        "mfu": tok_s * fpt / peak if peak else None,
        "mode": compiled,
        "compile_seconds": compile_s,
        "first_loss": first,
        "last_loss": float(loss),
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# ----------------------------------------------------------------------------- driver


def run_worker(a, kind: str, env_extra: dict) -> dict | None:
    os.makedirs(a.out, exist_ok=True)
    out = os.path.join(a.out, f".distill_speed_{kind}.json")
    if os.path.exists(out):
        os.remove(out)
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--worker_out",
        out,
        "--out",
        a.out,
        "--seqlen",
        str(a.seqlen),
        "--batch",
        str(a.batch),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--chunk",
        str(a.chunk),
        "--attention",
        a.attention,
        "--remat",
        a.remat,
    ]
    if a.quick:
        argv.append("--quick")
    if a.no_torch_compile:
        argv.append("--no_torch_compile")
    print(f"--- {kind} worker", flush=True)
    t = time.perf_counter()
    r = subprocess.run(argv, env={**os.environ, **env_extra}, cwd=ROOT)
    if r.returncode != 0 or not os.path.exists(out):
        print(f"{kind} worker failed (exit {r.returncode})", flush=True)
        return None
    with open(out) as f:
        res = json.load(f)
    os.remove(out)
    res["wall_seconds"] = time.perf_counter() - t
    return res


def main(argv=None):
    a = parse(argv)
    if a.worker:
        res = jax_worker(a) if a.worker == "jax" else torch_worker(a)
        with open(a.worker_out, "w") as f:
            json.dump(res, f)
        return res
    from tqdm.auto import tqdm

    from shrinkjax.eval.report import table
    from shrinkjax.io.files import write_json

    results = {}
    kinds = ["jax"] + ([] if a.skip_torch else ["torch"])
    for kind in tqdm(kinds, desc="distill speed", unit="framework"):
        # the torch side must never touch the GPU through JAX (and vice versa)
        env = {"JAX_PLATFORMS": "cpu"} if kind == "torch" else {}
        results[kind] = run_worker(a, kind, env)
    jx, th = results.get("jax"), results.get("torch")
    if jx is None:
        raise SystemExit("the shrinkjax worker failed")
    out = {
        "device": jx["device"],
        "seqlen": a.seqlen,
        "batch": a.batch,
        "shrinkjax_tokens_per_s": jx["tokens_per_s"],
        "torch_tokens_per_s": th["tokens_per_s"] if th else None,
        "mfu": jx["mfu"],
        "torch_mfu": th["mfu"] if th else None,
        "speedup_vs_torch": jx["tokens_per_s"] / th["tokens_per_s"] if th else None,
        "shrinkjax": jx,
        "torch": th,
        "setup": "teacher SmolLM2-135M-Instruct (30 layers, bf16, frozen) + student with "
        "layers 12-17 dropped (24 layers, f32 master, bf16 compute), forward KL, "
        "AdamW, clip 1.0"
        if not a.quick
        else "tiny random 4-layer teacher (CPU)",
    }
    if th is None and not a.skip_torch:
        out["torch_note"] = "the PyTorch worker failed or torch/transformers are not installed"
    write_json(os.path.join(a.out, "distill_speed.json"), out)
    rows = [
        {
            "framework": "shrinkjax",
            "tokens/s": jx["tokens_per_s"],
            "ms/step": jx["ms_per_step"],
            "mfu": jx["mfu"] if jx["mfu"] is not None else "-",
            "mode": jx["attention"],
            "first loss": jx["first_loss"],
        }
    ]
    if th:
        rows.append(
            {
                "framework": "torch",
                "tokens/s": th["tokens_per_s"],
                "ms/step": th["ms_per_step"],
                "mfu": th["mfu"] if th["mfu"] is not None else "-",
                "mode": th["mode"],
                "first loss": th["first_loss"],
            }
        )
    print(table(rows, title=f"\nlogit-KD step, {a.batch} x {a.seqlen} tokens, {jx['device']}"))
    if th:
        print(f"shrinkjax / torch = {out['speedup_vs_torch']:.2f}x")
    return out


if __name__ == "__main__":
    main()
