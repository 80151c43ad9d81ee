"""Epoch loops: one pass over the training set, evaluation over a whole split."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.sharding import Mesh

from flax_resnet.data import batches as data_batches
from flax_resnet.training.devices import shard_batch
from flax_resnet.training.state import TrainState, eval_step, train_step


def run_epoch(
    step: Callable[[jax.Array, jax.Array], dict],
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    epoch: int,
    seed: int = 0,
    max_shift: int = 0,
    mesh: Mesh | None = None,
    progress: Callable[[int, dict], None] | None = None,
    batches: Iterable[tuple[np.ndarray, np.ndarray]] | None = None,
    place: Callable[..., Any] | None = None,
) -> dict:
    """Drives ``step(x, y) -> {"loss", "accuracy"}`` over one epoch; any front end's step (Linen state, NNX module).

    Batches come from ``flax_resnet.data.batches`` in ``(seed, epoch)``
    order (remainder dropped), placed by ``shard_batch(mesh, ...)``. Returns
    ``{"train_loss", "train_accuracy", "images_per_sec", "steps",
    "seconds"}``; ``images_per_sec`` leaves out the first step (which
    carries any compilation). ``progress(step, metrics)`` is called after
    each step. A streaming pipeline passes its own ``batches`` (the arrays
    are then unused) and ``place`` (see ``run_batches``).

    Raises:
        ValueError: the batch is larger than the training set.
    """
    if batches is None:
        batches = data_batches(images, labels, batch_size, seed=seed, epoch=epoch, max_shift=max_shift)
    metrics = run_batches(step, batches, mesh=mesh, progress=progress, place=place)
    if metrics["steps"] == 0 and labels is not None:
        raise ValueError(f"batch size {batch_size} is larger than the {len(labels)} training images")
    return metrics


def run_batches(
    step: Callable[[jax.Array, jax.Array], dict],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    mesh: Mesh | None = None,
    progress: Callable[[int, dict], None] | None = None,
    place: Callable[..., Any] | None = None,
) -> dict:
    """Drives ``step`` over host batches ``(x, y)``; ``run_epoch``'s metrics (``steps`` may be 0).

    ``place(mesh, x, y)`` puts a batch on the devices (default
    ``shard_batch``: every host holds the global batch; a pipeline that
    reads only this host's shard passes ``place_local_batch``).
    """
    place = place or shard_batch
    losses, accs = [], []
    t_first = t0 = time.perf_counter()
    steps = images_seen = 0
    for x, y in batches:
        m = step(*place(mesh, x, y))
        steps += 1
        images_seen += len(y)
        losses.append(m["loss"])
        accs.append(m["accuracy"])
        if steps == 1:
            jax.block_until_ready(m["loss"])
            t_first = time.perf_counter()
        if progress is not None:
            progress(steps, m)
    if steps == 0:
        return {"train_loss": float("nan"), "train_accuracy": float("nan"), "images_per_sec": 0.0, "steps": 0, "seconds": 0.0}
    jax.block_until_ready((losses, accs))
    t_end = time.perf_counter()
    batch_size = images_seen // steps
    timed_steps, timed_s = (steps - 1, t_end - t_first) if steps > 1 else (1, t_end - t0)
    return {
        "train_loss": float(np.mean(jax.device_get(losses))),
        "train_accuracy": float(np.mean(jax.device_get(accs))),
        "images_per_sec": timed_steps * batch_size / max(timed_s, 1e-9),
        "steps": steps,
        "seconds": t_end - t0,
    }


def run_eval(eval_fn: Callable[..., dict], images: np.ndarray, labels: np.ndarray, batch_size: int, mesh: Mesh | None = None) -> dict:
    """Sums ``eval_fn(x, y, mask) -> {"loss", "correct", "count"}`` over all of ``images``; any front end's eval step.

    The last batch is padded to the compiled shape and masked; the batch is
    rounded up to a multiple of the mesh's devices. Returns ``{"loss",
    "accuracy", "count"}``.
    """
    if mesh is not None:
        batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    chunks = ((images[s : s + batch_size], labels[s : s + batch_size]) for s in range(0, len(labels), batch_size))
    return run_eval_batches(eval_fn, chunks, batch_size, mesh)


def run_eval_batches(
    eval_fn: Callable[..., dict], batches: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int, mesh: Mesh | None = None, place: Callable[..., Any] | None = None
) -> dict:
    """``run_eval`` over host batches of at most ``batch_size`` (each padded to it and masked); ``place`` as in ``run_batches``."""
    place = place or shard_batch
    sums = []
    for x, y in batches:
        k = len(y)
        mask = np.zeros(batch_size, np.float32)
        mask[:k] = 1
        if k < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - k,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(batch_size - k, y.dtype)])
        sums.append(eval_fn(*place(mesh, x, y, mask)))
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for s in jax.device_get(sums):
        for key in totals:
            totals[key] += float(s[key])
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count, "count": int(totals["count"])}


def train_epoch(state: TrainState, images: np.ndarray, labels: np.ndarray, batch_size: int, *, label_smoothing: float = 0.0, **loop: Any):
    """One pass of ``train_step`` over the training set; returns ``(state, metrics)``.

    ``loop``: ``run_epoch``'s keywords, ``epoch`` (required), ``seed``,
    ``max_shift``, ``mesh`` and ``progress``; the metrics are its.
    """
    holder = [state]

    def step(x, y):
        holder[0], m = train_step(holder[0], x, y, label_smoothing=float(label_smoothing))
        return m

    metrics = run_epoch(step, images, labels, batch_size, **loop)
    jax.block_until_ready(holder[0].params)
    return holder[0], metrics


def evaluate(state: TrainState, images: np.ndarray, labels: np.ndarray, batch_size: int, mesh: Mesh | None = None):
    """Eval-mode loss and accuracy of ``state`` over all of ``images`` (``run_eval`` of ``eval_step``)."""
    return run_eval(lambda x, y, mask: eval_step(state, x, y, mask), images, labels, batch_size, mesh)
