"""One-time conversion of compressed weights into the Pallas kernels' layouts.

``QuantizedArray`` (``shrinkjax.quant``) stores codes packed for storage and checkpoints
(low nibble = even row); the kernels read their own "split-half" layouts
(``shrinkjax.kernels.layouts``). :func:`to_kernel_layout` re-packs one weight on the host;
:func:`pack_model_for_kernels` does it for every linear of a model, after which
``dispatch.linear`` routes those layers to the kernels (on GPU; the pure-jnp reference on CPU).

Supported: int4/int8 (symmetric or asymmetric, per group or per channel), MXFP4, NVFP4, and
2:4-sparse kernels (``shrinkjax.sparse.NMSparseArray`` with float values, stored in bf16, or with
int4 group-quantized values). Other formats are left as they are (the reference path) and
reported.
"""

from __future__ import annotations

import numpy as np

from shrinkjax.kernels import layouts


def _resolve_layout(name: str, value: str) -> str:
    import jax

    if value not in ("auto", "tc", "split_half"):
        raise ValueError(f"{name} must be 'auto', 'tc' or 'split_half', got {value!r}")
    if value == "auto":
        return "tc" if jax.default_backend() == "gpu" else "split_half"
    return value


def to_kernel_layout(
    w, int4_layout: str = "auto", fp4_layout: str = "auto", sparse_layout: str = "auto"
):
    """The kernel-packed equivalent of ``w``, or None when no kernel handles its format.

    ``int4_layout``: ``"tc"`` (:class:`~shrinkjax.kernels.int4_tc.TcInt4`, the tensor-core
    decode kernel: faster than the split-half one at the 8B shapes on an H100; group sizes
    dividing 128 or multiples of it), ``"split_half"``
    (:class:`~shrinkjax.kernels.layouts.PackedInt`, every group size; the layout the TPU
    kernels read) or ``"auto"`` ("tc" on a GPU backend, else
    "split_half"). ``fp4_layout``: the same choice for MXFP4 / NVFP4
    (:class:`~shrinkjax.kernels.fp4_tc.TcFP4`, any K, or the split-half ``PackedMXFP4`` /
    ``PackedNVFP4``), and ``sparse_layout`` for 2:4 (:class:`~shrinkjax.kernels.sparse24_tc.Tc24`
    or :class:`~shrinkjax.kernels.layouts.Packed24`)."""
    int4_layout = _resolve_layout("int4_layout", int4_layout)
    fp4_layout = _resolve_layout("fp4_layout", fp4_layout)
    sparse_layout = _resolve_layout("sparse_layout", sparse_layout)
    from shrinkjax.quant.array import QuantizedArray, unpack
    from shrinkjax.sparse.array import NMSparseArray

    if isinstance(w, NMSparseArray):
        if (w.n, w.m) != (2, 4):
            return None
        if isinstance(w.values, QuantizedArray):
            p = _sparse24_int4(w, unpack)
            if p is None:
                return None
        else:
            p = layouts.pack_24(np.asarray(w.to_dense(np.float32)))  # values rounded to bf16
        if sparse_layout == "tc":
            from shrinkjax.kernels import sparse24_tc

            if sparse24_tc.supports(p):
                return sparse24_tc.pack_24_tc(p)
        return p
    if not isinstance(w, QuantizedArray):
        return None
    fmt, spec = w.spec.format, w.spec
    k, n = w.shape
    bits = {"int4": 4, "int8": 8, "mxfp4": 4, "nvfp4": 4}.get(fmt)
    if bits is None:
        return None
    codes = np.asarray(unpack(w.codes, bits, k), np.uint8)
    if fmt in ("int4", "int8"):
        if spec.granularity == "tensor":
            return None
        group = spec.group_size if spec.granularity == "group" else k
        scales = np.asarray(w.scales, np.float32)
        zeros = None if spec.symmetric else np.asarray(w.zeros, np.uint8)
        # the kernel's symmetric zero is 2**(bits-1), the same offset binary as QuantizedArray
        p = layouts.pack_int(codes, scales, zeros, bits=bits, group=group)
        if bits == 4 and int4_layout == "tc":
            from shrinkjax.kernels import int4_tc

            if int4_tc.supports(p):
                return int4_tc.pack_tc(p)
        return p
    if fmt == "mxfp4":
        p = layouts.pack_mxfp4(codes, np.asarray(w.scales, np.uint8))
    else:
        tensor_scale = float(np.asarray(w.scales2, np.float32).reshape(-1)[0])
        p = layouts.pack_nvfp4(codes, np.asarray(w.scales, np.uint8), tensor_scale)
    if fp4_layout == "tc":
        from shrinkjax.kernels import fp4_tc

        return fp4_tc.pack_fp4_tc(p)
    return p


