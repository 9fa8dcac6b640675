"""Gradual magnitude pruning during training (Zhu & Gupta 2017, "To prune, or not to prune:
exploring the efficacy of pruning for model compression", arXiv:1710.01878).

Sparsity follows the cubic schedule (their Eq. 1)::

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n Δt))^3,   t in {t_0, t_0 + Δt, ..., t_0 + n Δt}

held constant between updates (every ``frequency`` = Δt steps), ``s_i`` before ``begin_step``
= t_0 and ``s_f`` from ``end_step`` = t_0 + n Δt on. At each update the masks are recomputed by
magnitude on the *masked* weights (so pruned weights, being zero, stay pruned), and after every
optimizer update the masks are re-applied. Masks are a plain pytree (``{path: bool array}``)
to keep in the training checkpoint beside the parameters.

The training loop (e.g. ``shrinkjax.train``) uses three pure, jittable functions::

    masks = init_masks(params, include)                      # once (all True), or restored
    for step in ...:
        params, opt_state = train_step(params, opt_state, batch)
        s = sparsity_at(step + 1, sched)                      # after `step + 1` updates
        if is_update_step(step + 1, sched):                   # (or every step: idempotent)
            masks = update_masks(params, masks, s)
        params = apply_masks(params, masks)                   # after *every* update
        # checkpoint {params, opt_state, masks}

``params`` may be a flat ``{path: array}`` dict (``models.params.flat_params``) or any pytree
whose leaf paths spell ``layers.0.attn.q_proj.kernel`` (nested dicts, ``nnx.State`` of
``nnx.Param``): leaves are matched to masks by their dotted path.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from shrinkjax.sparse.masks import parse_pattern, rank_mask

__all__ = [
    "DEFAULT_INCLUDE",
    "apply_masks",
    "gradual_hooks",
    "init_masks",
    "is_update_step",
    "make_mask_update",
    "mask_sparsity",
    "sparsity_at",
    "update_masks",
]

DEFAULT_INCLUDE = r"layers\.\d+\.(attn|mlp)\.\w+_proj\.kernel$"


def _get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def sparsity_at(step, cfg):
    """Target sparsity after ``step`` updates; ``cfg`` has ``initial_sparsity``,
    ``final_sparsity``, ``begin_step``, ``end_step`` and ``frequency`` (a ConfigDict, dict or
    object). Works on Python ints (returns a float) and traced steps (returns f32)."""
    s_i = float(_get(cfg, "initial_sparsity", 0.0))
    s_f = float(_get(cfg, "final_sparsity"))
    t0, t1 = int(_get(cfg, "begin_step", 0)), int(_get(cfg, "end_step"))
    freq = max(1, int(_get(cfg, "frequency", 1)))
    if t1 <= t0:
        raise ValueError(f"schedule end_step={t1} must be after begin_step={t0}")
    if not 0.0 <= s_i <= s_f < 1.0:
        raise ValueError(f"need 0 <= initial_sparsity={s_i} <= final_sparsity={s_f} < 1")
    if isinstance(step, int):
        t = min(max(step, t0), t1)
        t = t0 + (t - t0) // freq * freq if t < t1 else t1
        return s_f + (s_i - s_f) * (1.0 - (t - t0) / (t1 - t0)) ** 3
    t = jnp.clip(jnp.asarray(step), t0, t1)
    t = jnp.where(t < t1, t0 + (t - t0) // freq * freq, t1).astype(jnp.float32)
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / (t1 - t0)) ** 3


def is_update_step(step, cfg) -> bool:
    """Whether the masks change at ``step`` (a multiple of ``frequency`` inside the window)."""
    t0, t1 = int(_get(cfg, "begin_step", 0)), int(_get(cfg, "end_step"))
    freq = max(1, int(_get(cfg, "frequency", 1)))
    return t0 <= step <= t1 and ((step - t0) % freq == 0 or step == t1)


def _path_str(path) -> str:
    parts = []
    for k in path:
        k = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        parts.append(str(k))
    while parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return ".".join(parts)


def _map_masked(fn, params, masks):
    """Apply ``fn(leaf, mask)`` to every leaf of ``params`` that has a mask."""

    def one(path, leaf):
        m = masks.get(_path_str(path))
        return leaf if m is None else fn(leaf, m)

    return jax.tree_util.tree_map_with_path(one, params)


def _leaves(params) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {_path_str(p): v for p, v in flat}


def init_masks(params, include: str = DEFAULT_INCLUDE) -> dict:
    """All-True masks for every leaf whose dotted path matches ``include`` (a regex)."""
    rx = re.compile(include)
    return {k: jnp.ones(v.shape, bool) for k, v in _leaves(params).items() if rx.search(k)}


def update_masks(params, masks: dict, sparsity, pattern=None, per: str = "layer") -> dict:
    """New masks pruning exactly ``floor(sparsity * size)`` weights of each masked kernel by
    magnitude of the masked weights (``per="output"``: per output column instead). With an N:M
    ``pattern`` the N:M magnitude mask is returned (sparsity is then the pattern's)."""
    leaves = _leaves(params)
    missing = sorted(set(masks) - set(leaves))
    if missing:
        raise KeyError(f"masks for parameters not in params: {missing[:5]}")
    pat = parse_pattern(pattern) if pattern is not None else None
    out = {}
    for k, m in masks.items():
        score = jnp.abs(jnp.asarray(leaves[k], jnp.float32)) * m
        if pat is not None and pat.is_nm:
            from shrinkjax.sparse.masks import nm_mask

            out[k] = nm_mask(score, pat.n, pat.m)
        else:
            out[k] = rank_mask(score, sparsity, axis=0 if per == "output" else None)
    return out


def apply_masks(params, masks: dict):
    """``params`` with every masked kernel multiplied by its mask (same pytree structure)."""
    return _map_masked(lambda w, m: jnp.where(m, w, jnp.zeros((), w.dtype)), params, masks)


def mask_sparsity(masks: dict) -> float:
    """Fraction of pruned weights over all masks together."""
    total = sum(int(m.size) for m in masks.values())
    kept = sum(int(jnp.sum(m)) for m in masks.values())
    return 1.0 - kept / max(total, 1)


def make_mask_update(cfg, pattern=None, per: str = "layer"):
    """The training loop's hook ``mask_update(step, params, masks) -> masks``: recomputes the
    masks at ``sparsity_at(step)`` on update steps and returns ``masks`` itself otherwise."""
    upd = jax.jit(update_masks, static_argnames=("pattern", "per"))

    def mask_update(step, params, masks):
        if masks is None or not is_update_step(int(step), cfg):
            return masks
        return upd(params, masks, jnp.float32(sparsity_at(int(step), cfg)), pattern, per)

    return mask_update


def gradual_hooks(cfg, params, pattern=None, per: str = "layer"):
    """(initial all-True masks over ``cfg.include``-matching leaves of ``params``, hook)."""
    include = _get(cfg, "include", None) or DEFAULT_INCLUDE
    masks = init_masks(params, include)
    if not masks:
        raise ValueError(f"gradual pruning: no parameter matches include={include!r}")
    return masks, make_mask_update(cfg, pattern, per)
