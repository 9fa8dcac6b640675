"""Distillation quality: heal SmolLM2-135M-Instruct with layers 12–17 dropped, four ways.

Teacher: SmolLM2-135M-Instruct (30 layers). Student: the teacher without its six middle
layers 12–17 (24 layers). Arms, each from the same initial student, on the same data stream,
for the same number of training tokens (``--tokens``):

* ``ce``        cross entropy on the data only (no teacher signal)
* ``fkl``       forward KL(p_T ‖ p_S) at the loss temperature ``--tau`` (logit KD)
* ``rkl``       reverse KL(p_S ‖ p_T)
* ``gkd``       on-policy GKD: λ = 0.5 of the steps on the student's own samples
                (a 384-token data prompt continued by 128 sampled tokens; only those are
                scored), JSD(β = 0.5) on every step

Data: WikiText-2 *validation* text (never the test split) plus teacher-generated text:
prompts of 64 tokens cut from the validation text, continued by the teacher (batched jitted
KV-cache sampling at sampling temperature 1) to 512-token sequences, as many as the budget
needs, so no arm sees a token twice. Evaluation: perplexity on WikiText-2-raw *test*
(non-overlapping 2048-token windows, f32) and KL(p_T ‖ p_S) per token on the same windows,
before and after.

One compiled train step serves all arms (the loss mix is a run-time input), bf16 compute,
cuDNN attention (falls back to einsum if cuDNN fails to compile), layers in a ``lax.scan``.

GPU (one H100, ~6–8 minutes):

    python benchmarks/distill_quality.py --out benchmarks/results

CPU smoke test (tiny random teacher, seconds):

    python benchmarks/distill_quality.py --quick --out /tmp/dq

Writes ``<out>/distill_quality.json`` ({"teacher_ppl", "student_init_ppl", "tokens",
"arms": [{"name", "ppl", "kl", ...}], ...}) and ``<out>/distill_quality.md``, and replaces
the distill-quality section of ``--results_md`` (default ``benchmarks/RESULTS.md`` unless
``--quick``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

ARMS = {
    # name: (loss weights over (ce, fkl, rkl, jsd), on-policy fraction λ)
    "ce": ((1.0, 0.0, 0.0, 0.0), 0.0),
    "fkl": ((0.0, 1.0, 0.0, 0.0), 0.0),
    "rkl": ((0.0, 0.0, 1.0, 0.0), 0.0),
    "gkd": ((0.0, 0.0, 0.0, 1.0), 0.5),
}
MD_BEGIN, MD_END = "<!-- distill_quality:begin -->", "<!-- distill_quality:end -->"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--results_md", default=None, help="RESULTS.md whose section to replace")
    p.add_argument("--quick", action="store_true", help="CPU smoke run with tiny numbers")
    p.add_argument(
        "--workdir",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "shrinkjax_distill_quality"),
        help="scratch: teacher-generated data (reused when it matches), logs, token caches",
    )
    p.add_argument(
        "--tokens",
        type=float,
        default=None,
        help="training tokens per arm (default 4e6 GPU, 8192 quick)",
    )
    p.add_argument("--arms", default="ce,fkl,rkl,gkd")
    p.add_argument("--seqlen", type=int, default=None, help="training sequence length")
    p.add_argument("--batch", type=int, default=None, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--tau", type=float, default=1.0, help="LOSS temperature of fkl/rkl/gkd")
    p.add_argument("--beta", type=float, default=0.5, help="JSD(beta) of the gkd arm")
    p.add_argument("--lam", type=float, default=0.5, help="on-policy fraction of the gkd arm")
    p.add_argument("--prompt_len", type=int, default=None)
    p.add_argument("--gen_batch", type=int, default=None, help="teacher generation batch")
    p.add_argument(
        "--onpolicy_new",
        type=int,
        default=None,
        help="tokens the student samples per on-policy sequence (the rest of the "
        "sequence is a data prompt; only sampled tokens are scored)",
    )
    p.add_argument(
        "--real_windows", type=int, default=None, help="cap on real-text training windows (0 = all)"
    )
    p.add_argument("--eval_windows", type=int, default=None, help="0 = the whole test set")
    p.add_argument("--attention", default=None, help="cudnn | einsum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data",
        default="",
        help="shared data dir (default: $SHRINKJAX_DATA, else ../shared/data beside the "
        "checkout, else shared/data inside it)",
    )
    a = p.parse_args(argv)
    cands = [
        a.data,
        os.environ.get("SHRINKJAX_DATA", ""),
        os.path.join(ROOT, "..", "shared", "data"),
        os.path.join(ROOT, "shared", "data"),
    ]
    found = [
        c for c in cands if c and os.path.isfile(os.path.join(c, "wikitext-2-raw", "test.txt"))
    ]
    if not found:
        p.error(f"no shared data (wikitext-2-raw/test.txt) in any of {[c for c in cands if c]}")
    a.data = found[0]
    q = a.quick
    a.tokens = int(a.tokens or (8192 if q else 4e6))
    a.seqlen = a.seqlen or (32 if q else 512)
    a.batch = a.batch or (4 if q else 32)
    a.prompt_len = a.prompt_len or (8 if q else 64)
    a.gen_batch = a.gen_batch or (16 if q else 512)
    a.onpolicy_new = a.onpolicy_new or (16 if q else 128)
    a.real_windows = (16 if q else 0) if a.real_windows is None else a.real_windows
    a.eval_windows = (4 if q else 0) if a.eval_windows is None else a.eval_windows
    a.attention = a.attention or ("einsum" if q else "cudnn")
    if a.results_md is None and not q:
        a.results_md = os.path.join(HERE, "RESULTS.md")
    return a


def bench_config(a, steps: int):
    from configs.distill import common

    c = common.distill_base("logit")
    c.progress = True
    c.train.update(
        steps=steps,
        batch_size=a.batch,
        seqlen=a.seqlen,
        lr=a.lr,
        warmup_steps=max(1, steps // 10),
        schedule="cosine",
        min_lr_ratio=0.1,
        weight_decay=0.0,
        clip_norm=1.0,
        compute_dtype="float32" if a.quick else "bfloat16",
        attention_impl=a.attention,
        scan_layers=True,
        remat="none",
        chunk_tokens=64 if a.quick else 8192,
        checkpoint_every=-1,
        eval_every=0,
        eval_windows=0,
        log_every=max(1, steps // 20),
        tensorboard=False,
        seed=a.seed,
    )
    c.distill.update(tau=a.tau, beta=a.beta)
    c.lock()
    return c


def load_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def main(argv=None):
    a = parse(argv)
    import jax
    import numpy as np

    from shrinkjax.data.windows import tokenize, windows
    from shrinkjax.distill.logit import Distiller
    from shrinkjax.distill.onpolicy import OnPolicyBatcher
    from shrinkjax.distill.sequence import generate_dataset, sample_prompts
    from shrinkjax.eval.report import table
    from shrinkjax.io.load import load_model
    from shrinkjax.models.generate import Sampling
    from shrinkjax.models.surgery import drop_layers
    from shrinkjax.train import metrics as metlib
    from shrinkjax.train import state as statelib
    from shrinkjax.train import step as steplib
    from shrinkjax.train.loop import StepBatcher

    t_start = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    # teacher data, logs, token caches (large: kept out of --out)
    work = a.workdir + ("_quick" if a.quick else "")
    cache = os.path.join(work, "cache")
    arms = [x for x in a.arms.split(",") if x]
    for x in arms:
        if x not in ARMS:
            raise SystemExit(f"unknown arm {x!r}; known {list(ARMS)}")
    print(f"devices: {jax.devices()}", flush=True)

    # ---------------------------------------------------------------- models
    if a.quick:
        teacher_spec, drop = os.path.join(ROOT, "tests", "golden", "tiny_llama"), (1,)
    else:
        teacher_spec, drop = "smollm2", tuple(range(12, 18))
    loaded = load_model(teacher_spec, progress=True)
    teacher, tok = loaded.model, loaded.tokenizer
    student0 = drop_layers(teacher, drop)
    print(
        f"teacher {loaded.name}: {teacher.cfg.n_layers} layers; student: "
        f"{student0.cfg.n_layers} layers (dropped {drop[0]}..{drop[-1]})",
        flush=True,
    )

    # ---------------------------------------------------------------- data
    eval_ids = tokenize(
        load_text(os.path.join(a.data, "wikitext-2-raw", "test.txt")), tok, cache_dir=cache
    )
    eval_len = 64 if a.quick else 2048
    eval_toks, _ = windows(eval_ids, eval_len, max_windows=a.eval_windows)
    train_ids = tokenize(
        load_text(os.path.join(a.data, "wikitext-2-tokenized", "valid.txt")), tok, cache_dir=cache
    )
    real, _ = windows(train_ids, a.seqlen, max_windows=a.real_windows)
    steps = max(1, a.tokens // (a.batch * a.seqlen))
    tokens = steps * a.batch * a.seqlen
    need_windows = steps * a.batch
    n_gen = max(0, need_windows - len(real))
    print(
        f"budget: {tokens:,} tokens per arm = {steps} steps x {a.batch} x {a.seqlen}; "
        f"{len(real)} real windows + {n_gen} teacher-generated",
        flush=True,
    )
    t0 = time.perf_counter()
    if n_gen:
        prompts = sample_prompts(train_ids, n_gen, a.prompt_len, a.seed)
        tflat = statelib.frozen_params(teacher, "float32" if a.quick else "bfloat16")
        from shrinkjax.distill.sequence import sampling_model

        gen_model = sampling_model(teacher, "float32" if a.quick else "bfloat16", flat=tflat)
        gen_toks, gen_mask = generate_dataset(
            gen_model,
            prompts,
            os.path.join(work, "teacher_data"),
            max_new_tokens=a.seqlen - a.prompt_len,
            sampling=Sampling(temperature=1.0),
            batch_size=a.gen_batch,
            seed=a.seed,
            eos_id=tok.eos_id,
            train_on_prompt=True,
            extra_meta={"teacher": loaded.name},
        )
        del gen_model, tflat
        all_toks = np.concatenate([real, gen_toks])
        all_mask = np.concatenate([np.ones_like(real, bool), gen_mask])
    else:
        all_toks, all_mask = real[:need_windows], np.ones_like(real[:need_windows], bool)
    t_gen = time.perf_counter() - t0
    gen_tokens = int(n_gen * a.seqlen)
    print(f"teacher data: {n_gen} sequences ({gen_tokens:,} tokens) in {t_gen:.1f}s", flush=True)

    # ---------------------------------------------------------------- trainer (one compile)
    c = bench_config(a, steps)

    def make(attn):
        cc = c
        if attn != c.train.attention_impl:
            cc = bench_config(argparse.Namespace(**{**vars(a), "attention": attn}), steps)
        return Distiller(teacher, student0, cc, os.path.join(work, "train"), dynamic_loss=True)

    dist = make(a.attention)
    fresh = statelib.create_train_state(
        student0,
        dist.optimizer,
        seed=a.seed,
        compute_dtype=c.train.compute_dtype,
        attention_impl=dist.student_cfg.attention_impl,
        teacher=teacher,
    )
    base = StepBatcher(all_toks, all_mask, a.batch, a.seed)
    try:  # cuDNN attention must compile; else einsum
        probe = dict(
            base(0),
            loss_weights=np.zeros(4, np.float32),
            tau=np.float32(a.tau),
            beta=np.float32(a.beta),
        )
        dist.step_fn.lower(dist.state, jax.device_put(probe, dist.batch_sh)).compile()
    except Exception as e:  # noqa: BLE001
        if a.attention == "einsum":
            raise
        print(
            f"attention_impl={a.attention} failed to compile ({type(e).__name__}: "
            f"{str(e)[:300]}); falling back to einsum",
            flush=True,
        )
        a.attention = "einsum"
        dist = make("einsum")
        fresh = statelib.create_train_state(
            student0,
            dist.optimizer,
            seed=a.seed,
            compute_dtype=c.train.compute_dtype,
            attention_impl="einsum",
            teacher=teacher,
        )

    # f32 evaluation (einsum attention): student ppl, teacher ppl, KL(p_T||p_S)
    eval_s = steplib.Forward(student0.cfg.replace(dtype="float32", attention_impl="einsum"))
    eval_t = steplib.Forward(teacher.cfg.replace(dtype="float32", attention_impl="einsum"))
    evaluator = metlib.Evaluator(eval_s, eval_t, chunk=4096)
    t_flat32 = jax.device_put(statelib.frozen_params(teacher, "float32"))
    eval_bs = 4 if not a.quick else 2

    def evaluate(student_flat, desc):
        t = time.perf_counter()
        r = evaluator(student_flat, eval_toks, eval_bs, t_flat32, progress=True, desc=desc)
        r["seconds"] = time.perf_counter() - t
        return r

    init = evaluate(statelib.frozen_params(student0, "float32"), "eval init")
    print(
        f"teacher ppl {init['teacher_ppl']:.3f}; student init ppl {init['ppl']:.3f}, "
        f"KL {init['kl']:.4f} ({init['tokens']:,} eval tokens, {init['seconds']:.1f}s)",
        flush=True,
    )

    result = {
        "teacher": loaded.name,
        "device": str(jax.devices()[0].device_kind),
        "teacher_ppl": init["teacher_ppl"],
        "student_init_ppl": init["ppl"],
        "student_init_kl": init["kl"],
        "tokens": tokens,
        "steps": steps,
        "batch": a.batch,
        "seqlen": a.seqlen,
        "lr": a.lr,
        "tau": a.tau,
        "beta": a.beta,
        "lam": a.lam,
        "attention": a.attention,
        "compute_dtype": c.train.compute_dtype,
        "dropped_layers": list(drop),
        "eval": f"wikitext-2-raw test, {len(eval_toks)} x "
        f"{eval_len} windows, {init['tokens']} tokens, f32",
        "train_data": f"{len(real)} wikitext-2 valid windows + {n_gen} teacher-generated "
        f"sequences (prompt {a.prompt_len} + {a.seqlen - a.prompt_len} sampled at T=1)",
        "teacher_gen_seconds": t_gen,
        "arms": [],
    }
    gap = math.log(init["ppl"]) - math.log(init["teacher_ppl"])

    def write():
        from shrinkjax.io.files import write_json, write_text

        write_json(os.path.join(a.out, "distill_quality.json"), result)
        md = markdown(result)
        write_text(os.path.join(a.out, "distill_quality.md"), md)
        if a.results_md:
            update_section(a.results_md, md)

    for name in arms:
        weights, lam = ARMS[name]
        lam = a.lam if lam else 0.0
        # a copy: the step donates its state, and `fresh` must survive for the next arm
        dist.state = jax.device_put(jax.tree.map(lambda x: x.copy(), fresh), dist.state_sh)
        dist.logger.close()
        dist.logger = metlib.MetricsLogger(os.path.join(work, name), tensorboard=False)
        w = np.asarray(weights, np.float32)
        dyn = dict(loss_weights=w, tau=np.float32(a.tau), beta=np.float32(a.beta))
        if lam:
            op_prompt = a.seqlen - a.onpolicy_new
            op = OnPolicyBatcher(
                base,
                sample_prompts(train_ids, 4096, op_prompt, a.seed + 1),
                lam=lam,
                max_new_tokens=a.onpolicy_new,
                sampling=Sampling(temperature=1.0),
                seed=a.seed,
                student_cfg=dist.student_cfg,
                eos_id=tok.eos_id,
            )
            batch_fn = lambda s, st, op=op: dict(op(s, st), **dyn)
        else:
            batch_fn = lambda s, st: dict(base(s), **dyn)
        t = time.perf_counter()
        summ = dist.fit(batch_fn, steps=steps, desc=f"arm {name}")
        train_s = time.perf_counter() - t
        ev = evaluate(dist.state.params["student"], f"eval {name}")
        rec = (math.log(init["ppl"]) - math.log(ev["ppl"])) / gap if gap > 0 else float("nan")
        arm = {
            "name": name,
            "ppl": ev["ppl"],
            "kl": ev["kl"],
            "nll": ev["nll"],
            "gap_recovered": rec,
            "train_seconds": train_s,
            "tokens_per_s": summ.get("tokens_per_s"),
            "final_train_loss": summ["final_loss"],
        }
        if lam:
            arm.update(
                onpolicy_steps=op.onpolicy_steps,
                lam=lam,
                beta=a.beta,
                onpolicy_sampled_tokens=a.onpolicy_new,
                note=f"on-policy steps: prompt {op_prompt} data tokens + "
                f"{a.onpolicy_new} student-sampled tokens, only the sampled "
                "ones scored",
            )
        result["arms"].append(arm)
        print(
            f"arm {name}: ppl {ev['ppl']:.3f}, KL {ev['kl']:.4f}, gap recovered "
            f"{100 * rec:.1f}% ({train_s:.1f}s)",
            flush=True,
        )
        write()
    dist.close()
    ce = next((x for x in result["arms"] if x["name"] == "ce"), None)
    kd = [x for x in result["arms"] if x["name"] != "ce"]
    result["targets"] = {
        "every_kd_arm_beats_ce": (all(x["ppl"] < ce["ppl"] for x in kd) if ce and kd else None),
        "best_gap_recovered": max((x["gap_recovered"] for x in result["arms"]), default=None),
        "best_recovers_75pct": max((x["gap_recovered"] for x in result["arms"]), default=0.0)
        >= 0.75,
    }
    result["total_seconds"] = time.perf_counter() - t_start
    write()
    rows = [
        {"arm": "teacher", "ppl": result["teacher_ppl"], "kl": 0.0, "recovered": 1.0},
        {
            "arm": "student init",
            "ppl": result["student_init_ppl"],
            "kl": result["student_init_kl"],
            "recovered": 0.0,
        },
    ]
    rows += [
        {
            "arm": x["name"],
            "ppl": x["ppl"],
            "kl": x["kl"],
            "recovered": x["gap_recovered"],
            "train_s": x["train_seconds"],
        }
        for x in result["arms"]
    ]
    print(
        table(
            rows,
            title=f"\ndistill quality ({tokens:,} tokens/arm, "
            f"{result['device']}, total {result['total_seconds']:.0f}s)",
        )
    )
    print(f"targets: {result['targets']}")
    return result


def markdown(r: dict) -> str:
    lines = [
        MD_BEGIN,
        "## Distillation quality (`benchmarks/distill_quality.py`)",
        "",
        f"Teacher {r['teacher']}; student = teacher without layers "
        f"{r['dropped_layers'][0]}–{r['dropped_layers'][-1]}. Each arm trains "
        f"**{r['tokens']:,} tokens** ({r['steps']} steps × {r['batch']} × {r['seqlen']}), "
        f"lr {r['lr']}, {r['compute_dtype']}, attention {r['attention']}, on {r['device']}. "
        f"Data: {r['train_data']}. Eval: {r['eval']}.",
        "",
        "| model | wikitext-2 ppl | KL(p_T‖p_S) | log-ppl gap recovered |",
        "|---|---|---|---|",
        f"| teacher | {r['teacher_ppl']:.2f} | 0 | — |",
        f"| student init | {r['student_init_ppl']:.2f} | {r['student_init_kl']:.4f} | 0% |",
    ]
    for x in r["arms"]:
        lines.append(
            f"| {x['name']} | {x['ppl']:.2f} | {x['kl']:.4f} | {100 * x['gap_recovered']:.1f}% |"
        )
    if "targets" in r:
        lines += ["", f"Targets: {r['targets']}"]
    lines.append(MD_END)
    return "\n".join(lines) + "\n"


def update_section(path: str, md: str) -> None:
    """Replace (or append) this benchmark's section of a RESULTS.md."""
    from shrinkjax.io.files import write_text

    old = open(path).read() if os.path.isfile(path) else "# Benchmark results\n"
    if MD_BEGIN in old and MD_END in old:
        head, rest = old.split(MD_BEGIN, 1)
        tail = rest.split(MD_END, 1)[1].lstrip("\n")
        new = head + md + tail
    else:
        new = old.rstrip("\n") + "\n\n" + md
    write_text(path, new)


if __name__ == "__main__":
    main()
