"""The one data interface of ``flax-resnet train``: in-memory arrays or a grain stream of image files.

``open_data(...)`` picks by what ``--data``/``--dataset`` names: ``digits``
or a ``.npz`` -> ``ArrayData`` (``flax_resnet.data``, held in memory); an
image folder or a Hugging Face ``datasets`` directory -> ``ImageData`` (the
grain pipeline of ``flax_resnet.imagedata.pipeline``). Both give
``train_batches(epoch)``, ``eval_batches(batch_size)``, ``place`` (how a
host batch reaches the devices) and what a run records about its data.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator

import numpy as np

from flax_resnet import preprocess as pp


class ArrayData:
    """A ``flax_resnet.data.Dataset`` in memory: every host holds the global batch (``shard_batch``)."""

    streaming = False

    def __init__(self, ds, batch_size: int, seed: int, max_shift: int):
        self.ds, self.batch_size, self.seed, self.max_shift = ds, batch_size, seed, max_shift
        self.name, self.num_classes, self.image_shape = ds.name, ds.num_classes, ds.image_shape
        self.classes = None
        self.steps_per_epoch = len(ds.train_labels) // batch_size
        self.identity = ds.name
        self.num_train = len(ds.train_labels)

    @property
    def place(self):
        from flax_resnet.training import shard_batch

        return shard_batch

    def host_batch(self, batch_size: int) -> int:
        """Rows of a global batch that this process passes (every host passes the whole batch)."""
        return batch_size

    def train_batches(self, epoch: int) -> Iterator:
        from flax_resnet.data import batches

        return batches(self.ds.train_images, self.ds.train_labels, self.batch_size, seed=self.seed, epoch=epoch, max_shift=self.max_shift)

    def eval_batches(self, batch_size: int) -> Iterator:
        x, y = self.ds.test_images, self.ds.test_labels
        return ((x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(y), batch_size))

    def state(self) -> dict | None:
        return None

    def restore(self, state: dict | None) -> None:
        pass

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return repr(self.ds)


def _dataset_stats(records, recipe, limit: int = 256, seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] of up to ``limit`` seeded training images after the eval resize/crop."""
    from flax_resnet.imagedata.transforms import BadImage, decode

    raw = pp.Preprocess(**{**recipe.eval_pp.__dict__, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})
    idx = np.random.default_rng(seed).permutation(len(records))[:limit]
    xs = []
    for i in idx:
        try:
            xs.append(pp.apply(np.asarray(decode(records[int(i)][0])), raw))
        except BadImage:
            continue
    x = np.stack(xs).astype(np.float64)
    return tuple(float(v) for v in x.mean((0, 1, 2))), tuple(float(max(v, 1e-3)) for v in x.std((0, 1, 2)))


