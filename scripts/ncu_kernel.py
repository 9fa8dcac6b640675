"""Run one decode kernel a few times so Nsight Compute (``ncu``) can profile it.

    ncu --clock-control none -k regex:int4_tc --launch-skip 2 --launch-count 1 \
        --set full -o /tmp/int4 python3 scripts/ncu_kernel.py --kind int4_g128 --m 1
    ncu --import /tmp/int4.ncu-rep --page details           # stall reasons, occupancy ...
    ncu --import /tmp/int4.ncu-rep --page source --csv --print-source sass   # per instruction

Builds the packed weight of ``benchmarks/kernels.py`` (random codes and scales) at K x N,
checks one call against the float reference on fresh random x (a profile of a wrong kernel
is worth nothing), then makes ``--calls`` calls, each on its own weight copy (so the L2 holds
no weight between calls, as in the benchmark). ``--set NAME=VALUE`` patches a module
constant first (``int4_tc.FEW_TOKENS=4``: a value is parsed as a Python literal); ``--tile
KEY=VALUE`` passes a tile keyword to the kernel (``split_k=4``).

Without a GPU it runs in interpret mode at a small shape (``--k 256 --n 256``), which tests it.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def benchmark_kernels():
    """``benchmarks/kernels.py`` as a module, loaded by path: its directory stays off
    ``sys.path`` (a module named ``kernels`` there shadows other packages; some benchmarks
    remove it from the path for that reason)."""
    name = "shrinkjax_benchmarks_kernels"
    if name not in sys.modules:
        path = os.path.join(ROOT, "benchmarks", "kernels.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def parse_assignments(items, what):
    """``["a.b=3", ...]`` -> ``[("a.b", 3), ...]`` (values as Python literals, else strings)."""
    out = []
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise SystemExit(f"--{what} takes NAME=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a bare word: a string
        out.append((name, value))
    return out


def patch_constants(assignments):
    """Set ``module.CONST`` of :mod:`shrinkjax.kernels` modules (``int4_tc.FEW_TOKENS=4``);
    returns ``[(module, CONST, previous value)]``, for :func:`restore_constants`."""
    saved = []
    for name, value in assignments:
        mod_name, _, const = name.rpartition(".")
        mod = importlib.import_module(f"shrinkjax.kernels.{mod_name}")
        if not hasattr(mod, const):
            raise SystemExit(f"--set: shrinkjax.kernels.{mod_name} has no {const}")
        saved.append((mod, const, getattr(mod, const)))
        setattr(mod, const, value)
    return saved


def restore_constants(saved):
    """Undo :func:`patch_constants` (its return value), last patch first."""
    for mod, const, value in reversed(saved):
        setattr(mod, const, value)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    kinds = ("int4_g128", "mxfp4", "nvfp4", "2:4_bf16", "2:4_int4")
    ap.add_argument("--kind", default="int4_g128", choices=kinds)
    ap.add_argument("--m", type=int, default=1, help="rows of x")
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--calls", type=int, default=4, help="calls after the checked one")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.CONST=VALUE")
    ap.add_argument("--tile", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    KB = benchmark_kernels()

    patch_constants(parse_assignments(args.set, "set"))
    tiles = dict(parse_assignments(args.tile, "tile"))
    interpret = jax.default_backend() != "gpu"
    rng = np.random.default_rng(args.seed)
    p, plain = KB.make_problem(args.kind, args.k, args.n, rng)
    ref_p = plain.get("source", p)
    fn = jax.jit(lambda x, w: KB.kernel_fn(args.kind)(x, w, interpret=interpret, **tiles))
    key = jax.random.PRNGKey(args.seed)
    x = jax.random.normal(key, (args.m, args.k), jnp.float32).astype(jnp.bfloat16)
    want = np.asarray(KB.R.matmul_ref(x, ref_p), np.float32)
    got = np.asarray(fn(x, p), np.float32)
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    print(f"{args.kind} M={args.m} K={args.k} N={args.n} tiles={tiles}: rel. err {err:.2e}")
    if not err < 2e-2:
        raise SystemExit(f"{args.kind}: the kernel does not match the reference (rel. err {err})")
    weights = KB.copies_of(p, args.calls)
    for w in weights:
        y = fn(x, w)
    y.block_until_ready()
    print(f"made {args.calls} calls")


if __name__ == "__main__":
    main()
