"""Orbax checkpoints of a :class:`~shrinkjax.train.state.TrainState`.

A checkpoint ``<dir>/<step>/`` holds the state's ``step``, ``params``, ``opt_state``, ``rng``
and ``masks`` (not the static graphdef, not the frozen teacher) plus a JSON ``meta`` (seed,
token count, anything the caller adds). Orbax writes into a temporary directory and renames it
on commit, so a process killed mid-save leaves the previous checkpoint as the latest. Saves are
asynchronous after the device-to-host copy; only the last ``keep`` are kept.

Restoring needs a template state (same structure; e.g. a freshly created one) and its
shardings: each array comes back with the sharding the jitted step expects.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from shrinkjax.train.state import TrainState


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(
        self,
        state: TrainState,
        meta: dict | None = None,
        *,
        step: int | None = None,
        force: bool = True,
    ) -> bool:
        step = int(jax.device_get(state.step)) if step is None else int(step)
        if step in self._mngr.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state.checkpoint_items()),
            meta=ocp.args.JsonSave(dict(meta or {}, step=step)),
        )
        return bool(self._mngr.save(step, args=args, force=force))

    def restore(
        self, template: TrainState, shardings: TrainState | None = None, step: int | None = None
    ) -> tuple[TrainState, dict]:
        """(state with the checkpoint's arrays, meta); the template supplies structure, the
        graphdef and the frozen teacher."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = template.checkpoint_items()
        shard_items = shardings.checkpoint_items() if shardings is not None else None

        def abstract(x, sh=None):
            sh = sh if sh is not None else getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

        if shard_items is None:
            target = jax.tree.map(abstract, items)
        else:
            target = jax.tree.map(abstract, items, shard_items)
        got = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return template.with_items(got["state"]), dict(got["meta"] or {})

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