class ImageData:
    """An image folder or ``datasets`` directory streamed by grain; each process reads its own shard.

    Attributes:
        splits: the ``sources.Splits`` (train, val, classes).
        recipe: the ``pipeline.Recipe`` (size, augmentation, normalization).
        stream: the ``pipeline.TrainStream`` of training batches.
    """

    streaming = True

    def __init__(self, splits, recipe, batch_size: int, *, seed: int, workers: int, prefetch: int, name: str):
        import jax

        from flax_resnet.imagedata.pipeline import TrainStream

        self.splits, self.recipe, self.workers = splits, recipe, workers
        self.name, self.classes = name, splits.classes
        self.num_classes = len(splits.classes)
        self.image_shape = (recipe.size, recipe.size, 3)
        self.num_train = len(splits.train)
        self.local_batch = batch_size // jax.process_count()
        self.stream = TrainStream(splits.train.records, recipe, self.local_batch, seed=seed, workers=workers, prefetch=prefetch)
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.identity = f"{name} ({splits.kind}, {self.num_classes} classes, {len(splits.train)}+{len(splits.val)} images, {splits.identity()})"

    @property
    def place(self):
        from flax_resnet.training import place_local_batch

        return place_local_batch

    def host_batch(self, batch_size: int) -> int:
        """Rows of a global batch that this process passes (its own shard's)."""
        import jax

        return batch_size // jax.process_count()

    def train_batches(self, epoch: int) -> Iterator:
        if self.stream.epoch != epoch:
            raise RuntimeError(f"the data stream stands at epoch {self.stream.epoch}, not {epoch}")
        return self.stream.batches()

    def eval_batches(self, batch_size: int) -> Iterator:
        """This process's share of the validation split in host batches, padded with empty ones so every process runs as many."""
        import jax

        from flax_resnet.imagedata.pipeline import eval_batches, eval_shard

        local = self.host_batch(batch_size)
        steps = -(-(-(-len(self.splits.val) // jax.process_count())) // local)
        n = 0
        for b in eval_batches(eval_shard(self.splits.val.records), self.recipe, local):
            n += 1
            yield b
        for _ in range(steps - n):
            yield np.zeros((0,) + self.image_shape, np.float32), np.zeros(0, np.int32)

    def state(self) -> dict:
        return self.stream.state()

    def restore(self, state: dict | None) -> None:
        self.stream.restore(state)

    def close(self) -> None:
        self.stream.close()

    def __repr__(self) -> str:
        return f"ImageData({self.name!r}, train={len(self.splits.train)}, val={len(self.splits.val)}, size={self.recipe.size}, classes={self.num_classes}, augment={self.recipe.augment})"


def init_preprocess(init: str | None) -> pp.Preprocess:
    """The evaluation preprocessing of ``--init``'s weights (``hub.resolve``), or torchvision's default."""
    if init is None:
        return pp.Preprocess()
    from flax_resnet import hub

    try:
        return hub.resolve(init, download=False).preprocess
    except (FileNotFoundError, ValueError):
        return pp.Preprocess()


def open_data(args: Any, in_ch: int | None) -> ArrayData | ImageData:
    """The training data the ``train`` command's arguments name (see the module docstring).

    Raises:
        sources.DataError, FileNotFoundError, ValueError: one line naming the path.
    """
    from flax_resnet import data
    from flax_resnet.imagedata import pipeline, sources

    path = args.data if args.data is not None else args.dataset
    if path == "digits" or sources.detect(path) == "npz":
        if path == "digits":
            ds = data.load_digits(size=args.size or 32, channels=in_ch or 1, seed=args.seed, normalize=args.normalize)
        else:
            ds = data.load_npz(path, size=args.size, seed=args.seed, num_classes=args.num_classes, channels_first=args.channels_first, channels=in_ch, normalize=args.normalize)
        return ArrayData(ds, args.batch_size, args.seed, args.max_shift)
    if in_ch not in (None, 3):
        raise ValueError(f"{path}: images are read as RGB but the --init model takes {in_ch}-channel input")
    splits = sources.open_splits(path, on_bad=args.on_bad_image, val_fraction=args.val_fraction, seed=args.seed)
    rep = splits.report
    if rep.get("skipped"):
        print(f"--on-bad-image skip: left out {len(rep['skipped'])} unreadable or oversized files, e.g. {rep['skipped'][0]}", file=sys.stderr, flush=True)
    if rep.get("ignored"):
        print(f"ignored {rep['ignored']} files without an image extension (as torchvision's ImageFolder does)", file=sys.stderr, flush=True)
    if args.num_classes not in (None, len(splits.classes)):
        raise ValueError(f"{path} has {len(splits.classes)} classes, not --num-classes {args.num_classes}")
    base = init_preprocess(args.init)
    size = args.size or base.crop or 224
    eval_pp = pipeline.eval_preprocess(base, size)
    recipe = pipeline.Recipe(size, args.augment, tuple(eval_pp.mean), tuple(eval_pp.std), eval_pp, args.on_bad_image)
    if args.init is None and args.normalize != "imagenet":
        mean, std = ((0.0,) * 3, (1.0,) * 3) if args.normalize == "none" else _dataset_stats(splits.train.records, recipe, seed=args.seed)
        eval_pp = pp.Preprocess(**{**eval_pp.__dict__, "mean": mean, "std": std})
        recipe = pipeline.Recipe(size, args.augment, mean, std, eval_pp, args.on_bad_image)
    name = os.path.basename(os.path.normpath(path))
    return ImageData(splits, recipe, args.batch_size, seed=args.seed, workers=args.workers, prefetch=args.prefetch, name=name)


def add_arguments(p) -> None:
    """The ``train`` command's options for image folders and ``datasets`` directories (an argparse group)."""
    from flax_resnet.imagedata.transforms import AUGMENTS

    d = p.add_argument_group("image folders and datasets directories (streamed with grain)")
    d.add_argument("--data", default=None, metavar="PATH",
                   help="an image folder (PATH/train/<class>/*.jpg, optional PATH/val/<class>/; or PATH/<class>/), "
                   "a Hugging Face datasets directory (save_to_disk) or parquet folder, or a .npz (as --dataset)")
    d.add_argument("--augment", default="standard", choices=tuple(AUGMENTS),
                   help="standard: RandomResizedCrop(--size, scale 0.08-1) + flip; light: scale 0.35-1 + flip; none: resize + center crop")
    d.add_argument("--workers", type=int, default=None, help="decoding worker processes (default: min(CPU count, 8) - 1; 0: in this process)")
    d.add_argument("--prefetch", type=int, default=2, help="batches each worker prepares ahead")
    d.add_argument("--on-bad-image", default="error", choices=("error", "skip"),
                   help="an unreadable, truncated or oversized image: stop naming it, or leave it out and count it")
    d.add_argument("--val-fraction", type=float, default=0.1, help="without a val/ folder: the seeded, stratified share held out")
    d.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS steps within an epoch, with the data iterator's position (0: at epoch ends only)")
    d.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                   help="stop after N steps of this invocation, as if killed (testing resume); rerunning continues from the newest checkpoint")


def check_arguments(args, usage) -> None:
    """Checks the options of ``add_arguments`` (``usage(msg)`` builds the one-line error); fills ``--workers``."""
    if args.data is not None and args.dataset != "digits":
        raise usage("--data and --dataset name the same thing; pass one")
    if args.data is not None and not os.path.exists(args.data):
        raise FileNotFoundError(f"no such data directory or file: {args.data}")
    if args.workers is None:
        args.workers = max(0, min(os.cpu_count() or 1, 8) - 1)
    if args.workers < 0 or args.prefetch < 1:
        raise usage("--workers must be >= 0 and --prefetch >= 1")
    if not 0.0 < args.val_fraction < 1.0:
        raise usage("--val-fraction must be in (0, 1)")
    if args.checkpoint_every < 0 or (args.stop_after_steps is not None and args.stop_after_steps < 1):
        raise usage("--checkpoint-every must be >= 0 and --stop-after-steps >= 1")
