"""``flax-resnet predict``: the top-k classes of images under any checkpoint or pretrained name.

The weights (``--weights``) are anything ``flax_resnet.hub.resolve`` knows: a
checkpoint file or Orbax directory, a torchvision weights name, a Hugging Face
hub id. Their source picks the preprocessing (``flax_resnet.preprocess``) and
the class labels; ``--resize``/``--crop``/``--interpolation``/``--mean``/``--std``
override it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Any, Sequence

import numpy as np

from flax_resnet import hub
from flax_resnet import preprocess as pp
from flax_resnet.cli import add_command

EPILOG = """\
preprocessing by source (shorter side resized, then a square center crop, then ImageNet mean/std):
  torchvision IMAGENET1K_V1 weights   resize 256 bilinear, crop 224
  torchvision IMAGENET1K_V2 weights   resize 232 bilinear, crop 224 (also resnext101_64x4d)
  timm hub models                     floor(input_size / crop_pct) with the config's interpolation,
                                      crop input_size (resnet50.a1_in1k: 235 bicubic, 224)
  transformers hub models             int(shortest_edge / crop_pct) with resample, crop shortest_edge
                                      (microsoft/resnet-50: 256 bicubic, 224)
  any other checkpoint                the torchvision V1 numbers, unless overridden

IMAGES are image files Pillow reads (RGB; grayscale for one-channel models) or .npz files
with an "images" array (N, H, W, C): uint8 0..255 or floating 0..1, preprocessed the same way.

examples:
  flax-resnet predict cat.jpg dog.png --weights ResNet50_Weights.IMAGENET1K_V2
  flax-resnet predict cat.jpg --weights timm/resnet50.a1_in1k --top-k 3
  flax-resnet predict batch.npz --weights runs/digits/checkpoints --resize 0 --crop 0 --mean 0.5 --std 0.5
"""

DESCRIPTION = (
    "Classify images with any checkpoint this package reads or a pretrained name "
    "(torchvision weights, Hugging Face hub ids), preprocessed as the weights' source does."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "predict", "top-k classes of images under a checkpoint or pretrained weights", DESCRIPTION, EPILOG)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or .npz files with an 'images' array (NHWC)")
    p.add_argument("--weights", required=True, metavar="W",
                   help="checkpoint file/Orbax directory, torchvision name (ResNet50_Weights.IMAGENET1K_V2, resnet50) "
                   "or hub id (timm/resnet50.a1_in1k, microsoft/resnet-50)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes to show per image (default: %(default)s)")
    p.add_argument("--resize", type=int, default=None, metavar="N", help="shorter side after resizing; 0: keep the size (default: the source's)")
    p.add_argument("--crop", type=int, default=None, metavar="N", help="center crop side; 0: no crop (default: the source's)")
    p.add_argument("--interpolation", default=None, choices=pp.INTERPOLATIONS, help="resize filter (default: the source's)")
    p.add_argument("--mean", type=float, nargs="+", default=None, metavar="M", help="per-channel mean on the 0..1 scale (default: the source's, ImageNet's)")
    p.add_argument("--std", type=float, nargs="+", default=None, metavar="S", help="per-channel std on the 0..1 scale (default: the source's, ImageNet's)")
    p.add_argument("--labels", default=None, metavar="FILE", help="class names, one per line (default: the source's, if any)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per forward pass (default: %(default)s)")
    p.add_argument("--no-download", action="store_true", help="use only cached weights; never download")
    p.add_argument("--no-check-hash", action="store_true",
                   help="accept a cached torchvision file whose SHA-256 does not match the hash in its name")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def _usage(msg: str) -> Exception:
    from flax_resnet.cli import UsageError

    return UsageError(msg)


def in_channels(variables: dict) -> int:
    """Input channels of a model's variables: the first stem conv kernel's input axis (HWIO)."""
    from flax.traverse_util import flatten_dict

    kernels = sorted(k for k in flatten_dict(variables["params"]) if k[0] == "conv1" and k[-1] == "kernel")
    return int(np.shape(flatten_dict(variables["params"])[kernels[0]])[-2])


def read_inputs(paths: Sequence[str], channels: int) -> tuple[list[str], list[np.ndarray]]:
    """Names and HWC images from image files and ``.npz`` files (key ``images``, NHWC)."""
    names, images = [], []
    for path in paths:
        if str(path).endswith(".npz"):
            try:
                with np.load(path, allow_pickle=False) as z:
                    if "images" not in z.files:
                        raise ValueError(f"{path}: no 'images' array (found {', '.join(z.files) or 'none'})")
                    arr = z["images"]
            except (OSError, ValueError) as e:
                raise ValueError(str(e) if str(path) in str(e) else f"{path}: unreadable .npz ({' '.join(str(e).split())[:160]})") from None
            if arr.ndim == 3:
                arr = arr[..., None]
            if arr.ndim != 4 or arr.shape[-1] != channels:
                raise ValueError(f"{path}: 'images' has shape {arr.shape}; expected NHWC (N, H, W, {channels})")
            if not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
                raise ValueError(f"{path}: 'images' has dtype {arr.dtype}; expected uint8 (0..255) or floating (0..1)")
            names += [f"{path}[{i}]" for i in range(len(arr))]
            images += list(arr)
        else:
            names.append(str(path))
            images.append(pp.read_image(path, channels))
    return names, images


@functools.lru_cache(maxsize=4)
def _probs_fn(model: Any):
    import jax

    return jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x).astype("float32"), axis=-1))


def top_k(model: Any, variables: dict, batch: np.ndarray, k: int, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities, classes)``, each (N, k), best first: softmax of ``model.apply`` in eval mode."""
    probs = _probs_fn(model)
    out = np.concatenate([np.asarray(probs(variables, batch[i : i + batch_size])) for i in range(0, len(batch), batch_size)])
    order = np.argsort(-out, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(out, order, axis=-1), order


def check_inputs(paths: Sequence[str]) -> None:
    """Every input is a readable file: checked before any weights load (which can take seconds).

    Raises:
        FileNotFoundError, PermissionError, IsADirectoryError: one line naming the first bad input.
    """
    import os

    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such image file")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path}: a directory, not an image file (pass the files, e.g. {path}/*.jpg)")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"{path}: not readable (permission denied)")


