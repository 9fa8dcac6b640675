"""Run an experiment: resolve its stages from the registry, run them in order, write outputs.

Workdir layout::

    config.json              the resolved config
    results/<stage>.json     each stage's results (written atomically)
    metrics.jsonl            one line per stage (and per logged training step)
    cache/                   token caches
"""

from __future__ import annotations

import json
import os
import time

from absl import logging

from shrinkjax import stages
from shrinkjax.eval.report import table
from shrinkjax.io.files import append_jsonl, write_json


def summary_rows(results: dict) -> list[dict]:
    rows = []
    for stage, res in results.items():
        for k, v in res.items():
            if isinstance(v, int | float | str) and k not in ("source",):
                rows.append({"stage": stage, "metric": k, "value": v})
    return rows


def run(config, workdir: str) -> dict:
    """Run ``config.stages`` in order; returns {stage: results}."""
    names = list(config.stages)
    fns = [stages.get(n) for n in names]  # fail on an unknown stage before any work
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    ctx = stages.RunContext(config=config, workdir=workdir)
    for name, fn in zip(names, fns):
        logging.info("stage %s", name)
        t0 = time.perf_counter()
        res = fn(ctx) or {}
        res.setdefault("stage_seconds", time.perf_counter() - t0)
        ctx.results[name] = res
        write_json(os.path.join(workdir, "results", f"{name}.json"), res)
        append_jsonl(
            os.path.join(workdir, "metrics.jsonl"),
            {"stage": name, **{k: v for k, v in res.items() if isinstance(v, int | float | str)}},
        )
    print(table(summary_rows(ctx.results), title=f"\nresults ({workdir})"))
    for name, res in ctx.results.items():
        for s in res.get("samples", []) if isinstance(res.get("samples"), list) else []:
            print(f"\n[{name}] {s['prompt']!r} →{s['completion']!r}")
    return ctx.results
