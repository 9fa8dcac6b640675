"""Where two greedy samples of one prompt part, and how close to a tie that step is.

    python scripts/sample_margin.py --model=$W/quantized_model \
        --a=benchmarks/results/smollm2_mxfp4_samples_ref.json \
        --b=benchmarks/results/smollm2_mxfp4_samples_kern.json [--dtype=float32]

``--a`` / ``--b``: ``scripts/evaluate.py --metrics=samples --out`` JSONs of the same prompts
(e.g. the reference path and the kernels on a GPU). For the first prompt whose completions
differ, re-runs ``--model`` (here, on this machine's backend: the reference path) on the
common prefix and prints the top-3 next-token logits: a gap far below the paths' rounding
differences means the two samples part at a near-tie rather than at a wrong kernel.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np


def _samples(path: str) -> list:
    with open(path) as f:
        doc = json.load(f)
    if "samples" not in doc:
        raise SystemExit(
            f"{path}: no 'samples' key (write it with scripts/evaluate.py --metrics=samples --out)"
        )
    return doc["samples"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint dir / GGUF (shrinkjax.io.load)")
    ap.add_argument("--a", required=True, help="samples JSON (scripts/evaluate.py --out)")
    ap.add_argument("--b", required=True, help="samples JSON of the other path")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)

    from shrinkjax.io.load import load_model

    sa, sb = (_samples(p) for p in (args.a, args.b))
    if [x["prompt"] for x in sa] != [y["prompt"] for y in sb]:
        raise SystemExit(f"{args.a} and {args.b} hold different prompts: compare like with like")
    pairs = [(x, y) for x, y in zip(sa, sb) if x["completion"] != y["completion"]]
    if not pairs:
        print("identical samples")
        return 0
    x, y = pairs[0]
    loaded = load_model(args.model, dtype=args.dtype, progress=False)
    model, tok = loaded.model, loaded.tokenizer
    ids_p, ids_a = tok.encode(x["prompt"]), tok.encode(x["prompt"] + x["completion"])
    ids_b = tok.encode(y["prompt"] + y["completion"])
    # the first token that differs; or, where one completion is a prefix of the other, the
    # step at which the shorter one ended
    k = next((i for i, (u, v) in enumerate(zip(ids_a, ids_b)) if u != v), None)
    k = min(len(ids_a), len(ids_b)) if k is None else k
    logits = model(jnp.asarray([ids_a[:k]], jnp.int32))
    logits = logits[0] if isinstance(logits, tuple) else logits
    last = np.asarray(logits[0, -1].astype(jnp.float32))
    top = np.argsort(-last)[:3]
    print(f"{x['prompt']!r}: part after {tok.decode(ids_a[len(ids_p) : k])!r}")

    def at(ids):  # the token a path chose at step k (or that it had ended)
        return repr(tok.decode([ids[k]])) if k < len(ids) else "(ended)"

    print(f"  a: {at(ids_a)}   b: {at(ids_b)}")
    print(
        f"  {args.dtype} top-3: "
        + ", ".join(f"{tok.decode([int(t)])!r} {last[t]:.4f}" for t in top)
    )
    print(f"  gap top-1 - top-2: {last[top[0]] - last[top[1]]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
