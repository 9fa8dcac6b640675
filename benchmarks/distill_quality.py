"""Distillation quality: heal SmolLM2-135M-Instruct with layers 12–17 dropped, four ways.

Teacher: SmolLM2-135M-Instruct (30 layers). Student: the teacher without its six middle
layers 12–17 (24 layers). Arms, each from the same initial student, on the same data stream,
for the same number of training tokens (``--tokens``):

* ``ce``        hard-label cross entropy on the data only (no teacher signal)
* ``fkl``       α · CE + (1 − α) · forward KL(p_T ‖ p_S) at the loss temperature ``--tau``
* ``rkl``       α · CE + (1 − α) · reverse KL(p_S ‖ p_T)
* ``gkd``       on-policy GKD: λ = 0.5 of the steps on the student's own samples, JSD(β = 0.5)
                on every step, α · CE + (1 − α) · JSD; cross entropy never on the student's
                samples (they are not labels: the batch's ``ce_mask`` leaves them out). By
                default (``--gkd_prompts batch --gkd_score_prompt``) an on-policy step keeps
                the first 448 tokens of the same data batch the other arms train on that step
                and the student continues them with ``--onpolicy_new`` = 64 sampled tokens;
                the data part is scored as in an off-policy step (CE + JSD), the sampled part
                with JSD only, so every arm scores about the same number of positions.
                ``--gkd_prompts corpus --no_gkd_score_prompt --no_jsd_normalize
                --onpolicy_new 128`` is the first protocol: fresh 384-token validation prompts,
                context only (only the 128 sampled tokens scored).
                ``--jsd_normalize`` (default on) divides JSD(β) by β(1 − β) = 1/4: near
                p_S = p_T it then has a KL's curvature, so the α blend weighs it like the
                fkl/rkl arms' divergences (unnormalised it carries a quarter of their gradient)

``--alpha`` (default 0.5) blends the divergence with hard-label cross entropy (Hinton et al.,
2015). By default one compiled train step serves all arms: the loss mix is a run-time input
(weights over (ce, fkl, rkl, jsd), see ``arm_weights``), so every step computes all four terms
on [tokens, vocab] logits. ``--static_loss`` compiles a step per off-policy arm that computes
only its own terms (``ce`` then runs no teacher forward) — same math, less work per step, one
compile per arm (measure with ``benchmarks/distill_speed.py --loss dynamic|fkl_ce|ce``).

Data: WikiText-2 *validation* text (never the test split) plus teacher-generated text:
prompts of 64 tokens cut from the validation text, continued by the teacher (batched jitted
KV-cache sampling at sampling temperature 1) to 512-token sequences, as many as the budget
needs: every arm sees each sequence once. By default the prompts are context only
(``--train_on_prompt`` scores them too: at 20M tokens that re-trains every validation token
~10 times as hard labels). Evaluation: perplexity on WikiText-2-raw *test* (all 148
non-overlapping 2048-token windows by default, f32) and KL(p_T ‖ p_S) per token, before and
after.

Token budget: ``tokens`` = sequence positions trained per arm (steps × batch × seqlen), equal
for every arm (each is one student forward/backward). Per arm,
``scored_tokens`` counts the positions whose next-token prediction is in the loss (unscored:
prompts unless ``--train_on_prompt``, each window's last position, and with
``--no_gkd_score_prompt`` the data prompt of on-policy steps).

Resumable across calls of limited length (a 10-minute device slot cannot hold 4 × 20M tokens):

* the teacher data is cached in ``--workdir`` (reused whatever ``--arms``; an interrupted
  generation resumes from its shards);
* ``<out>/distill_quality.json`` is merged: arms already there with the same protocol (tokens,
  seqlen, batch, lr, schedule, teacher data, eval set, and the arm's own α/τ/β/λ) are kept
  and not re-run (``--redo`` re-runs them), new ones are added, the targets recomputed over
  all arms; arms of another protocol are dropped (the old file is kept as ``.prev.json``);
* ``--budget_s`` (wall seconds for this call): an arm whose estimated time (measured rates of
  this or earlier calls, else ``--est_tok_s``) would overrun is skipped (recorded), so the
  call always writes its JSON and prints its table in time; re-run the same command for the
  rest;
* ``--gen_only``: only generate/cache the teacher data and evaluate the initial student.

GPU (one H100; the same command repeated until every arm is in the JSON: ~3 calls of
≤ 9.5 minutes at 20M tokens per arm; the workdir — teacher data, compilation cache — must
survive between calls, i.e. the same machine, else the next call regenerates the data):

    python benchmarks/distill_quality.py --tokens 20e6 --budget_s 540 --out benchmarks/results

CPU smoke test (tiny random teacher, seconds):

    python benchmarks/distill_quality.py --quick --out /tmp/dq

Writes ``<out>/distill_quality.json`` ({"teacher_ppl", "student_init_ppl", "tokens",
"arms": [{"name", "ppl", "kl", ...}], "skipped", "targets", ...}) and
``<out>/distill_quality.md``, and replaces the distill-quality section of ``--results_md``
(default ``benchmarks/RESULTS.md`` unless ``--quick``; ``--results_md ''`` for none).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks import protocol  # noqa: E402

ARMS = {
    # name: (weights of the arm's own term over (ce, fkl, rkl, jsd), has on-policy steps)
    "ce": ((1.0, 0.0, 0.0, 0.0), False),
    "fkl": ((0.0, 1.0, 0.0, 0.0), False),
    "rkl": ((0.0, 0.0, 1.0, 0.0), False),
    "gkd": ((0.0, 0.0, 0.0, 1.0), True),
}
MD_BEGIN, MD_END = "<!-- distill_quality:begin -->", "<!-- distill_quality:end -->"
# an arm with on-policy fraction λ takes (1 + ONPOLICY_SLOWDOWN · λ)× an off-policy arm's time
# (the student samples its batch on those steps): measured 2.01× at λ = 0.5 on an H100
ONPOLICY_SLOWDOWN = 2.2


def arm_weights(name: str, alpha: float):
    """Loss weights over (ce, fkl, rkl, jsd): KD arms α · CE + (1 − α) · divergence, ``ce``
    hard labels only. (On-policy steps keep these weights; their ``ce_mask`` keeps cross
    entropy off the student's samples.)"""
    import numpy as np

    w = np.asarray(ARMS[name][0], np.float32)
    if w[0] != 1.0:
        w = (1.0 - alpha) * w
        w[0] = alpha
    return w


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument(
        "--results_md", default=None, help="RESULTS.md whose section to replace ('' = none)"
    )
    p.add_argument("--quick", action="store_true", help="CPU smoke run with tiny numbers")
    p.add_argument(
        "--workdir",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "shrinkjax_distill_quality"),
        help="scratch: teacher-generated data (reused when it matches), logs, token caches, "
        "compilation cache",
    )
    p.add_argument(
        "--tokens",
        type=float,
        default=None,
        help="training tokens (sequence positions) per arm, rounded up to whole steps "
        "(default 4e6 GPU, 8192 quick)",
    )
    p.add_argument("--arms", default="ce,fkl,rkl,gkd")
    p.add_argument("--seqlen", type=int, default=None, help="training sequence length")
    p.add_argument("--batch", type=int, default=None, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--alpha", type=float, default=0.5, help="hard-label CE weight of KD arms")
    p.add_argument("--tau", type=float, default=1.0, help="LOSS temperature of fkl/rkl/gkd")
    p.add_argument("--beta", type=float, default=0.5, help="JSD(beta) of the gkd arm")
    p.add_argument("--lam", type=float, default=0.5, help="on-policy fraction of the gkd arm")
    p.add_argument(
        "--train_on_prompt",
        action="store_true",
        help="also score the real-text prompts of teacher-generated sequences (default: "
        "context only, so validation text is not re-trained as repeated epochs)",
    )
    p.add_argument("--prompt_len", type=int, default=None)
    p.add_argument("--gen_batch", type=int, default=None, help="teacher generation batch")
    p.add_argument(
        "--onpolicy_new",
        type=int,
        default=None,
        help="tokens the student samples per on-policy sequence (the rest of the "
        "sequence is a data prompt)",
    )
    p.add_argument(
        "--gkd_prompts",
        choices=("batch", "corpus"),
        default="batch",
        help="on-policy prompts: the head of the step's data batch (batch) or fresh "
        "validation-text slices (corpus)",
    )
    p.add_argument(
        "--gkd_score_prompt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score the data prompt of on-policy steps like an off-policy batch (batch "
        "prompts only; --no_gkd_score_prompt: context only)",
    )
    p.add_argument(
        "--jsd_normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gkd: JSD(beta) / (beta (1 - beta)), a KL's curvature at p_S = p_T",
    )
    p.add_argument(
        "--real_windows", type=int, default=None, help="cap on real-text training windows (0 = all)"
    )
    p.add_argument("--eval_windows", type=int, default=None, help="0 = the whole test set")
    p.add_argument("--attention", default=None, help="cudnn | einsum")
    p.add_argument(
        "--chunk_tokens",
        type=int,
        default=None,
        help="tokens per chunk of the vocabulary-sized loss (default 8192 GPU, 64 quick; "
        ">= batch × seqlen = one unchunked, non-rematerialised loss: more memory)",
    )
    p.add_argument(
        "--static_loss",
        action="store_true",
        help="ce/fkl/rkl: a step compiled for each arm's own loss terms (ce without the "
        "teacher forward) instead of the shared step computing all four terms with run-time "
        "weights; one more compile per arm (gkd keeps run-time weights)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bf16_backward",
        action="store_true",
        help="backward GEMMs of the dense linears in bf16 (train.low_precision_backward; "
        "distill_speed.py's fastest step); recorded in each arm's protocol",
    )
    p.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="wall seconds for this call (default 540 GPU, 0 = unlimited quick): arms that "
        "would overrun are skipped, an arm still running at the limit is abandoned",
    )
    p.add_argument(
        "--margin_s", type=float, default=None, help="safety margin of --budget_s (default 20)"
    )
    p.add_argument(
        "--est_tok_s",
        type=float,
        default=None,
        help="training tokens/s assumed before any arm was measured (default 1e5 GPU)",
    )
    p.add_argument("--redo", action="store_true", help="re-run arms already in the JSON")
    p.add_argument(
        "--gen_only",
        action="store_true",
        help="only generate/cache the teacher data and evaluate the initial student",
    )
    p.add_argument(
        "--no_compile_cache",
        action="store_true",
        help="no persistent JAX compilation cache in the workdir (on by default on GPU)",
    )
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
    a.onpolicy_new = a.onpolicy_new or (16 if q else 64)
    a.real_windows = (16 if q else 0) if a.real_windows is None else a.real_windows
    a.eval_windows = (4 if q else 0) if a.eval_windows is None else a.eval_windows
    a.attention = a.attention or ("einsum" if q else "cudnn")
    a.chunk_tokens = a.chunk_tokens or (64 if q else 8192)
    a.budget_s = (0.0 if q else 540.0) if a.budget_s is None else a.budget_s
    a.margin_s = 20.0 if a.margin_s is None else a.margin_s
    a.est_tok_s = a.est_tok_s or (5e4 if q else 1e5)
    if a.results_md is None and not q:
        a.results_md = os.path.join(HERE, "RESULTS.md")
    if not 0.0 <= a.alpha <= 1.0:
        p.error(f"--alpha must be in [0, 1], got {a.alpha}")
    if a.gkd_score_prompt and a.gkd_prompts != "batch":
        p.error("--gkd_score_prompt needs --gkd_prompts batch (corpus prompts have no mask)")
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
        chunk_tokens=a.chunk_tokens,
        checkpoint_every=-1,
        eval_every=0,
        eval_windows=0,
        log_every=max(1, steps // 20),
        tensorboard=False,
        seed=a.seed,
        low_precision_backward=a.bf16_backward,
    )
    c.distill.update(tau=a.tau, beta=a.beta, alpha=a.alpha, jsd_normalize=a.jsd_normalize)
    c.lock()
    return c