def _labels_note(info, labels, n: int, args) -> str:
    if args.labels:
        return f"{n} from {args.labels}"
    if labels is None:
        why = "the weights name no classes" if info.labels is None else f"the source's {len(info.labels)} names do not fit {n} classes"
        return f"none ({why}; --labels FILE names them)"
    return f"{n} from {info.source}" + (" (ImageNet-1k)" if labels == hub.imagenet_labels() else "")


def _preprocess(args, info, channels: int) -> pp.Preprocess:
    base = info.preprocess
    changes: dict[str, Any] = {}
    if args.resize is not None:
        changes["resize"] = args.resize or None
    if args.crop is not None:
        changes["crop"] = args.crop or None
    if args.interpolation is not None:
        changes["interpolation"] = args.interpolation
    for name in ("mean", "std"):
        v = getattr(args, name)
        if v is not None:
            changes[name] = tuple(v) * channels if len(v) == 1 else tuple(v)
    if changes:
        changes["source"] = base.source + ", overridden"
    new = pp.Preprocess(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, **changes})
    if len(new.mean) != channels:
        raise _usage(f"the model takes {channels}-channel images but the normalization has {len(new.mean)} values; pass --mean and --std")
    return new


def run(args: argparse.Namespace) -> int:
    from flax_resnet.io import load

    if args.top_k < 1:
        raise _usage(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise _usage(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        pp.pillow()
    except ModuleNotFoundError as e:
        if not all(str(p).endswith(".npz") for p in args.images):
            raise _usage(str(e)) from None
    check_inputs(args.images)
    try:
        info = hub.resolve(args.weights, download=not args.no_download, check_hash=not args.no_check_hash)
    except (OSError, ValueError) as e:  # the library's message, in this command's options
        raise _usage(hub.cli_terms(str(e))) from None
    model, variables = load(info.path)
    channels = in_channels(variables)
    prep = _preprocess(args, info, channels)
    labels = info.labels
    if args.labels:
        with open(args.labels, encoding="utf-8") as f:
            labels = tuple(line.rstrip("\n") for line in f if line.strip())
        if len(labels) != model.num_classes:
            raise _usage(f"{args.labels}: {len(labels)} labels for a model with {model.num_classes} classes")
    elif labels is not None and len(labels) != model.num_classes:
        labels = None
    try:
        names, images = read_inputs(args.images, channels)
        batch = pp.batch(images, prep)
    except ModuleNotFoundError as e:
        raise _usage(str(e)) from None
    k = min(args.top_k, model.num_classes)
    probs, classes = top_k(model, variables, batch, k, args.batch_size)
    results = [
        {"image": name, "top": [{"class": int(c), "label": labels[c] if labels else None, "prob": float(p)} for p, c in zip(pr, cl)]}
        for name, pr, cl in zip(names, probs, classes)
    ]
    if args.json:
        print(json.dumps({"weights": str(info.path), "arch": model.arch, "preprocess": prep.describe(), "results": results}, indent=2))
        return 0
    print(f"weights     {info.path} ({model.arch}, {model.num_classes} classes, from {info.source})")
    print(f"preprocess  {prep.describe()}")
    print(f"labels      {_labels_note(info, labels, model.num_classes, args)}")
    width = max(len(str(model.num_classes - 1)), 5)
    for r in results:
        print(r["image"])
        for i, t in enumerate(r["top"], 1):
            label = f"  {t['label']}" if t["label"] is not None else ""
            print(f"  {i}. {t['prob']:.4f}  class {t['class']:>{width}}{label}")
    sys.stdout.flush()
    return 0
