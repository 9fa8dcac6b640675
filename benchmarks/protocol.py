"""What the perplexity benchmarks share: the calibration / evaluation protocol flags (GPU
defaults and ``--quick`` CPU ones), the data directory, a dense copy of a compressed model for
evaluation, and replacing a benchmark's section of ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the foundation protocol: WikiText-2 raw test in 2048-token windows, 128 x 2048 calibration
FULL = dict(
    calib_windows=128, calib_seqlen=2048, seqlen=2048, eval_windows=0, batch_size=8,
    calib_batch_size=8,
)  # fmt: skip
QUICK = dict(
    calib_windows=4, calib_seqlen=128, seqlen=128, eval_windows=4, batch_size=4,
    calib_batch_size=4,
)  # fmt: skip


def add_protocol_args(p) -> None:
    """The shared flags; None = the protocol default (:data:`FULL`, or :data:`QUICK`)."""
    p.add_argument(
        "--data-dir",
        default="",
        help="shared data dir (default: $SHRINKJAX_DATA, "
        "../shared/data beside the checkout, or .gpu_data)",
    )
    p.add_argument("--calib-windows", type=int, default=None, help="default 128 (quick: 4)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="default 2048 (quick: 128)")
    p.add_argument("--seqlen", type=int, default=None, help="evaluation window, default 2048")
    p.add_argument("--eval-windows", type=int, default=None, help="default 0 = every window")
    p.add_argument("--batch-size", type=int, default=None, help="eval batch, default 8")
    p.add_argument("--calib-batch-size", type=int, default=None, help="default 8 (quick: 4)")
    p.add_argument(
        "--precision",
        default="highest",
        help="jax_default_matmul_precision (highest = true f32 matmuls on GPU, no TF32; as the "
        "foundation perplexity)",
    )
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny numbers")


def fill_defaults(a, full: dict | None = None, quick: dict | None = None):
    """Set every flag left at None from the protocol defaults (``--quick``: the quick ones);
    ``full`` / ``quick`` add or override benchmark-specific entries."""
    defaults = {**QUICK, **(quick or {})} if a.quick else {**FULL, **(full or {})}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def data_dir(arg: str) -> str:
    from shrinkjax.data.sources import shared_data_dir

    return shared_data_dir(arg, ROOT)


def dense_copy(model):
    """``model`` with every compressed kernel (quantized, N:M sparse) replaced by its dense,
    bit-identical weight: evaluation reuses the float model's compiled forward."""
    from shrinkjax.models.params import flat_params, model_from_params
    from shrinkjax.quant.array import QuantizedArray
    from shrinkjax.sparse.array import NMSparseArray

    flat = {}
    for k, v in flat_params(model).items():
        if isinstance(v, NMSparseArray):
            v = v.to_dense(model.cfg.jnp_dtype)
        elif isinstance(v, QuantizedArray):
            v = v.dequantize(model.cfg.jnp_dtype)
        flat[k] = v
    return model_from_params(model.cfg, flat)


def update_section(path: str, md: str, begin: str, end: str) -> None:
    """Replace the ``begin``…``end`` section of a RESULTS.md with ``md`` (or append it)."""
    from shrinkjax.io.files import write_text

    old = open(path).read() if os.path.isfile(path) else "# Measured results\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + md + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + md
    write_text(path, new)
