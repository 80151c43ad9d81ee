"""The grain pipeline: decode -> augment -> normalize -> NHWC batches, checkpointable and sharded per host.

Training records go through ``TrainTransform`` (decode, RandomResizedCrop to
``size`` and a horizontal flip as torchvision's and timm's default training
transform, then the weights' mean/std); evaluation records through
``EvalTransform`` (``flax_resnet.preprocess.apply``: the weights' own resize
and center crop, scaled to ``size``). Randomness comes from grain's
per-record generator, seeded by ``(seed, epoch)`` and the record's index, so
a batch's pixels do not depend on the number of workers or on resuming.

Augmentations (``--augment``):

* ``standard``: ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))``
  and a flip with probability 1/2 (torchvision's ImageNet training preset);
* ``light``: the same with ``scale=(0.35, 1)`` (for small images and small
  data sets, where 8% crops lose the object);
* ``none``: the evaluation transform (resize, center crop), no flip.
"""

from __future__ import annotations

import json
import sys
from typing import Iterator

import numpy as np

from flax_resnet.imagedata.transforms import AUGMENTS, RATIO, BadImage, Recipe, decode, eval_preprocess, rrc_box  # noqa: F401 - the pipeline's public names


def _grain():
    try:
        import grain
    except ModuleNotFoundError:
        raise ModuleNotFoundError("streaming image folders needs grain: pip install 'flax-resnet[data]'", name="grain") from None
    return grain


def _loader(records, ops, *, sampler, workers: int, prefetch: int):
    """A ``grain.DataLoader`` of single records; ``prefetch`` records are kept ready per worker (a bounded read-ahead in-process)."""
    grain = _grain()
    if workers:
        from absl import flags  # grain's workers read absl flags; a program that never parsed them gets the defaults

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=records,
        sampler=sampler,
        operations=ops,
        worker_count=workers,
        worker_buffer_size=max(1, prefetch),
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(1, min(prefetch, 128))),
    )


class TrainStream:
    """Training batches, epoch after epoch, from one grain ``DataLoader`` (workers start once per run).

    The sampler walks ``records`` in a new seeded order each epoch (grain's
    ``IndexSampler``, ``num_epochs=None``) and each record is augmented with
    its own generator (``seed`` and the record's position in the stream), so
    batches do not depend on ``workers``. Batches are stacked here, in this
    process: an epoch is exactly the shard's records, its last partial
    batch dropped; records that failed to decode under ``on_bad="skip"``
    are counted (``skipped``) and left out. ``state()`` is everything needed
    to continue mid-epoch: grain's iterator state plus the position in the
    epoch.

    Under ``jax.distributed`` each process reads its own shard
    (``ShardByJaxProcess``) and yields ``batch_size`` rows: the global batch
    over ``jax.process_count()``.
    """

    def __init__(self, records, recipe: Recipe, batch_size: int, *, seed: int = 0, workers: int = 0, prefetch: int = 2, shard: bool = True):
        grain = _grain()
        from flax_resnet.imagedata.ops import TrainTransform

        opts = grain.sharding.ShardByJaxProcess(drop_remainder=True) if shard else grain.sharding.NoSharding()
        sampler = grain.samplers.IndexSampler(len(records), shard_options=opts, shuffle=True, num_epochs=None, seed=seed)
        self.per_epoch = len(records) // (opts.shard_count if shard else 1)
        self.batch_size = batch_size
        self.steps_per_epoch = self.per_epoch // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch {batch_size} is larger than the {self.per_epoch} training images of this process")
        self.workers = workers
        self._make = lambda w: _loader(records, [TrainTransform(recipe)], sampler=sampler, workers=w, prefetch=prefetch * batch_size)
        self.loader = self._make(workers)
        self._it = None
        self.epoch, self.pos, self.step = 0, 0, 0
        self.skipped: list[str] = []

    def restore(self, state: dict | None) -> None:
        """Starts the iterator, at ``state`` (from ``state()``) when given."""
        if state:
            saved = int(json.loads(state["iterator"]).get("worker_count", self.workers))
            if saved != self.workers:  # grain's state is per worker: finish with the run's count
                print(f"resuming with {saved} data workers, as the run was started (not {self.workers})", file=sys.stderr, flush=True)
                self.workers, self.loader = saved, self._make(saved)
        self._it = iter(self.loader)
        if state:
            self._it.set_state(state["iterator"].encode())
            self.epoch, self.pos, self.step = int(state["epoch"]), int(state["pos"]), int(state["step"])
            self.skipped = list(state.get("skipped", []))

    def close(self) -> None:
        """Stops the worker processes (dropping the iterator is how grain shuts them down)."""
        import gc

        self._it = None
        gc.collect()

    def state(self) -> dict:
        """JSON-able: grain's iterator state and where in which epoch it stands."""
        return {"iterator": self._it.get_state().decode(), "epoch": self.epoch, "pos": self.pos, "step": self.step, "skipped": self.skipped[-100:]}

    def _next(self):
        self.pos += 1
        return next(self._it)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The rest of the current epoch's batches; afterwards the stream stands at the next epoch."""
        if self._it is None:
            self.restore(None)
        while self.per_epoch - self.pos >= self.batch_size:
            xs, ys = [], []
            while len(ys) < self.batch_size and self.pos < self.per_epoch:
                rec = self._next()
                if isinstance(rec, str):
                    self.skipped.append(rec)
                    print(f"skipping {rec}", file=sys.stderr, flush=True)
                    continue
                xs.append(rec[0])
                ys.append(rec[1])
            if len(ys) < self.batch_size:
                break
            self.step += 1
            yield np.stack(xs), np.asarray(ys, np.int32)
        while self.pos < self.per_epoch:  # the dropped remainder
            self._next()
        self.epoch, self.pos, self.step = self.epoch + 1, 0, 0


def eval_batches(records, recipe: Recipe, batch_size: int, *, workers: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The evaluation transform over every record, in order, in batches (the last one short); bad records per ``recipe.on_bad``."""
    grain = _grain()
    from flax_resnet.imagedata.ops import EvalTransform

    sampler = grain.samplers.IndexSampler(len(records), shuffle=False, num_epochs=1)
    xs, ys = [], []
    for rec in _loader(records, [EvalTransform(recipe)], sampler=sampler, workers=0, prefetch=batch_size):
        if isinstance(rec, str):
            print(f"skipping {rec}", file=sys.stderr, flush=True)
            continue
        xs.append(rec[0])
        ys.append(rec[1])
        if len(ys) == batch_size:
            yield np.stack(xs), np.asarray(ys, np.int32)
            xs, ys = [], []
    if ys:
        yield np.stack(xs), np.asarray(ys, np.int32)


def eval_shard(records):
    """This process's share of an evaluation split (every ``process_count``-th record); the rest is other hosts'."""
    import jax

    from flax_resnet.imagedata.sources import _Indexed

    n, p, k = len(records), jax.process_count(), jax.process_index()
    return records if p == 1 else _Indexed(records, np.arange(k, n, p))
