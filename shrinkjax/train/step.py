"""The pure training step: ``train_step(state, batch) -> (state, metrics)``.

One call is one optimizer update. The batch is a dict of arrays:

* ``tokens`` int32 [B, L] (or [A, B/A, L] with ``grad_accum = A``: A microbatches scanned
  inside the step, their gradients summed, then one update; the result equals the [B, L]
  step up to float summation order);
* ``loss_mask`` bool, same shape: True where a token is a *target* to be predicted;
* optional ``ce_mask`` bool, same shape, a subset of ``loss_mask``: the targets whose
  hard-label cross entropy counts (default: all of ``loss_mask``); on-policy batches leave
  the student's own samples out (they are not labels) while the divergence scores them;
* optional ``loss_weights`` f32 [4] over (ce, fkl, rkl, jsd), ``tau`` and ``beta`` scalars:
  per-step loss mix (one compiled step serves several losses; see
  :func:`shrinkjax.distill.losses.loss_sums`).

The teacher (``state.frozen['teacher']``) runs its forward pass inside the same step under
``stop_gradient``; the student's logits and the teacher's are computed chunk by chunk from the
final hidden states (:func:`shrinkjax.distill.losses.loss_from_hidden`), so [B·L, V] logits
never exist at once. Decoder layers run in a ``lax.scan`` over stacked per-layer parameters
(one compiled block, fast compiles) with optional rematerialisation.

``jit_train_step`` wraps the step in ``jax.jit`` with ``NamedSharding``s from
:mod:`shrinkjax.parallel.mesh` and donates the state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from shrinkjax.distill import losses
from shrinkjax.kernels import dispatch
from shrinkjax.models.llama import LlamaConfig, abstract_model
from shrinkjax.models.params import nest
from shrinkjax.parallel import mesh as meshlib
from shrinkjax.train.state import TrainState

REMAT = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    loss: losses.LossConfig = losses.LossConfig()
    grad_accum: int = 1
    hidden_weight: float = 0.0  # weight of hidden-state MSE (added to the logit loss)
    hidden_pairs: tuple[tuple[int, int], ...] = ()  # (student layer, teacher layer) outputs
    scan_layers: bool = True
    remat: str = "none"  # none | full (recompute each block) | dots (save matmul outputs)
    with_kl: bool = True  # report KL(p_T‖p_S) at τ=1 when a teacher is present
    # bf16 compute: backward GEMMs of dense linears in bf16 (dispatch.mixed_matmul) instead
    # of autodiff's f32 ones (configs/distill turn it on: 1.40x the H100 step, same quality)
    low_precision_backward: bool = False

    def __post_init__(self):
        if self.remat not in REMAT:
            raise ValueError(f"remat must be one of {REMAT}, got {self.remat!r}")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be >= 1")


# ----------------------------------------------------------------------------- forward


class Forward:
    """Functional forward pass of a Llama given flat params (built once per config)."""

    def __init__(self, cfg: LlamaConfig, scan_layers: bool = True, remat: str = "none"):
        self.cfg = cfg
        abstract = abstract_model(cfg)
        self.graphdef = nnx.graphdef(abstract)
        self.block_graphdef = nnx.graphdef(abstract.layers[0])
        self.scan_layers = scan_layers
        self.remat = remat

    def model(self, flat: dict):
        return nnx.merge(self.graphdef, nest(flat))

    def _block_fn(self, rope, mask):
        gd = self.block_graphdef

        def f(layer_flat, h):
            return nnx.merge(gd, nest(layer_flat))(h, rope, mask)[0]

        if self.remat == "full":
            return jax.checkpoint(f)
        if self.remat == "dots":
            return jax.checkpoint(
                f, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            )
        return f

    def hidden(self, flat: dict, tokens_BxL, collect: tuple[int, ...] = ()):
        """(final hidden states [B, L, D] before the last norm, {layer: output of layer})."""
        model = self.model(flat)
        b, l = tokens_BxL.shape
        h = model.embed_tokens(tokens_BxL)
        mask, rope = model.masks_and_rope(b, l)
        block = self._block_fn(rope, mask)
        n = self.cfg.n_layers
        layer_flat = [
            {k[len(f"layers.{i}.") :]: v for k, v in flat.items() if k.startswith(f"layers.{i}.")}
            for i in range(n)
        ]
        taps = {}
        if self.scan_layers and n > 1:
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_flat)

            def body(h, p):
                h = block(p, h)
                return h, (h if collect else None)

            h, ys = jax.lax.scan(body, h, stacked)
            taps = {i: ys[i] for i in collect}
        else:
            for i in range(n):
                h = block(layer_flat[i], h)
                if i in collect:
                    taps[i] = h
        return h, taps

    def head(self, flat: dict) -> Callable:
        """Chunk head: hidden [C, D] -> f32 logits [C, V] (final norm + LM head)."""
        model = self.model(flat)
        return lambda h_CxD: model.logits(h_CxD[None])[0]

    def logits(self, flat: dict, tokens_BxL):
        h, _ = self.hidden(flat, tokens_BxL)
        return self.model(flat).logits(h)


# ----------------------------------------------------------------------------- step


def default_apply_masks(params: dict, masks: dict) -> dict:
    """params ⊙ masks for the masked names (the rest unchanged)."""
    return {k: (v * masks[k].astype(v.dtype) if k in masks else v) for k, v in params.items()}


def make_train_step(
    student_cfg: LlamaConfig,
    optimizer: optax.GradientTransformation,
    step_cfg: StepConfig = StepConfig(),
    teacher_cfg: LlamaConfig | None = None,
    schedule: optax.Schedule | None = None,
    apply_masks: Callable[[dict, dict], dict] | None = None,
) -> Callable:
    """``train_step(state, batch) -> (state, metrics)`` (pure; jit it with
    :func:`jit_train_step`). ``student_cfg``/``teacher_cfg`` carry the compute dtype and the
    attention implementation. ``apply_masks(params, masks)`` runs after every update when the
    state has masks (default: elementwise product)."""
    sfwd = Forward(student_cfg, step_cfg.scan_layers, step_cfg.remat)
    tfwd = Forward(teacher_cfg, step_cfg.scan_layers, "none") if teacher_cfg else None
    lcfg = step_cfg.loss
    hidden_on = step_cfg.hidden_weight > 0 and step_cfg.hidden_pairs
    if hidden_on and tfwd is None:
        raise ValueError("hidden-state distillation needs a teacher")
    s_collect = tuple(sorted({s for s, _ in step_cfg.hidden_pairs})) if hidden_on else ()
    t_collect = tuple(sorted({t for _, t in step_cfg.hidden_pairs})) if hidden_on else ()
    mask_fn = apply_masks or default_apply_masks

    def micro_loss(params, frozen, tokens, loss_mask, count, dyn, ce_mask=None):
        labels, mask = losses.next_token_targets(tokens, loss_mask)
        ce_m = None
        if ce_mask is not None:
            ce_m = losses.next_token_targets(tokens, ce_mask & loss_mask)[1]
        hs, s_taps = sfwd.hidden(params["student"], tokens, s_collect)
        need_teacher = dyn.get("loss_weights") is not None or lcfg.needs_teacher or hidden_on
        ht = t_head = None
        t_taps = {}
        if need_teacher:
            if tfwd is None or frozen is None:
                raise ValueError("this loss needs a teacher, but the step has none")
            tparams = jax.lax.stop_gradient(frozen["teacher"])
            ht, t_taps = tfwd.hidden(tparams, tokens, t_collect)
            ht = jax.lax.stop_gradient(ht)
            t_head = tfwd.head(tparams)
        weights = dyn.get("loss_weights")
        tau = dyn.get("tau", lcfg.tau)
        beta = dyn.get("beta", lcfg.beta)
        s_head = sfwd.head(params["student"])
        if t_head is None or (weights is None and not lcfg.needs_teacher):
            arrays = (hs.reshape(-1, hs.shape[-1]), labels.reshape(-1))
            head = lambda h, y: (s_head(h), None, y)
        else:
            arrays = (
                hs.reshape(-1, hs.shape[-1]),
                ht.reshape(-1, ht.shape[-1]),
                labels.reshape(-1),
            )
            head = lambda h, g, y: (s_head(h), t_head(g), y)
        sums = losses.loss_sums(
            head,
            arrays,
            mask,
            lcfg,
            weights=weights,
            tau=tau,
            beta=beta,
            with_kl=step_cfg.with_kl,
            ce_mask=ce_m,
        )
        w = lcfg.weights() if weights is None else weights
        loss, parts = losses.blend(sums, w, tau, count=count)
        if hidden_on:
            hm = []
            for s, t in step_cfg.hidden_pairs:
                p = params["proj"].get(f"proj.{s}_{t}")
                hm.append(losses.hidden_mse(s_taps[s], t_taps[t], mask, p))
            # hidden_mse is a per-microbatch mean: weight it by this microbatch's share
            share = jnp.sum(mask.astype(jnp.float32)) / jnp.maximum(count, 1.0)
            hidden = sum(hm) / len(hm) * share
            parts["hidden"] = hidden
            loss = loss + step_cfg.hidden_weight * hidden
        parts.pop("tokens", None)
        return loss, parts

    def traced_loss(*args):
        with dispatch.low_precision_backward(step_cfg.low_precision_backward):
            return micro_loss(*args)

    grad_fn = jax.value_and_grad(traced_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        tokens, loss_mask, ce_mask = batch["tokens"], batch["loss_mask"], batch.get("ce_mask")
        dyn = {k: batch[k] for k in ("loss_weights", "tau", "beta") if k in batch}
        _, m = losses.next_token_targets(
            tokens.reshape(-1, tokens.shape[-1]), loss_mask.reshape(-1, tokens.shape[-1])
        )
        count = jnp.sum(m.astype(jnp.float32))
        if step_cfg.grad_accum == 1:
            (loss, parts), grads = grad_fn(
                state.params, state.frozen, tokens, loss_mask, count, dyn, ce_mask
            )
        else:
            if tokens.ndim != 3 or tokens.shape[0] != step_cfg.grad_accum:
                raise ValueError(
                    f"grad_accum={step_cfg.grad_accum} needs tokens "
                    f"[{step_cfg.grad_accum}, B/A, L], got {tokens.shape}"
                )

            def body(carry, mb):
                (l, p), g = grad_fn(state.params, state.frozen, mb[0], mb[1], count, dyn, mb[2])
                acc_l, acc_p, acc_g = carry
                return (
                    acc_l + l,
                    jax.tree.map(jnp.add, acc_p, p),
                    jax.tree.map(jnp.add, acc_g, g),
                ), None

            shapes = jax.eval_shape(
                lambda: grad_fn(
                    state.params,
                    state.frozen,
                    tokens[0],
                    loss_mask[0],
                    count,
                    dyn,
                    None if ce_mask is None else ce_mask[0],
                )
            )
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            init = (zeros[0][0], zeros[0][1], zeros[1])
            (loss, parts, grads), _ = jax.lax.scan(body, init, (tokens, loss_mask, ce_mask))
            # parts summed over microbatches are per-token means already (count = total)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if state.masks is not None:
            params = {**params, "student": mask_fn(params["student"], state.masks)}
        finite = jnp.isfinite(loss)
        # a non-finite step leaves the state as it was (the loop stops on it)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params = keep(params, state.params)
        opt_state = keep(opt_state, state.opt_state)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=jax.random.split(state.rng)[0],
        )
        metrics = {
            "loss": loss,
            **parts,
            "grad_norm": optax.global_norm(grads),
            "tokens": count,
            "finite": finite,
        }
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    return train_step


def state_shardings(mesh, state: TrainState) -> TrainState:
    """NamedShardings for every leaf of the state (FSDP rule; step and rng replicated)."""
    rep = meshlib.replicated(mesh)
    return state.replace(
        step=rep,
        params=meshlib.param_shardings(mesh, state.params),
        opt_state=meshlib.param_shardings(mesh, state.opt_state),
        rng=rep,
        masks=None if state.masks is None else meshlib.param_shardings(mesh, state.masks),
        frozen=None if state.frozen is None else meshlib.param_shardings(mesh, state.frozen),
    )


def shard_state(state: TrainState, shardings: TrainState) -> TrainState:
    return jax.device_put(state, shardings)


def jit_train_step(
    train_step: Callable, mesh, state: TrainState, example_batch: dict, batch_axis: int = 0
):
    """(jitted step, state shardings, batch shardings): in/out shardings from the mesh, the
    state donated (argument 0)."""
    s_sh = state_shardings(mesh, state)
    b_sh = meshlib.batch_shardings(mesh, example_batch, batch_axis)
    rep = meshlib.replicated(mesh)
    step = jax.jit(
        train_step, in_shardings=(s_sh, b_sh), out_shardings=(s_sh, rep), donate_argnums=0
    )
    return step, s_sh, b_sh
