"""Sibling projections fused for inference: q/k/v as one ``qkv_proj``, gate/up as one
``gate_up_proj`` (``LlamaConfig.fused_projections``).

Linears that read the same input can run as one matmul over their concatenated output columns:
``x @ [Wq | Wk | Wv]``. The result is the same (every output column is its own dot product), but a
decode step launches 5 matmuls per block instead of 7, and the small ones (Llama-3-8B's k/v are
4096 x 1024) stop being latency-bound. Serving stacks do the same (vLLM's ``QKVParallelLinear``
and ``MergedColumnParallelLinear``).

Fuse *after* compression: calibration (GPTQ, AWQ, SparseGPT, Wanda) works on the unfused model
and refuses a fused one. Group-wise quantized and N:M sparse weights concatenate exactly, since
their groups run along K within one output column: GPTQ and the pruners treat output columns
independently, so quantizing q, k and v apart and concatenating equals quantizing them together
with the same settings. Fuse before :func:`shrinkjax.kernels.convert.pack_model_for_kernels`
(the kernel layouts pad N per weight).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from shrinkjax.quant.array import StoredWeight

# fused module -> its parts, in output-column order
FUSED_LINEARS = {
    "attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def concat_columns(parts: list, where: str = ""):
    """``[K, N_i]`` weights -> one ``[K, sum N_i]`` of the same type.

    Dense arrays concatenate; compressed weights (:class:`StoredWeight`: quantized, N:M sparse)
    must share their type and settings: each stored leaf whose last axis is the part's N is
    concatenated along it, every other leaf (a tensor-wide scale) must be equal across parts."""
    at = f" at {where}" if where else ""
    ks = {int(p.shape[0]) for p in parts}
    if len(ks) != 1:
        raise ValueError(f"cannot fuse{at}: the parts' K differ ({sorted(ks)})")
    first = parts[0]
    if not isinstance(first, StoredWeight):
        if any(isinstance(p, StoredWeight) for p in parts):
            raise TypeError(f"cannot fuse{at}: a mix of dense and compressed weights")
        if any(getattr(p, "ndim", 0) != 2 for p in parts):
            raise TypeError(f"cannot fuse{at}: expected 2-D [K, N] kernels")
        return jnp.concatenate([jnp.asarray(p) for p in parts], axis=1)
    types = {type(p).__name__ for p in parts}
    if len(types) != 1:
        raise TypeError(f"cannot fuse{at}: different weight types {sorted(types)}")
    meta = {
        f.name: getattr(first, f.name)
        for f in dataclasses.fields(first)
        if f.name not in first.STORED and f.name != "shape"
    }
    for p in parts[1:]:
        other = {name: getattr(p, name) for name in meta}
        if other != meta:
            raise ValueError(f"cannot fuse{at}: settings differ ({meta} vs {other})")
    fields = {}
    for name in first.STORED:
        leaves = [getattr(p, name) for p in parts]
        if leaves[0] is None:
            if any(v is not None for v in leaves):
                raise ValueError(f"cannot fuse{at}: field {name!r} is set on some parts only")
            fields[name] = None
        elif isinstance(leaves[0], StoredWeight):  # e.g. the quantized values of N:M sparse
            fields[name] = concat_columns(leaves, f"{where}.{name}" if where else name)
        elif all(v.ndim >= 1 and v.shape[-1] == p.shape[1] for v, p in zip(leaves, parts)):
            fields[name] = jnp.concatenate(leaves, axis=-1)
        else:  # tensor-wide values: one for the fused weight, so they must agree
            ref = np.asarray(leaves[0])
            if any(not np.array_equal(np.asarray(v), ref) for v in leaves[1:]):
                raise ValueError(
                    f"cannot fuse{at}: field {name!r} is tensor-wide and differs between parts "
                    "(fuse before quantizing, or quantize with one tensor scale)"
                )
            fields[name] = leaves[0]
    shape = (first.shape[0], sum(int(p.shape[1]) for p in parts))
    return dataclasses.replace(first, **fields, shape=shape)


def fuse_params(flat: dict, n_layers: int) -> dict:
    """Flat parameters of the unfused model -> those of the fused one (biases concatenate too)."""
    out = dict(flat)
    for i in range(n_layers):
        for fused, parts in FUSED_LINEARS.items():
            for leaf in ("kernel", "bias"):
                names = [f"layers.{i}.{p}.{leaf}" for p in parts]
                have = [n in out for n in names]
                if not any(have):
                    continue
                if not all(have):
                    raise ValueError(f"cannot fuse layers.{i}.{fused}: {leaf} missing on a part")
                vals = [out.pop(n) for n in names]
                where = f"layers.{i}.{fused}.{leaf}"
                if leaf == "kernel":
                    out[where] = concat_columns(vals, where)
                else:
                    out[where] = jnp.concatenate([jnp.asarray(v) for v in vals])
    return out


def fuse_projections(model):
    """A new model with q/k/v and gate/up fused (same outputs; ``model`` is left as it is)."""
    from shrinkjax.models.params import flat_params, model_from_params

    cfg = model.cfg
    if cfg.fused_projections:
        raise ValueError("the model's projections are fused already")
    flat = fuse_params(flat_params(model), cfg.n_layers)
    return model_from_params(cfg.replace(fused_projections=True), flat)
