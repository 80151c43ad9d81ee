"""Fine-tune converted PyTorch weights in your own JAX training loop.

A torch ResNet state_dict (torchvision's, timm's, your own) becomes a Flax
model with a fresh head, trained on scikit-learn's digits (32x32 RGB) with the
ResNet paper's recipe and checkpointed with Orbax; a rerun resumes, and says
so when there is nothing left to train.

    python examples/finetune_loop.py                      # resnet18, 3 epochs, stand-in weights
    python examples/finetune_loop.py --weights resnet50-11ad3fa6.pth --arch resnet50

Expected output (2-core CPU, about 3 minutes; resnet18 from random stand-in
weights, so epoch 1 starts from BatchNorm statistics that fit nothing):

    resnet18 from resnet18.pth: 11,181,642 params; 1437 train / 360 test digits, 22 steps/epoch of 64
    epoch 1: train loss 0.99, test accuracy 0.24
    epoch 2: train loss 0.35, test accuracy 0.90
    epoch 3: train loss 0.13, test accuracy 0.98

and run again:

    resnet18 from resnet18.pth: 11,181,642 params; 1437 train / 360 test digits, 22 steps/epoch of 64
    runs/finetune-loop: all 3 epochs are done (test accuracy 0.98); pass a larger --epochs to train more
"""

# example-test: slow rerun --epochs 1 --size 16 --limit 64 --batch-size 32

from __future__ import annotations

import argparse
import os

import jax

from flax_resnet import data, training


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="a torch checkpoint (default: torch_ref stand-in weights saved as ARCH.pth)")
    p.add_argument("--arch", default="resnet18", help="architecture of the stand-in weights")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="digits are upscaled from 8x8 to this size")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (a quick try)")
    p.add_argument("--workdir", default="runs/finetune-loop", help="Orbax checkpoints, one per epoch")
    args = p.parse_args(argv)

    weights = args.weights
    if weights is None:  # stands in for torchvision's download: the same keys and shapes, random values
        import torch

        import torch_ref

        weights = f"{args.arch}.pth"
        if not os.path.exists(weights):
            torch.manual_seed(0)
            torch.save(getattr(torch_ref, args.arch)(layout="torchvision").state_dict(), weights)

    ds = data.load_digits(size=args.size, channels=3, normalize="imagenet")  # RGB, as ImageNet weights expect
    train_x, train_y = ds.train_images[: args.limit], ds.train_labels[: args.limit]
    model, variables = training.load_pretrained(weights, num_classes=ds.num_classes)  # a fresh 10-class head
    steps = len(train_y) // args.batch_size
    tx = training.make_optimizer(batch_size=args.batch_size, steps_per_epoch=steps, epochs=args.epochs)
    state = training.create_train_state(model, variables, tx)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"{model.spec.name} from {weights}: {n_params:,} params; {len(train_y)} train / {len(ds.test_labels)} test digits, "
          f"{steps} steps/epoch of {args.batch_size}")

    ckpt = training.Checkpointer(os.path.join(args.workdir, "checkpoints"))
    start = 0
    if ckpt.latest_epoch():  # a rerun resumes where the last run stopped
        state, meta = ckpt.restore(state)
        start = meta["epoch"]
        if meta.get("weights") != training.weights_identity(weights):
            raise SystemExit(f"{args.workdir} was trained from other weights; remove it or pass another --workdir")
        print(f"resuming {args.workdir} after epoch {start}" if start < args.epochs else
              f"{args.workdir}: all {args.epochs} epochs are done (test accuracy {meta['test_accuracy']:.2f}); "
              f"pass a larger --epochs to train more")
    for epoch in range(start, args.epochs):
        losses = []
        for x, y in data.batches(train_x, train_y, args.batch_size, seed=0, epoch=epoch, max_shift=2):
            state, metrics = training.train_step(state, x, y)
            losses.append(float(metrics["loss"]))
        ev = training.evaluate(state, ds.test_images, ds.test_labels, 128)
        print(f"epoch {epoch + 1}: train loss {sum(losses) / len(losses):.2f}, test accuracy {ev['accuracy']:.2f}")
        ckpt.save(epoch + 1, state, {"test_accuracy": ev["accuracy"], "weights": training.weights_identity(weights)})
    ckpt.close()


if __name__ == "__main__":
    main()
