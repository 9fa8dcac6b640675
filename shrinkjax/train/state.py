"""The train state: the student as an NNX graphdef + flat parameter state, optimizer state,
step, RNG, optional pruning masks, and the frozen teacher.

``params`` is ``{"student": {"layers.0.attn.q_proj.kernel": f32 array, ...}, "proj": {...}}``
in the flat path form of :mod:`shrinkjax.models.params` (what pruning/quantization rules
match), f32 master weights whatever the compute dtype. ``proj`` holds the learned projections
of hidden-state distillation (empty without it). ``masks`` (None, or ``{name: array}`` over a
subset of the student's names) are applied after every update: the hook where gradual
pruning plugs in. ``frozen`` holds the teacher's parameters (compute dtype, never updated,
never checkpointed). The graphdef is a static field, so a ``TrainState`` is a pytree that
``jax.jit`` can shard and donate.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from shrinkjax.models.llama import Llama
from shrinkjax.models.params import nest


def flat_state(model: nnx.Module) -> dict:
    """{dotted path: array} of every parameter of ``model``."""
    from shrinkjax.models.params import flat_params

    return dict(flat_params(model))


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer updates done
    params: dict  # {"student": flat f32, "proj": flat f32}
    opt_state: Any
    rng: jax.Array  # uint32 [2] raw key
    masks: dict | None = None
    frozen: dict | None = None  # {"teacher": flat params}; not checkpointed
    graphdef: Any = struct.field(pytree_node=False, default=None)

    def student(self, dtype: str | None = None) -> Llama:
        """The student as an NNX model (sharing these arrays)."""
        model = nnx.merge(self.graphdef, nest(self.params["student"]))
        if dtype is not None and dtype != model.cfg.dtype:
            raise ValueError("use shrinkjax.models.params.model_from_params to change dtype")
        return model

    def checkpoint_items(self) -> dict:
        """What a checkpoint stores (everything but the static graphdef and the teacher)."""
        return {
            "step": self.step,
            "params": self.params,
            "opt_state": self.opt_state,
            "rng": self.rng,
            "masks": self.masks,
        }

    def with_items(self, items: dict) -> TrainState:
        return self.replace(
            step=items["step"],
            params=items["params"],
            opt_state=items["opt_state"],
            rng=items["rng"],
            masks=items.get("masks"),
        )


def schedule_from_config(tcfg) -> optax.Schedule:
    """Learning-rate schedule: constant | cosine | linear, each after linear warmup."""
    lr, warm, steps = float(tcfg.lr), int(tcfg.warmup_steps), int(tcfg.steps)
    floor = lr * float(tcfg.get("min_lr_ratio", 0.0))
    decay_steps = max(steps - warm, 1)
    kind = tcfg.schedule
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=floor / lr if lr else 0.0)
    elif kind == "linear":
        main = optax.linear_schedule(lr, floor, decay_steps)
    else:
        raise ValueError(f"train.schedule must be constant, cosine or linear; got {kind!r}")
    if warm <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def _decay_mask(params):
    # weight decay on matrices only (not norms, biases)
    return jax.tree.map(lambda x: np.ndim(x) >= 2, params)


def optimizer_from_config(tcfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, schedule): clipping by global norm, then the optimizer."""
    sched = schedule_from_config(tcfg)
    kind = tcfg.optimizer
    if kind == "adamw":
        opt = optax.adamw(
            sched,
            b1=tcfg.b1,
            b2=tcfg.b2,
            eps=tcfg.eps,
            weight_decay=tcfg.weight_decay,
            mask=_decay_mask,
        )
    elif kind == "adam":
        opt = optax.adam(sched, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps)
    elif kind == "sgd":
        opt = optax.sgd(sched, momentum=tcfg.get("momentum", 0.9) or None)
    elif kind == "lion":
        opt = optax.lion(
            sched, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay, mask=_decay_mask
        )
    else:
        raise ValueError(f"train.optimizer must be adamw, adam, sgd or lion; got {kind!r}")
    parts = []
    if tcfg.clip_norm and tcfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(tcfg.clip_norm)))
    parts.append(opt)
    return optax.chain(*parts), sched


def init_projections(student_cfg, teacher_cfg, pairs, seed: int) -> dict:
    """Learned [D_s, D_t] projections for hidden-state distillation when widths differ
    (identity-like init: the first min(D_s, D_t) coordinates map through)."""
    if not pairs or student_cfg.dim == teacher_cfg.dim:
        return {}
    ds, dt = student_cfg.dim, teacher_cfg.dim
    key = jax.random.PRNGKey(seed + 7919)
    out = {}
    for i, (s, t) in enumerate(pairs):
        w = jnp.eye(ds, dt, dtype=jnp.float32) + 0.01 * jax.random.normal(
            jax.random.fold_in(key, i), (ds, dt), jnp.float32
        )
        out[f"proj.{s}_{t}"] = w
    return out


def frozen_params(model, compute_dtype: str = "float32") -> dict:
    """Copies of a frozen model's flat params: matrices in the compute dtype, vectors f32."""
    dt = jnp.dtype(compute_dtype)
    return {
        k: jnp.array(v, dt if np.ndim(v) >= 2 else jnp.float32, copy=True)
        for k, v in flat_state(model).items()
    }


def create_train_state(
    student: Llama,
    optimizer: optax.GradientTransformation,
    *,
    seed: int,
    compute_dtype: str = "float32",
    attention_impl: str | None = None,
    teacher: Llama | None = None,
    proj: dict | None = None,
    masks: dict | None = None,
) -> TrainState:
    """A fresh state: f32 master copies of the student's parameters, a student graphdef whose
    config computes in ``compute_dtype``, and the teacher's parameters (compute dtype)."""
    from shrinkjax.models.llama import abstract_model

    cfg = student.cfg.replace(dtype=compute_dtype)
    if attention_impl:
        cfg = cfg.replace(attention_impl=attention_impl)
    graphdef = nnx.graphdef(abstract_model(cfg))
    # copies: the jitted step donates the state, which must not delete the caller's models
    params = {
        "student": {
            k: jnp.array(v, jnp.float32, copy=True) for k, v in flat_state(student).items()
        },
        "proj": dict(proj or {}),
    }
    frozen = None if teacher is None else {"teacher": frozen_params(teacher, compute_dtype)}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
        masks=masks,
        frozen=frozen,
        graphdef=graphdef,
    )
