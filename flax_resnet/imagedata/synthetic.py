"""Image folders to try the pipeline on, written from data on this machine (nothing downloads).

``digits_folder`` saves scikit-learn's 8x8 digits as PNGs in torchvision's
``ImageFolder`` layout (``root/train/<digit>/...``, ``root/val/<digit>/...``),
upscaled and in color; ``jpeg_folder`` writes many small random-texture JPEGs
(for loader benchmarks and memory checks)::

    python -m flax_resnet.imagedata.synthetic digits /tmp/digits2 --classes 0 1
    python -m flax_resnet.imagedata.synthetic jpegs /tmp/jpegs --count 20000
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np


def digits_folder(root: str, classes: Sequence[int] = (0, 1), size: int = 48, val_fraction: float = 0.2, seed: int = 0, limit: int | None = None) -> dict[str, int]:
    """Writes digits of ``classes`` as ``size`` x ``size`` RGB PNGs; returns the image count per split.

    Each digit is drawn in a random color on a random dark background, so the
    classes differ by shape only. ``limit`` caps the images per class.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for c in classes:
        idx = np.flatnonzero(d.target == c)[:limit]
        n_val = int(round(len(idx) * val_fraction))
        for k, i in enumerate(rng.permutation(idx)):
            split = "val" if k < n_val else "train"
            g = d.images[i] / 16.0
            fg, bg = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.3, 3)
            rgb = (g[..., None] * fg + (1 - g[..., None]) * bg) * 255
            img = Image.fromarray(rgb.astype(np.uint8)).resize((size, size), Image.BILINEAR)
            os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
            img.save(os.path.join(root, split, str(c), f"{i:04d}.png"))
            counts[split] += 1
    return counts


def jpeg_folder(root: str, count: int, classes: int = 10, size: tuple[int, int] = (64, 80), seed: int = 0) -> None:
    """Writes ``count`` random smooth-texture JPEGs (``size`` = (h, w)) into ``classes`` class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(count):
        c = i % classes
        os.makedirs(os.path.join(root, f"class{c:03d}"), exist_ok=True)
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(os.path.join(root, f"class{c:03d}", f"{i:06d}.jpg"), quality=90)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flax_resnet.imagedata.synthetic", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    dg = sub.add_parser("digits", help="scikit-learn's digits as PNGs in train/ and val/")
    dg.add_argument("root")
    dg.add_argument("--classes", type=int, nargs="+", default=[0, 1])
    dg.add_argument("--size", type=int, default=48)
    jp = sub.add_parser("jpegs", help="many small random JPEGs")
    jp.add_argument("root")
    jp.add_argument("--count", type=int, default=2000)
    a = p.parse_args(argv)
    if a.what == "digits":
        print(digits_folder(a.root, a.classes, a.size))
    else:
        jpeg_folder(a.root, a.count)


if __name__ == "__main__":
    main()
