#!/usr/bin/env python
"""Small images on CPU: the CPU kernels against plain XLA convs and torch, side by side in one run.

    python benchmarks/small_images.py            # about 2 minutes on 2 cores

On small images ResNet's last stages have outputs of a few positions (a
3x3 conv at 2x2 for 64x64 images, 1x1 for 32x32). XLA's CPU backend runs a
conv whose input is smaller than its kernel as a swapped-operand loop;
``flax_resnet.kernels`` runs every conv with at most 4x4 output positions as
one matrix product of its taps instead. Each row times, in turns, Flax with
the default kernels, Flax with plain XLA convs (``kernels.use_plain()``) and
torch eager (NCHW) on the same weights and images, and prints img/s and the
ratios (medians over rounds, after a warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import _round_robin  # noqa: E402 - after the path set-up

ROWS = [("resnet18", "eval", 16, 64), ("resnet18", "train", 32, 64), ("resnet50", "train", 64, 16)]


def _flax(arch: str, mode: str, size: int, batch: int, plain: bool):
    import jax
    import numpy as np

    import flax_resnet
    from flax_resnet import kernels, training

    model = getattr(flax_resnet, arch)(num_classes=10)
    x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    y = np.arange(batch) % 10
    with kernels.use_plain() if plain else contextlib.nullcontext():  # traced here: each variant is its own jit
        if mode == "eval":
            v = jax.jit(model.init)(jax.random.key(0), x[:1])
            f = jax.jit(lambda v, x: model.apply(v, x))
            f(v, x).block_until_ready()
            return lambda: f(v, x).block_until_ready()
        tx = training.make_optimizer(batch_size=batch, steps_per_epoch=100, epochs=1)
        state = [training.create_train_state(model, jax.random.key(0), tx, input_shape=(1, size, size, 3))]
        step = jax.jit(training.train_step_fn)
        state[0] = step(state[0], x, y)[0]

        def run():
            state[0], metrics = step(state[0], x, y)
            jax.block_until_ready(metrics)

        return run


def _torch(arch: str, mode: str, size: int, batch: int):
    import torch

    import torch_ref

    model = getattr(torch_ref, arch)(layout="torchvision", num_classes=10)
    x = torch.randn(batch, 3, size, size)
    y = torch.arange(batch) % 10
    if mode == "eval":
        model.eval()

        def run():
            with torch.no_grad():
                model(x)

        return run
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def run():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="rounds per row (median; default 7)")
    p.add_argument("--no-torch", action="store_true", help="Flax only")
    args = p.parse_args(argv)
    from flax_resnet.tables import markdown_table

    body = []
    for arch, mode, size, batch in ROWS:
        fns = {"kernels": _flax(arch, mode, size, batch, plain=False), "plain": _flax(arch, mode, size, batch, plain=True)}
        if not args.no_torch:
            fns["torch"] = _torch(arch, mode, size, batch)
        r = _round_robin(fns, args.repeats, None, batch)
        s = {k: v["img_s"] for k, v in r.items()}
        torch_s = s.get("torch")
        body.append([arch, mode, f"{size}x{size}", str(batch), f"{s['kernels']:.0f}", f"{s['plain']:.0f}", f"{torch_s:.0f}" if torch_s else "-",
                     f"{s['kernels'] / s['plain']:.2f}", f"{s['kernels'] / torch_s:.2f}" if torch_s else "-"])  # fmt: skip
        print(f"{arch} {mode} {size}x{size} batch {batch}: done", file=sys.stderr, flush=True)
    head = ["arch", "mode", "image", "batch", "Flax kernels img/s", "Flax plain XLA img/s", "torch eager img/s", "kernels/plain", "kernels/torch"]
    print(markdown_table(head, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
