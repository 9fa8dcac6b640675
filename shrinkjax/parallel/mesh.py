"""Device mesh with a ``data`` and an ``fsdp`` axis, and the shardings the trainer uses.

* Batches are split along their batch axis over both axes (``('data', 'fsdp')``): every
  device sees its own slice of examples.
* Parameters, optimizer moments and masks are FSDP-sharded: each array is split along its
  largest dimension that the ``fsdp`` axis size divides (ties: the first such dimension), and
  replicated when none does (or when ``fsdp`` = 1). Scalars are replicated. Because the rule
  depends only on the shape, an Adam moment is sharded exactly like its parameter.

One device is the mesh (1, 1); no ``pmap`` anywhere: ``jax.jit`` with these ``NamedSharding``s
lets XLA insert the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = ("data", "fsdp")  # batch axis split over both


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """Mesh of shape (data, fsdp) over ``devices`` (default: all); -1 fills the rest."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of data/fsdp may be -1")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if fsdp == -1:
        if n % data:
            raise ValueError(f"data={data} does not divide the {n} devices")
        fsdp = n // data
    if data * fsdp != n:
        if data * fsdp > n:
            raise ValueError(
                f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, {n} available"
            )
        devices = devices[: data * fsdp]
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """PartitionSpec sharding the largest ``fsdp``-divisible dimension (replicated if none)."""
    if fsdp_size <= 1 or not shape:
        return P()
    order = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
    for i in order:
        if shape[i] % fsdp_size == 0 and shape[i] >= fsdp_size:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(mesh: Mesh, tree):
    """NamedSharding per array leaf of ``tree`` (params, optimizer state, masks) by the FSDP
    rule. Leaves may be arrays or ShapeDtypeStructs; None leaves stay None."""
    size = mesh.shape["fsdp"]

    def one(x):
        return NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), size))

    return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Sharding of an array whose ``batch_axis`` is the example axis."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH
    return NamedSharding(mesh, P(*spec))


# Batch entries that are per-step settings, not per-example data: replicated.
REPLICATED_KEYS = frozenset({"loss_weights", "tau", "beta"})


def batch_shardings(mesh: Mesh, batch: dict, batch_axis: int = 0) -> dict:
    """Shardings for a batch dict: per-example arrays split on ``batch_axis``; the
    :data:`REPLICATED_KEYS` and arrays with no such axis are replicated."""
    out = {}
    for k, v in batch.items():
        nd = np.ndim(v)
        if k in REPLICATED_KEYS or nd <= batch_axis:
            out[k] = replicated(mesh)
        else:
            out[k] = batch_sharding(mesh, nd, batch_axis)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch axis is split (the global batch must be a multiple)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
