"""Fine-tune a ResNet on a folder of images in your own training loop, with flax-resnet's grain pipeline.

The same pieces ``flax-resnet train --data`` uses: ``sources.open_splits``
(classes from folder names), ``pipeline.TrainStream`` (decode,
RandomResizedCrop + flip, normalize, batches; checkpointable with
``stream.state()``) and ``pipeline.eval_batches`` (the weights' resize and
center crop). Run::

    python examples/finetune_folder.py /path/to/folder --init resnet50-11ad3fa6.pth --size 224 --steps 500
    python examples/finetune_folder.py          # digits 0 and 1 written as PNGs into ./digits01 first

Prints one JSON line after evaluating. Needs ``pip install 'flax-resnet[data]'``.
"""
# example-test: slow --size 16 --steps 3 --batch-size 8 --arch resnet10t

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from flax_resnet import training
from flax_resnet.imagedata import pipeline, sources, stream


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", default=None, help="root/train/<class>/*.jpg (+ root/val/<class>/), or root/<class>/*.jpg (default: ./digits01, written if missing)")
    p.add_argument("--init", default=None, help="converted weights to start from (default: a fresh --arch)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()
    if args.folder is None:
        from flax_resnet.imagedata import synthetic

        args.folder = "digits01"
        if not os.path.isdir(args.folder):
            synthetic.digits_folder(args.folder, (0, 1), size=32, limit=40)  # 64 train / 16 val PNGs

    splits = sources.open_splits(args.folder)
    base = stream.init_preprocess(args.init)  # the weights' own eval preprocessing and mean/std
    eval_pp = pipeline.eval_preprocess(base, args.size)
    recipe = pipeline.Recipe(args.size, "standard", eval_pp.mean, eval_pp.std, eval_pp)

    if args.init:
        model, variables = training.load_pretrained(args.init, num_classes=len(splits.classes))
    else:
        import flax_resnet

        model, variables = getattr(flax_resnet, args.arch)(num_classes=len(splits.classes)), jax.random.key(0)
    tx = training.make_optimizer(lr=args.lr)
    state = training.create_train_state(model, variables, tx, input_shape=(1, args.size, args.size, 3))

    train = pipeline.TrainStream(splits.train.records, recipe, args.batch_size, seed=0, workers=args.workers)
    step = 0
    while step < args.steps:
        for x, y in train.batches():  # one epoch; train.state() here is the resumable position
            state, m = training.train_step(state, x, y)
            step += 1
            if step == args.steps:
                break
    sums = [training.eval_step(state, x, y) for x, y in pipeline.eval_batches(splits.val.records, recipe, args.batch_size)]
    correct, count = (float(sum(np.asarray(s[k]) for s in sums)) for k in ("correct", "count"))
    print(json.dumps({"steps": step, "train_loss": float(m["loss"]), "val_accuracy": correct / count, "classes": list(splits.classes)}))


if __name__ == "__main__":
    main()
