"""Block-by-block calibration: the one engine behind GPTQ, AWQ, SmoothQuant, Wanda and SparseGPT.

The decoder runs one block at a time over the calibration windows. Inside block i the linears
are visited in true-sequential groups (q/k/v → o → gate/up → down, ``llama.LINEAR_GROUPS``):
the block is re-run on its inputs with the groups before already compressed, each linear's
input activations stream through the method's statistics accumulator, and the method then
rewrites the group's weights. Block i's outputs, computed by the compressed block, are the
inputs of block i+1 (GPTQ's sequential scheme), so only one block's activations
(``[n_windows, L, D]``) are held at a time.

A method implements :class:`LayerMethod`; it never sees configs or files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from shrinkjax.models.llama import LINEAR_GROUPS, LINEAR_INPUTS, Block, Llama


class LayerMethod(Protocol):
    """What a post-training method supplies to :func:`calibrate`."""

    def wants(self, path: str) -> bool:
        """Whether the linear at ``path`` (e.g. ``layers.3.attn.q_proj``) is processed."""

    def init_stats(self, path: str, w_KxN: jax.Array) -> Any:
        """Empty statistics for one linear (a pytree of arrays)."""

    def update_stats(self, stats: Any, x_TxK: jax.Array) -> Any:
        """Fold T input rows into ``stats``; pure and jittable (called under jit)."""

    def apply_group(self, block: Block, layer: int, names: tuple[str, ...], stats: dict) -> dict:
        """Rewrite the group's weights in ``block`` (e.g. ``block.attn.q_proj.kernel.value =``);
        ``stats`` maps each wanted name of ``names`` to its statistics. Returns a report dict."""


def sub_module(block: Block, name: str):
    """``'attn.q_proj'`` → the Linear inside ``block``."""
    m = block
    for part in name.split("."):
        m = getattr(m, part)
    return m


@nnx.jit(static_argnames=("tap",))
def _block_taps(block: Block, h_BxLxD, mask, rope, tap: str | None):
    taps: dict = {}
    out, _ = block(h_BxLxD, rope, mask, taps=taps)
    return out, (taps[tap] if tap else None)


def embed_windows(model: Llama, tokens_NxL: jax.Array, batch_size: int) -> jax.Array:
    """Block-0 inputs for every calibration window, [N, L, D] in the model's dtype."""
    embed = nnx.jit(lambda m, t: m.embed_tokens(t))
    parts = [
        embed(model, tokens_NxL[i : i + batch_size]) for i in range(0, len(tokens_NxL), batch_size)
    ]
    return jnp.concatenate(parts)


def calibrate(
    model: Llama,
    tokens_NxL: jax.Array,
    method: LayerMethod,
    *,
    batch_size: int = 8,
    progress: bool = True,
    on_block: Callable[[int, dict], None] | None = None,
) -> dict:
    """Run ``method`` over every block of ``model`` in place; returns {path: report}."""
    from tqdm.auto import tqdm

    if model.cfg.fused_projections:
        raise ValueError(
            "calibrate the unfused model (its q/k/v and gate/up linears), then fuse it "
            "(shrinkjax.models.fuse.fuse_projections)"
        )

    n, seqlen = tokens_NxL.shape
    h = embed_windows(model, tokens_NxL, batch_size)
    mask, rope = model.masks_and_rope(batch_size, seqlen)
    update = jax.jit(method.update_stats)
    reports: dict = {}
    bar = tqdm(range(len(model.layers)), desc="calibrate", unit="block", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        block = model.layers[i]
        for names in LINEAR_GROUPS:
            wanted = tuple(nm for nm in names if method.wants(f"layers.{i}.{nm}"))
            if not wanted:
                continue
            tap = LINEAR_INPUTS[wanted[0]]
            stats = {
                nm: method.init_stats(f"layers.{i}.{nm}", sub_module(block, nm).kernel.value)
                for nm in wanted
            }
            for s in range(0, n, batch_size):
                hb = h[s : s + batch_size]
                m_, r_ = (
                    (mask, rope) if len(hb) == batch_size else model.masks_and_rope(len(hb), seqlen)
                )
                _, x = _block_taps(block, hb, m_, r_, tap)
                x_TxK = x.reshape(-1, x.shape[-1])
                stats = {nm: update(st, x_TxK) for nm, st in stats.items()}
            rep = method.apply_group(block, i, wanted, stats) or {}
            for nm in wanted:
                reports[f"layers.{i}.{nm}"] = rep.get(nm, {})
        outs = []
        for s in range(0, n, batch_size):
            hb = h[s : s + batch_size]
            m_, r_ = (
                (mask, rope) if len(hb) == batch_size else model.masks_and_rope(len(hb), seqlen)
            )
            outs.append(_block_taps(block, hb, m_, r_, None)[0])
        h = jnp.concatenate(outs)
        if on_block is not None:
            on_block(i, {"seconds": time.perf_counter() - t0})
    return reports
