"""Epoch loops: one pass over the training set, evaluation over a whole split."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from flax_resnet.training.devices import shard_batch
from flax_resnet.training.state import TrainState, eval_step, train_step


def train_epoch(
    state: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    epoch: int,
    seed: int = 0,
    max_shift: int = 0,
    label_smoothing: float = 0.0,
    mesh: Mesh | None = None,
    progress: Callable[[int, dict], None] | None = None,
):
    """One pass over the training set (remainder dropped), in ``(seed, epoch)`` order.

    Returns ``(state, {"train_loss", "train_accuracy", "images_per_sec",
    "steps", "seconds"})``; ``images_per_sec`` leaves out the first step of
    the epoch (which carries any compilation). ``progress(step, metrics)``
    is called after each step.
    """
    from flax_resnet.data import batches

    losses, accs = [], []
    t_first = t0 = time.perf_counter()
    steps = 0
    for x, y in batches(images, labels, batch_size, seed=seed, epoch=epoch, max_shift=max_shift):
        x, y = shard_batch(mesh, x, y)
        state, m = train_step(state, x, y, label_smoothing=float(label_smoothing))
        steps += 1
        losses.append(m["loss"])
        accs.append(m["accuracy"])
        if steps == 1:
            jax.block_until_ready(m["loss"])
            t_first = time.perf_counter()
        if progress is not None:
            progress(steps, m)
    if steps == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {len(labels)} training images")
    jax.block_until_ready(state.params)
    t_end = time.perf_counter()
    timed_steps, timed_s = (steps - 1, t_end - t_first) if steps > 1 else (1, t_end - t0)
    return state, {
        "train_loss": float(np.mean(jax.device_get(losses))),
        "train_accuracy": float(np.mean(jax.device_get(accs))),
        "images_per_sec": timed_steps * batch_size / max(timed_s, 1e-9),
        "steps": steps,
        "seconds": t_end - t0,
    }


def evaluate(state: TrainState, images: np.ndarray, labels: np.ndarray, batch_size: int, mesh: Mesh | None = None):
    """Eval-mode loss and accuracy over all of ``images`` (last batch padded and masked)."""
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    n = len(labels)
    if mesh is not None:
        batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    sums = []
    for start in range(0, n, batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        k = len(y)
        mask = np.zeros(batch_size, np.float32)
        mask[:k] = 1
        if k < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - k,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(batch_size - k, y.dtype)])
        sums.append(eval_step(state, *shard_batch(mesh, x, y, mask)))
    for s in jax.device_get(sums):
        for k in totals:
            totals[k] += float(s[k])
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count, "count": int(totals["count"])}