def load_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def arm_protocol(common: dict, name: str, a) -> dict:
    """Everything an arm's result depends on: the shared protocol plus the arm's own loss."""
    p = dict(common)
    if a.bf16_backward:  # (arms without the key ran autodiff's f32 backward)
        p.update(low_precision_backward=True)
    if name != "ce":
        p.update(alpha=a.alpha, tau=a.tau)
    if ARMS[name][1]:
        p.update(beta=a.beta, lam=a.lam, onpolicy_new=a.onpolicy_new)
        if (a.gkd_prompts, a.gkd_score_prompt, a.jsd_normalize) != ("corpus", False, False):
            # (the earlier protocol's arms carry none of these keys)
            p.update(
                gkd_prompts=a.gkd_prompts,
                gkd_score_prompt=a.gkd_score_prompt,
                jsd_normalize=a.jsd_normalize,
            )
    return p


def _jsonish(x):
    return json.loads(json.dumps(x))


class _OutOfTime(Exception):
    pass


def main(argv=None):
    t_start = time.perf_counter()
    a = parse(argv)
    import jax
    import numpy as np

    from shrinkjax.data.windows import tokenize, windows
    from shrinkjax.distill.logit import Distiller
    from shrinkjax.distill.onpolicy import OnPolicyBatcher
    from shrinkjax.distill.sequence import GenerationIncomplete, generate_dataset, sample_prompts
    from shrinkjax.io.load import load_model
    from shrinkjax.models.generate import Sampling
    from shrinkjax.models.surgery import drop_layers
    from shrinkjax.train import metrics as metlib
    from shrinkjax.train import state as statelib
    from shrinkjax.train import step as steplib
    from shrinkjax.train.loop import StepBatcher

    deadline = t_start + a.budget_s if a.budget_s > 0 else None
    left = lambda: (deadline - time.perf_counter()) if deadline else float("inf")
    os.makedirs(a.out, exist_ok=True)
    # teacher data, logs, token caches (large: kept out of --out)
    work = a.workdir + ("_quick" if a.quick else "")
    cache = os.path.join(work, "cache")
    if not a.quick and not a.no_compile_cache:
        # a later call on the same machine skips most compiles
        jax.config.update("jax_compilation_cache_dir", os.path.join(work, "jax_cache"))
    arms = [x for x in a.arms.split(",") if x]
    for x in arms:
        if x not in ARMS:
            raise SystemExit(f"unknown arm {x!r}; known {list(ARMS)}")
    device = str(jax.devices()[0].device_kind)
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

    # ---------------------------------------------------------------- data, protocol
    eval_ids = tokenize(
        load_text(os.path.join(a.data, "wikitext-2-raw", "test.txt")), tok, cache_dir=cache
    )
    eval_len = 64 if a.quick else 2048
    eval_toks, _ = windows(eval_ids, eval_len, max_windows=a.eval_windows)
    train_ids = tokenize(
        load_text(os.path.join(a.data, "wikitext-2-tokenized", "valid.txt")), tok, cache_dir=cache
    )
    real, _ = windows(train_ids, a.seqlen, max_windows=a.real_windows)
    steps = max(1, -(-a.tokens // (a.batch * a.seqlen)))
    tokens = steps * a.batch * a.seqlen
    need_windows = steps * a.batch
    n_real = min(len(real), need_windows)
    n_gen = need_windows - n_real
    prompts = sample_prompts(train_ids, n_gen, a.prompt_len, a.seed) if n_gen else None
    gen_id = {
        "teacher": loaded.name,
        "sequences": n_gen,
        "prompt_len": a.prompt_len,
        "seqlen": a.seqlen,
        "gen_batch": a.gen_batch,
        "seed": a.seed,
        "sampling": "T=1",
        "prompts_sha256": (hashlib.sha256(prompts.tobytes()).hexdigest()[:16] if n_gen else None),
    }
    eval_desc = (
        f"wikitext-2-raw test, {len(eval_toks)} x {eval_len} windows, "
        f"{len(eval_toks) * (eval_len - 1)} tokens, f32"
    )
    compute_dtype = "float32" if a.quick else "bfloat16"
    common = _jsonish(
        {
            "teacher": loaded.name,
            "dropped_layers": list(drop),
            "tokens": tokens,
            "steps": steps,
            "batch": a.batch,
            "seqlen": a.seqlen,
            "lr": a.lr,
            "schedule": "adamw b2 0.95, cosine, warmup 10%, min 0.1 lr, clip 1.0, wd 0",
            "compute_dtype": compute_dtype,
            "seed": a.seed,
            "train_on_prompt": a.train_on_prompt,
            "real_windows": n_real,
            "teacher_data": gen_id,
            "eval": eval_desc,
        }
    )
    print(
        f"budget: {tokens:,} tokens per arm = {steps} steps x {a.batch} x {a.seqlen}; "
        f"{n_real} real windows + {n_gen} teacher-generated"
        + (f"; call budget {a.budget_s:.0f}s" if deadline else ""),
        flush=True,
    )

    # ---------------------------------------------------------------- merge with earlier calls
    json_path = os.path.join(a.out, "distill_quality.json")
    prior = read_json(json_path)
    kept, dropped = [], []
    for x in prior.get("arms", []):
        name = x.get("name")
        ok = name in ARMS and x.get("protocol") == arm_protocol(common, name, a)
        (kept if ok else dropped).append(x if ok else name)
    if dropped:
        shutil.copyfile(json_path, os.path.join(a.out, "distill_quality.prev.json"))
        print(
            f"dropping earlier arms {dropped} (another protocol; old file kept as "
            "distill_quality.prev.json)",
            flush=True,
        )
    todo = [x for x in arms if a.redo or x not in {k["name"] for k in kept}]
    if kept:
        print(f"kept from earlier calls: {[x['name'] for x in kept]}", flush=True)
    same_common = prior.get("protocol") == common
    result = {
        "teacher": loaded.name,
        "device": device,
        "tokens": tokens,
        "tokens_note": "sequence positions trained per arm (steps x batch x seqlen), equal "
        "for all arms; scored_tokens (per arm) = positions whose next-token prediction is in "
        "the loss",
        "steps": steps,
        "batch": a.batch,
        "seqlen": a.seqlen,
        "lr": a.lr,
        "alpha": a.alpha,
        "tau": a.tau,
        "beta": a.beta,
        "lam": a.lam,
        "train_on_prompt": a.train_on_prompt,
        "attention": a.attention,
        "compute_dtype": compute_dtype,
        "chunk_tokens": a.chunk_tokens,
        "dropped_layers": list(drop),
        "eval": eval_desc,
        "train_data": f"{n_real} wikitext-2 valid windows + {n_gen} teacher-generated "
        f"sequences (prompt {a.prompt_len} real tokens, "
        f"{'scored' if a.train_on_prompt else 'context only'}, + "
        f"{a.seqlen - a.prompt_len} sampled at T=1)",
        "protocol": common,
        "arms": kept,
        "skipped": [],
        "calls": prior.get("calls", []) if same_common else [],
    }
    for k in (
        "teacher_ppl",
        "student_init_ppl",
        "student_init_kl",
        "init_eval_seconds",
        "teacher_gen_seconds",
        "train_data_scored_tokens",
        "gkd_variants",
        "gkd_variants_note",
        "step_variants",
    ):
        if same_common and k in prior:
            result[k] = prior[k]
    call = {"device": device, "arms_requested": arms, "arms_run": [], "status": "running"}
    result["calls"].append(call)

    def write():
        from shrinkjax.io.files import write_json, write_text

        order = list(ARMS)
        result["arms"].sort(key=lambda x: order.index(x["name"]))
        result["targets"] = targets(result)
        call["seconds"] = time.perf_counter() - t_start
        write_json(json_path, result)
        md = markdown(result)
        write_text(os.path.join(a.out, "distill_quality.md"), md)
        if a.results_md:
            protocol.update_section(a.results_md, md, MD_BEGIN, MD_END)

    def finish(status: str):
        call["status"] = status
        write()
        print_table(result, call)
        return result

    need_init = "student_init_ppl" not in result or a.redo
    if not todo and not a.gen_only and not need_init:
        print(f"nothing to run: arms {arms} are in {json_path} (--redo re-runs)", flush=True)
        return finish("nothing to run")

    # ---------------------------------------------------------------- evaluation (f32)
    eval_s = steplib.Forward(student0.cfg.replace(dtype="float32", attention_impl="einsum"))
    eval_t = steplib.Forward(teacher.cfg.replace(dtype="float32", attention_impl="einsum"))
    evaluator = metlib.Evaluator(eval_s, eval_t, chunk=4096)
    t_flat32 = jax.device_put(statelib.frozen_params(teacher, "float32"))
    eval_bs = 4 if not a.quick else 2
    eval_secs = [result.get("init_eval_seconds", 30.0 if not a.quick else 5.0)]

    def evaluate(student_flat, desc):
        t = time.perf_counter()
        r = evaluator(student_flat, eval_toks, eval_bs, t_flat32, progress=True, desc=desc)
        r["seconds"] = time.perf_counter() - t
        eval_secs.append(r["seconds"])
        return r

    if need_init:
        init = evaluate(statelib.frozen_params(student0, "float32"), "eval init")
        result.update(
            teacher_ppl=init["teacher_ppl"],
            student_init_ppl=init["ppl"],
            student_init_kl=init["kl"],
            init_eval_seconds=init["seconds"],
        )
    print(
        f"teacher ppl {result['teacher_ppl']:.3f}; student init ppl "
        f"{result['student_init_ppl']:.3f}, KL {result['student_init_kl']:.4f} "
        f"({eval_desc}, {result['init_eval_seconds']:.1f}s)",
        flush=True,
    )
    write()
    if not todo and not a.gen_only:
        return finish("nothing to run")

    # ---------------------------------------------------------------- teacher data
    t0 = time.perf_counter()
    if n_gen:
        tflat = statelib.frozen_params(teacher, compute_dtype)
        from shrinkjax.distill.sequence import sampling_model

        gen_model = sampling_model(teacher, compute_dtype, flat=tflat)
        try:
            gen_toks, gen_mask = generate_dataset(
                gen_model,
                prompts,
                os.path.join(work, "teacher_data"),
                max_new_tokens=a.seqlen - a.prompt_len,
                sampling=Sampling(temperature=1.0),
                batch_size=a.gen_batch,
                seed=a.seed,
                eos_id=tok.eos_id,
                train_on_prompt=False,  # the prompt mask is set below (one cache for both)
                extra_meta={"teacher": loaded.name},
                deadline=(deadline - a.margin_s) if deadline else None,
            )
        except GenerationIncomplete as e:
            print(f"{e}: re-run the same command", flush=True)
            result["skipped"] = [{"name": x, "reason": "teacher data incomplete"} for x in todo]
            return finish(str(e))
        del gen_model, tflat
        gen_mask = gen_mask.copy()
        gen_mask[:, : a.prompt_len] = a.train_on_prompt
        all_toks = np.concatenate([real[:n_real], gen_toks])
        all_mask = np.concatenate([np.ones_like(real[:n_real], bool), gen_mask])
    else:
        all_toks, all_mask = real[:n_real], np.ones_like(real[:n_real], bool)
    t_gen = time.perf_counter() - t0
    print(
        f"teacher data: {n_gen} sequences ({n_gen * a.seqlen:,} tokens) in {t_gen:.1f}s",
        flush=True,
    )
    call["teacher_data_seconds"] = t_gen
    # the generating call's time (a later call's cache hit takes seconds)
    result["teacher_gen_seconds"] = max(t_gen, result.get("teacher_gen_seconds", 0.0))
    result["train_data_scored_tokens"] = int(all_mask[:, 1:].sum())
    write()
    if a.gen_only:
        return finish("gen_only")

    # ---------------------------------------------------------------- time estimates
    def step_kind(name: str) -> str:
        """Arms of one kind train at one speed: the shared run-time-weights step, or with
        --static_loss the CE-only step (no teacher) or a static KD step."""
        if not a.static_loss or ARMS[name][1]:
            return "dynamic"
        return "static-ce" if name == "ce" else "static-kd"

    def sec_per_token(kind: str, onpolicy: bool = False):
        """Measured seconds per training token of finished arms of this kind (this call
        first, then earlier calls on the same device kind), or None."""
        here = [x for x in result["arms"] if x["name"] in call["arms_run"]]
        older = [x for x in result["arms"] if x not in here and x.get("device") == device]
        for group in (here, older):
            r = [
                x["train_seconds"] / x["tokens"]
                for x in group
                if x.get("step_kind", "dynamic") == kind
                and ARMS[x["name"]][1] == onpolicy
                and x.get("train_seconds")
                and x.get("tokens")
            ]
            if r:
                return max(r)
        return None

    # conservative slow-downs from one kind's measured rate to another's (the CE-only step
    # runs no teacher; the run-time-weights step computes all four loss terms)
    slower = {
        ("static-ce", "static-kd"): 1.5,
        ("static-ce", "dynamic"): 1.8,
        ("static-kd", "dynamic"): 1.15,
    }

    def estimate(name: str) -> float:
        kind = step_kind(name)
        sec = sec_per_token(kind)
        if sec is None:  # from another kind's rate, else the assumed --est_tok_s
            other = [
                (sec_per_token(k), slower.get((k, kind), 1.0))
                for k in ("dynamic", "static-kd", "static-ce")
            ]
            other = [r * f for r, f in other if r is not None]
            sec = max(other) if other else 1.0 / a.est_tok_s
        train = tokens * sec
        if ARMS[name][1]:
            on = sec_per_token(kind, onpolicy=True)
            train = tokens * on if on else train * (1 + ONPOLICY_SLOWDOWN * a.lam) + 30
        return train + max(eval_secs[-3:])

    # the step's compile (from an earlier call on this device kind, else a guess)
    compiles = [
        c["compile_seconds"] / max(c.get("compiles", 1), 1)
        for c in result["calls"]
        if c.get("device") == device and c.get("compile_seconds")
    ]
    est_compile = max(compiles) if compiles else (60.0 if not a.quick else 10.0)
    if deadline and all(estimate(n) + est_compile + a.margin_s > left() for n in todo):
        for n in todo:
            msg = (
                f"estimated {estimate(n):.0f}s + compile {est_compile:.0f}s + margin "
                f"{a.margin_s:.0f}s > {left():.0f}s left"
            )
            print(f"arm {n}: skipped ({msg}); re-run the same command", flush=True)
            result["skipped"].append({"name": n, "reason": msg, "estimated_seconds": estimate(n)})
        return finish("partial: re-run for the skipped arms")

    # ---------------------------------------------------------------- trainers
    # One compiled step with run-time loss weights serves every arm (default); with
    # --static_loss, ce/fkl/rkl each get a step computing only their own terms (ce: no
    # teacher forward at all), gkd keeps the run-time mix (no CE on its on-policy steps).
    c = bench_config(a, steps)
    base = StepBatcher(all_toks, all_mask, a.batch, a.seed)
    trainers: dict = {}  # key -> (Distiller, fresh state); one on the device at a time
    call.update(compile_seconds=0.0, compiles=0)

    def trainer_key(name: str) -> str:
        return "dynamic" if step_kind(name) == "dynamic" else name

    def static_loss(name: str):
        from shrinkjax.distill import losses

        if name == "ce":
            return losses.LossConfig(alpha=1.0, divergence="none", chunk=a.chunk_tokens)
        div = {"fkl": "forward_kl", "rkl": "reverse_kl"}[name]
        return losses.LossConfig(alpha=a.alpha, divergence=div, tau=a.tau, chunk=a.chunk_tokens)

    def build(key: str, attn: str):
        cc = c
        if attn != c.train.attention_impl:
            cc = bench_config(argparse.Namespace(**{**vars(a), "attention": attn}), steps)
        lc = None if key == "dynamic" else static_loss(key)
        d = Distiller(
            teacher,
            student0,
            cc,
            os.path.join(work, "train"),
            loss_cfg=lc,
            use_teacher=None if lc is None else lc.needs_teacher,
            dynamic_loss=lc is None,
            ce_mask=lc is None,  # the shared step also serves gkd's on-policy batches
        )
        probe = base(0)
        if lc is None:
            probe.update(
                ce_mask=probe["loss_mask"],
                loss_weights=np.zeros(4, np.float32),
                tau=np.float32(a.tau),
                beta=np.float32(a.beta),
            )
        d.step_fn.lower(d.state, jax.device_put(probe, d.batch_sh)).compile()
        fresh = statelib.create_train_state(
            student0,
            d.optimizer,
            seed=a.seed,
            compute_dtype=c.train.compute_dtype,
            attention_impl=d.student_cfg.attention_impl,
            teacher=teacher if d.state.frozen is not None else None,
        )
        return d, fresh

    def trainer(name: str):
        key = trainer_key(name)
        if key not in trainers:
            for d, _ in trainers.values():
                d.close()
            trainers.clear()
            t = time.perf_counter()
            try:  # cuDNN attention must compile; else einsum
                trainers[key] = build(key, a.attention)
            except Exception as e:  # noqa: BLE001
                if a.attention == "einsum":
                    raise
                print(
                    f"attention_impl={a.attention} failed to compile ({type(e).__name__}: "
                    f"{str(e)[:300]}); falling back to einsum",
                    flush=True,
                )
                a.attention = result["attention"] = "einsum"
                trainers[key] = build(key, "einsum")
            call["compile_seconds"] += time.perf_counter() - t
            call["compiles"] += 1
        return trainers[key]

    # ---------------------------------------------------------------- arms
    out_of_time = False
    for name in todo:
        if out_of_time:
            result["skipped"].append({"name": name, "reason": "out of time"})
            continue
        est = estimate(name) + (est_compile if trainer_key(name) not in trainers else 0.0)
        if deadline and est + a.margin_s > left():
            msg = f"estimated {est:.0f}s + margin {a.margin_s:.0f}s > {left():.0f}s left"
            print(f"arm {name}: skipped ({msg}); re-run the same command", flush=True)
            result["skipped"].append({"name": name, "reason": msg, "estimated_seconds": est})
            write()
            continue
        w_off = arm_weights(name, a.alpha)
        onpolicy = ARMS[name][1]
        dist, fresh = trainer(name)
        # a copy: the step donates its state, and `fresh` must survive for the next arm
        dist.state = jax.device_put(jax.tree.map(lambda x: x.copy(), fresh), dist.state_sh)
        dist.logger.close()
        dist.logger = metlib.MetricsLogger(os.path.join(work, name), tensorboard=False)
        dyn = dict(loss_weights=w_off, tau=np.float32(a.tau), beta=np.float32(a.beta))
        if trainer_key(name) != "dynamic":
            dyn = {}  # the loss mix is compiled in
        op = None
        if onpolicy:
            op_prompt = a.seqlen - a.onpolicy_new
            op = OnPolicyBatcher(
                base,
                None
                if a.gkd_prompts == "batch"
                else sample_prompts(train_ids, 4096, op_prompt, a.seed + 1),
                lam=a.lam,
                max_new_tokens=a.onpolicy_new,
                sampling=Sampling(temperature=1.0),
                seed=a.seed,
                student_cfg=dist.student_cfg,
                eos_id=tok.eos_id,
                dynamic=dyn,
                score_prompt=a.gkd_score_prompt,  # the ce_mask leaves samples out of CE
            )
            batch_fn = op
        else:

            def batch_fn(s, st, dyn=dyn):
                b = base(s)
                # the shared dynamic step takes a CE mask (= the loss mask on data batches)
                return dict(b, ce_mask=b["loss_mask"], **dyn) if dyn else b

        scored = [0.0]
        stop_at = (deadline - min(a.margin_s, 10.0)) if deadline else None

        def on_metrics(s, m, scored=scored, stop_at=stop_at):
            scored[0] += m.get("tokens", 0.0)
            if stop_at is not None and time.perf_counter() > stop_at:
                raise _OutOfTime(f"out of time at step {s + 1}/{steps}")

        print(f"arm {name}: estimated {est:.0f}s", flush=True)
        t = time.perf_counter()
        try:
            summ = dist.fit(batch_fn, steps=steps, desc=f"arm {name}", on_metrics=on_metrics)
        except _OutOfTime as e:
            print(f"arm {name}: abandoned ({e}); re-run the same command", flush=True)
            result["skipped"].append(
                {"name": name, "reason": f"abandoned: {e}", "estimated_seconds": est}
            )
            out_of_time = True
            continue
        train_s = time.perf_counter() - t
        ev = evaluate(dist.state.params["student"], f"eval {name}")
        gap = math.log(result["student_init_ppl"]) - math.log(result["teacher_ppl"])
        rec = (
            (math.log(result["student_init_ppl"]) - math.log(ev["ppl"])) / gap
            if gap > 0
            else float("nan")
        )
        arm = {
            "name": name,
            "ppl": ev["ppl"],
            "kl": ev["kl"],
            "nll": ev["nll"],
            "gap_recovered": rec,
            "tokens": tokens,
            "scored_tokens": scored[0],
            "loss_weights": w_off.tolist(),
            "train_seconds": train_s,
            "eval_seconds": ev["seconds"],
            "estimated_seconds": est,
            "tokens_per_s": summ.get("tokens_per_s"),
            "mfu": summ.get("mfu"),
            "final_train_loss": summ["final_loss"],
            "device": device,
            "attention": a.attention,
            "step_kind": step_kind(name),
            "call": len(result["calls"]) - 1,
            "protocol": arm_protocol(common, name, a),
        }
        if op is not None:
            arm.update(
                onpolicy_steps=op.onpolicy_steps,
                lam=a.lam,
                beta=a.beta,
                jsd_normalize=a.jsd_normalize,
                gkd_prompts=a.gkd_prompts,
                gkd_score_prompt=a.gkd_score_prompt,
                onpolicy_sampled_tokens=a.onpolicy_new,
                note=(
                    f"on-policy steps: the first {op_prompt} tokens of the step's data batch "
                    + ("(scored as data: CE + JSD) " if a.gkd_score_prompt else "(context) ")
                    if a.gkd_prompts == "batch"
                    else f"on-policy steps: a {op_prompt}-token validation-text prompt (context) "
                )
                + f"+ {a.onpolicy_new} student-sampled tokens (JSD only, no cross entropy)"
                + ("; JSD / (β(1 − β))" if a.jsd_normalize else ""),
            )
        result["arms"] = [x for x in result["arms"] if x["name"] != name] + [arm]
        call["arms_run"].append(name)
        print(
            f"arm {name}: ppl {ev['ppl']:.3f}, KL {ev['kl']:.4f}, gap recovered "
            f"{100 * rec:.1f}% ({train_s:.1f}s train, estimated {est:.0f}s)",
            flush=True,
        )
        write()
    for d, _ in trainers.values():
        d.close()
    return finish("done" if not result["skipped"] else "partial: re-run for the skipped arms")


def targets(r: dict) -> dict:
    by = {x["name"]: x for x in r["arms"]}
    ce = by.get("ce")
    kd_names = [n for n in ARMS if n != "ce"]
    kd = [by[n] for n in kd_names if n in by]
    missing = [n for n in ARMS if n not in by]
    beats = [x["name"] for x in kd if ce and x["ppl"] < ce["ppl"]]
    best = max((x["gap_recovered"] for x in r["arms"]), default=None)
    return {
        "arms_missing": missing,
        # undecided (None) until ce and every KD arm are in
        "every_kd_arm_beats_ce": (len(beats) == len(kd_names)) if ce and len(kd) == 3 else None,
        "kd_arms_beating_ce": beats,
        "tokens_per_arm_ge_20M": r["tokens"] >= 20_000_000,
        "best_gap_recovered": best,
        "best_recovers_75pct": (best >= 0.75) if best is not None else None,
    }


def print_table(r: dict, call: dict) -> None:
    from shrinkjax.eval.report import table

    rows = []
    if "teacher_ppl" in r:
        rows += [
            {"arm": "teacher", "ppl": r["teacher_ppl"], "kl": 0.0, "recovered": 1.0},
            {
                "arm": "student init",
                "ppl": r["student_init_ppl"],
                "kl": r["student_init_kl"],
                "recovered": 0.0,
            },
        ]
    for x in r["arms"]:
        rows.append(
            {
                "arm": x["name"],
                "ppl": x["ppl"],
                "kl": x["kl"],
                "recovered": x["gap_recovered"],
                "train_s": x.get("train_seconds", ""),
                "tok/s": x.get("tokens_per_s") or "",
                "call": x.get("call", ""),
            }
        )
    for x in r["skipped"]:
        rows.append({"arm": x["name"], "ppl": "skipped", "kl": x["reason"][:60]})
    print(
        table(
            rows,
            title=f"\ndistill quality ({r['tokens']:,} tokens/arm, alpha {r['alpha']}, "
            f"{r['device']}, this call {call.get('seconds', 0):.0f}s: {call['status']})",
        )
    )
    print(f"targets: {r['targets']}", flush=True)


def markdown(r: dict) -> str:
    lines = [
        MD_BEGIN,
        "## Distillation quality (`benchmarks/distill_quality.py`)",
        "",
        f"Teacher {r['teacher']}; student = teacher without layers "
        f"{r['dropped_layers'][0]}–{r['dropped_layers'][-1]}. Each arm trains "
        f"**{r['tokens']:,} tokens** ({r['steps']} steps × {r['batch']} × {r['seqlen']} "
        f"sequence positions), lr {r['lr']}, {r['compute_dtype']}, attention {r['attention']}, "
        f"on {r['device']}. KD arms: α = {r['alpha']} hard-label CE + (1 − α) divergence "
        f"(τ = {r['tau']}); gkd: λ = {r['lam']}, JSD(β = {r['beta']}), no CE on the "
        f"student's samples. Data: {r['train_data']}. Eval: {r['eval']}.",
        "",
        "| model | wikitext-2 ppl | KL(p_T‖p_S) | log-ppl gap recovered |",
        "|---|---|---|---|",
    ]
    if "teacher_ppl" in r:
        lines += [
            f"| teacher | {r['teacher_ppl']:.2f} | 0 | — |",
            f"| student init | {r['student_init_ppl']:.2f} | {r['student_init_kl']:.4f} | 0% |",
        ]
    for x in r["arms"]:
        lines.append(
            f"| {x['name']} | {x['ppl']:.2f} | {x['kl']:.4f} | {100 * x['gap_recovered']:.1f}% |"
        )
    lines += [f"\n{x['name']}: {x['note']}" for x in r["arms"] if x.get("note")]
    if r.get("gkd_variants"):  # other gkd protocols kept by hand (not re-run by this script)
        lines += ["", "Other gkd protocols, same data and budget:", ""]
        lines += ["| gkd variant | ppl | KL | gap recovered |", "|---|---|---|---|"]
        lines += [
            f"| {x['variant']} | {x['ppl']:.2f} | {x['kl']:.4f} | {100 * x['gap_recovered']:.1f}% |"
            for x in r["gkd_variants"]
        ]
    if r.get("step_variants"):  # the same arm with another train step (kept by hand)
        lines += ["", "Same arm, another train step, same data and budget:", ""]
        lines += ["| arm | step | ppl | KL | gap recovered | train tok/s |", "|---" * 6 + "|"]
        lines += [
            f"| {x['name']} | {x['variant']} | {x['ppl']:.2f} | {x['kl']:.4f} | "
            f"{100 * x['gap_recovered']:.1f}% | {x['tokens_per_s']:,.0f} |"
            for x in r["step_variants"]
        ]
    if r.get("targets", {}).get("arms_missing"):
        lines += ["", f"Not yet run: {', '.join(r['targets']['arms_missing'])}."]
    if "targets" in r:
        lines += ["", f"Targets: {r['targets']}"]
    lines.append(MD_END)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