def _sparse24_int4(w, unpack):
    """A 2:4 ``NMSparseArray`` with int4 group-quantized values (e.g. SparseGPT's joint
    quantization) as a :class:`~shrinkjax.kernels.layouts.Packed24` with int4 codes, or None
    for what that layout cannot hold. The compressed axis's groups are half the dense ones."""
    v = w.values
    k, n = w.shape
    if v.spec.format != "int4" or v.spec.granularity != "group":
        return None
    kc = w.kept_rows
    group = 2 * v.spec.group_size  # dense K rows per scale (the last group may be short)
    if group % 64:
        return None
    codes = np.asarray(unpack(v.codes, 4, kc), np.uint8).reshape(k // 4, 2, n)
    rows = 4 * np.arange(k // 4)[:, None, None] + np.asarray(w.positions())  # [K/4, 2, N]
    dense = np.zeros((k, n), np.uint8)  # (rows not stored: any code)
    dense[rows.reshape(-1), np.broadcast_to(np.arange(n), rows.shape).reshape(-1)] = codes.reshape(
        -1
    )
    zeros = None if v.spec.symmetric else np.asarray(v.zeros, np.uint8)
    keep = np.asarray(w.mask())
    scales = np.asarray(v.scales, np.float32)
    return layouts.pack_24_int4(dense, scales, zeros, group=group, keep_KxN=keep)


def pack_model_for_kernels(
    model, int4_layout: str = "auto", fp4_layout: str = "auto", sparse_layout: str = "auto"
) -> dict:
    """Replace every convertible compressed kernel of ``model`` in place; returns
    {'converted': [paths], 'kept': {path: format}} for the rest that stay on the reference.
    ``int4_layout``, ``fp4_layout``, ``sparse_layout``: see :func:`to_kernel_layout`."""
    from flax import nnx

    import shrinkjax.kernels.fp4_matmul  # noqa: F401  (register the kernels with dispatch)
    import shrinkjax.kernels.fp4_tc  # noqa: F401
    import shrinkjax.kernels.int4_tc  # noqa: F401
    import shrinkjax.kernels.int_matmul  # noqa: F401
    import shrinkjax.kernels.sparse24_tc  # noqa: F401
    import shrinkjax.kernels.sparse_matmul  # noqa: F401
    from shrinkjax.models.params import flat_params

    report = {"converted": [], "kept": {}}
    modules = dict(nnx.iter_graph(model))
    for path, w in flat_params(model).items():
        if (
            not path.endswith("kernel")
            or isinstance(w, np.ndarray)
            or hasattr(w, "addressable_data")
        ):
            continue
        packed = to_kernel_layout(w, int4_layout, fp4_layout, sparse_layout)
        if packed is None:
            report["kept"][path] = getattr(getattr(w, "spec", None), "format", type(w).__name__)
            continue
        owner = tuple(int(p) if p.isdigit() else p for p in path.split(".")[:-1])
        modules[owner].kernel.value = packed
        report["converted"].append(path)
    return report
