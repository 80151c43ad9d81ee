"""Orbax checkpoints of a whole train state, one per epoch."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from flax_resnet.training.state import TrainState

PyTree = Any



def _abstract(tree: PyTree, sharding=None) -> PyTree:
    default = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or default)
        x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree.map(leaf, tree)


class _RoutineWaits(logging.Filter):
    """Drops Orbax's "Waiting for previous save to complete took N seconds" (absl WARNING).

    Saving once per epoch while the next epoch trains, each save waits for
    the last one by design; the warning would print once per epoch.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Waiting for previous save")


_ROUTINE_WAITS = _RoutineWaits()


class CheckpointRestoreError(ValueError):
    """No checkpoint of a directory restores into the given state."""


def _reason(exc: BaseException) -> str:
    """One line for an Orbax failure: the innermost cause's type and first line."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    first = (str(exc).strip().splitlines() or [""])[0]
    first = first if len(first) <= 160 else first[:157] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class Checkpointer:
    """Orbax checkpoints of a whole ``TrainState``, one per epoch.

    Saves ``step``, ``params``, ``batch_stats`` and ``opt_state`` plus a
    JSON ``meta`` dict (epoch, seed, anything else). Restoring needs a
    template state built the same way (same model and optimizer); arrays come
    back with the template's shardings, so a replicated template restores a
    replicated state.

    Attributes:
        directory: the absolute checkpoint directory.
        manager: the ``orbax.checkpoint.CheckpointManager``.
        skipped: ``(epoch, reason)`` of the damaged checkpoints the last
            ``restore`` passed over.

    Usage::

        ckpt = Checkpointer(workdir + "/checkpoints")
        ckpt.save(epoch, state, {"seed": 0})
        state, meta = ckpt.restore(state)          # latest epoch
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 2):
        import orbax.checkpoint as ocp

        logging.getLogger("absl").addFilter(_ROUTINE_WAITS)  # addFilter adds it only once
        self._ocp = ocp
        self.skipped: list[tuple[int, str]] = []
        self.directory = os.path.abspath(os.fspath(directory))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "meta"),
        )

    @staticmethod
    def _items(state: TrainState) -> dict:
        return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}

    def save(self, epoch: int, state: TrainState, meta: dict | None = None, wait: bool = True) -> None:
        """Saves ``state`` as checkpoint ``epoch`` (the number of finished epochs)."""
        ocp = self._ocp
        meta = {"epoch": int(epoch), **(meta or {})}
        self.manager.save(
            int(epoch),
            args=ocp.args.Composite(state=ocp.args.StandardSave(self._items(state)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()

    def latest_epoch(self) -> int | None:
        """The newest checkpoint's epoch, or None when there is none."""
        return self.manager.latest_step()

    def all_epochs(self) -> list[int]:
        """Epochs of every checkpoint in the directory, oldest first."""
        return sorted(self.manager.all_steps())

    def delete(self, epoch: int) -> None:
        """Removes checkpoint ``epoch`` (e.g. a damaged one ``restore`` skipped, before it is written again)."""
        self.manager.delete(int(epoch))

    def read_meta(self, epoch: int | None = None) -> dict:
        """The JSON ``meta`` of checkpoint ``epoch`` (default: the latest), without reading any array."""
        epoch = self._epoch(epoch)
        return dict(self.manager.restore(int(epoch), args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))["meta"])

    def _epoch(self, epoch: int | None) -> int:
        if epoch is None:
            epoch = self.latest_epoch()
            if epoch is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return epoch

    def restore(self, state: TrainState, epoch: int | None = None, sharding=None) -> tuple[TrainState, dict]:
        """``(state, meta)`` of checkpoint ``epoch`` into ``state``'s structure.

        Without ``epoch``, the newest checkpoint that restores: a damaged
        latest one (a crash mid-write, a truncated file) is skipped for the
        one before it, and ``skipped`` lists ``(epoch, reason)`` of each one
        passed over. ``state`` may be abstract,
        ``jax.eval_shape(lambda: create_train_state(...))``, which skips
        initializing weights that are about to be overwritten; its leaves are
        then placed with ``sharding`` (default: the first device; pass
        ``NamedSharding(mesh, P())`` to restore replicated).

        Raises:
            FileNotFoundError: no checkpoint at all.
            CheckpointRestoreError: none of them restores (the newest's reason).
        """
        self.skipped = []
        epochs = [self._epoch(epoch)] if epoch is not None else sorted(self.all_epochs(), reverse=True)
        if not epochs:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = _abstract(self._items(state), sharding)
        for e in epochs:
            try:
                restored = self.manager.restore(
                    int(e),
                    args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(target), meta=self._ocp.args.JsonRestore()),
                )
                break
            except Exception as exc:  # noqa: BLE001 - Orbax raises many types for a damaged directory
                self.skipped.append((int(e), _reason(exc)))
        else:
            e, why = self.skipped[0]
            raise CheckpointRestoreError(f"cannot restore {os.path.join(self.directory, str(e))}: {why}")
        return state.replace(**restored["state"]), dict(restored["meta"])

    def close(self) -> None:
        """Waits for asynchronous saves to finish, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
