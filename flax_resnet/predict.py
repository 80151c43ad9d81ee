"""``flax-resnet predict``: the top-k classes of images under any checkpoint or pretrained name.

The weights (``--weights``) are anything ``flax_resnet.hub.resolve`` knows: a
checkpoint file or Orbax directory, a torchvision weights name, a Hugging Face
hub id. Their source picks the preprocessing (``flax_resnet.preprocess``) and
the class labels; ``--resize``/``--crop``/``--interpolation``/``--mean``/``--std``
override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import stat
import sys
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

# hub and io (JAX through flax_resnet.io's loaders) are imported in the command, so that the
# CLI's argument parsing and --help start without JAX (tests/test_cli_misc.py).
from flax_resnet import preprocess as pp
from flax_resnet.cli import UsageError, add_command

if TYPE_CHECKING:
    from flax_resnet.io import npz

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
with an "images" array (N, H, W, C): uint8 0..255 or floating 0..1 (--value-range for
others), preprocessed the same way. RGBA images lose their alpha channel and grey images
are repeated to RGB (as torchvision's loader does); 16-bit images are clipped to 8 bits,
with a warning. Inputs are read batch by batch: memory follows --batch-size, not the
number of images. Refused, one line and exit status 2: NaN/Inf or out-of-range pixels,
FIFOs and devices, images over 67 million pixels before or after resizing.

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
    p.add_argument("--value-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="the value range of floating .npz images, scaled to 0..1 (default: 0 1; pixels outside it are refused)")
    p.add_argument("--labels", default=None, metavar="FILE", help="class names, one per line (default: the source's, if any)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per forward pass (default: %(default)s)")
    p.add_argument("--no-download", action="store_true", help="use only cached weights; never download")
    p.add_argument("--no-check-hash", action="store_true",
                   help="accept a cached torchvision file whose SHA-256 does not match the hash in its name")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def _usage(msg: str) -> Exception:
    return UsageError(msg)


def in_channels(variables: dict) -> int:
    """Input channels of a model's variables: the first stem conv kernel's input axis (HWIO)."""
    from flax.traverse_util import flatten_dict

    kernels = sorted(k for k in flatten_dict(variables["params"]) if k[0] == "conv1" and k[-1] == "kernel")
    return int(np.shape(flatten_dict(variables["params"])[kernels[0]])[-2])


MAX_LABELS_BYTES = 64 * 2**20
MAX_BATCH_PIXELS = 2**22  # images x height x width per forward pass: activations stay well under 1 GB


@dataclasses.dataclass(frozen=True)
class Source:
    """One input file, checked (a regular file; an image header Pillow reads, or an .npz 'images' header)."""

    path: str
    images: npz.Member | None = None  # the 'images' array of an .npz


def check_inputs(paths: Sequence[str]) -> list[Source]:
    """Every input opened just far enough to know it can be read: nothing is decoded or inflated.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError; ValueError: not
        a regular file (a FIFO, a device), not an image Pillow reads, an
        ``.npz`` without a readable ``images`` array of uint8 or floating
        NHWC images. One line naming the first bad input.
    """
    from flax_resnet.io import npz

    out = []
    for path in map(str, paths):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such image file") from None
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"{path}: a directory, not an image file (pass the files, e.g. {path}/*.jpg)")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file (a FIFO or device); predict reads image and .npz files")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"{path}: not readable (permission denied)")
        if path.endswith(".npz"):
            members = npz.members(path)
            if "images" not in members:
                raise ValueError(f"{path}: no 'images' array (found {', '.join(members) or 'none'})")
            m = members["images"]
            if len(m.shape) not in (3, 4) or m.shape[0] == 0 or 0 in m.shape:
                raise ValueError(f"{path}: 'images' has shape {m.shape}; expected NHWC (N, H, W, C) with N >= 1")
            if not (m.dtype == np.uint8 or np.issubdtype(m.dtype, np.floating)):
                raise ValueError(f"{path}: 'images' has dtype {m.dtype}; expected uint8 (0..255) or floating (0..1)")
            if m.shape[1] * m.shape[2] > pp.MAX_PIXELS:
                raise ValueError(f"{path}: 'images' are {m.shape[1]}x{m.shape[2]}, more than {pp.MAX_PIXELS:,} pixels each")
            out.append(Source(path, m))
        else:
            pp.image_size(path)
            out.append(Source(path))
    return out


def _check_pixels(name: str, a: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """A floating image checked (finite, inside ``value_range``) and scaled to 0..1; uint8 as it is."""
    if a.dtype == np.uint8:
        return a
    bad = ~np.isfinite(a)
    if bad.any():
        i = tuple(int(j) for j in np.argwhere(bad)[0])
        raise ValueError(f"{name}: pixel {i} is {a[i]}: every pixel must be finite")
    lo, hi = value_range
    out = (a < lo) | (a > hi)
    if out.any():
        i = tuple(int(j) for j in np.argwhere(out)[0])
        raise ValueError(
            f"{name}: pixel {i} = {a[i]:g} is outside {lo:g}..{hi:g}, the range of floating images; "
            "pass --value-range LO HI if the images use another one"
        )
    a = a.astype(np.float32)
    return a if (lo, hi) == (0.0, 1.0) else (a - np.float32(lo)) / np.float32(hi - lo)


def iter_images(sources: Sequence[Source], channels: int, value_range: tuple[float, float] = (0.0, 1.0)) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, HWC image)`` one at a time: image files decoded, ``.npz`` arrays inflated, as they are reached.

    Raises:
        ValueError: a wrong channel count, a non-finite or out-of-range pixel
            (naming the image and the pixel), an unreadable file.
    """
    from flax_resnet.io import npz

    for src in sources:
        if src.images is None:
            yield src.path, pp.read_image(src.path, channels)
            continue
        m = src.images
        if (m.shape[-1] if len(m.shape) == 4 else 1) != channels:
            raise ValueError(f"{src.path}: 'images' has shape {m.shape}; expected NHWC (N, H, W, {channels})")
        start = 0
        for chunk in npz.iter_rows(src.path, m, 16):
            for i, a in enumerate(chunk, start):
                name = f"{src.path}[{i}]"
                yield name, _check_pixels(name, a if a.ndim == 3 else a[..., None], value_range)
            start += len(chunk)


def batches(images: Iterator[tuple[str, np.ndarray]], prep: pp.Preprocess, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Preprocessed NHWC float32 batches of at most ``batch_size`` same-sized images (fewer for large ones)."""
    names: list[str] = []
    rows: list[np.ndarray] = []
    for name, image in images:
        try:
            x = pp.apply(image, prep)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if rows and (x.shape != rows[0].shape or len(rows) >= max(1, min(batch_size, MAX_BATCH_PIXELS // (x.shape[0] * x.shape[1])))):
            yield names, np.stack(rows)
            names, rows = [], []
        names.append(name)
        rows.append(x)
    if rows:
        yield names, np.stack(rows)


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape sequences, newlines) shown escaped, not sent to the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def read_labels(path: str) -> tuple[str, ...]:
    """Class names, one per line, from a UTF-8 text file (blank lines skipped).

    Raises:
        FileNotFoundError; ValueError: not a regular file, too large, not UTF-8 (one line naming the file).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_LABELS_BYTES:
        raise ValueError(f"{path}: --labels must be a text file of at most {MAX_LABELS_BYTES:,} bytes")
    try:
        with open(path, encoding="utf-8") as f:
            return tuple(line.rstrip("\r\n") for line in f if line.strip())
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: --labels is not UTF-8 text (byte {e.start}: {e.reason})") from None


@functools.lru_cache(maxsize=4)
def _probs_fn(model: Any):
    import jax

    return jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x).astype("float32"), axis=-1))


def top_k(model: Any, variables: dict, batch: np.ndarray, k: int, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities, classes)``, each (N, k), best first: softmax of ``model.apply`` in eval mode.

    Batches are padded to ``batch_size`` so that every call has one shape (one compilation).
    """
    probs = _probs_fn(model)
    out = []
    for i in range(0, len(batch), batch_size):
        x = batch[i : i + batch_size]
        n = len(x)
        if n < batch_size and len(batch) > batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
        out.append(np.asarray(probs(variables, x))[:n])
    out = np.concatenate(out)
    order = np.argsort(-out, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(out, order, axis=-1), order


def _labels_note(info, labels, n: int, args) -> str:
    if args.labels:
        return f"{n} from {args.labels}"
    if labels is None:
        why = "the weights name no classes" if info.labels is None else f"the source's {len(info.labels)} names do not fit {n} classes"
        return f"none ({why}; --labels FILE names them)"
    from flax_resnet import hub

    where = "the file's metadata" if info.source == "file" else info.source
    return f"{n} from {where}" + (" (ImageNet-1k)" if labels == hub.imagenet_labels() else "")


def _preprocess(args, info, channels: int) -> pp.Preprocess:
    base = info.preprocess
    changes: dict[str, Any] = {}
    if args.resize is not None:
        changes["resize"] = args.resize or None
    if args.crop is not None:
        changes["crop"] = args.crop or None
    if base.warp is not None and ("resize" in changes or "crop" in changes):  # the user's resize/crop replace the warp
        changes.setdefault("resize", None)
        changes["warp"] = None
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
    lo, hi = args.value_range or (0.0, 1.0)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise _usage(f"--value-range must be two finite numbers LO < HI, got {lo} {hi}")
    try:
        pp.pillow()
    except ModuleNotFoundError as e:
        if not all(str(p).endswith(".npz") for p in args.images):
            raise _usage(str(e)) from None
    sources = check_inputs(args.images)  # before the weights: a bad input costs nothing
    labels_file = read_labels(args.labels) if args.labels else None
    from flax_resnet import hub

    try:
        info = hub.resolve(args.weights, download=not args.no_download, check_hash=not args.no_check_hash)
    except (OSError, ValueError) as e:  # the library's message, in this command's options
        raise _usage(hub.cli_terms(str(e))) from None
    model, variables = load(info.path)
    channels = in_channels(variables)
    prep = _preprocess(args, info, channels)
    labels = info.labels
    if labels_file is not None:
        labels = labels_file
        if len(labels) != model.num_classes:
            raise _usage(f"{args.labels}: {len(labels)} labels for a model with {model.num_classes} classes")
    elif labels is not None and len(labels) != model.num_classes:
        labels = None
    k = min(args.top_k, model.num_classes)
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pp.PrecisionWarning)
        try:
            for names, batch in batches(iter_images(sources, channels, (lo, hi)), prep, args.batch_size):
                probs, classes = top_k(model, variables, batch, k, args.batch_size)
                results += [
                    {"image": name, "top": [{"class": int(c), "label": labels[c] if labels else None, "prob": float(p)} for p, c in zip(pr, cl)]}
                    for name, pr, cl in zip(names, probs, classes)
                ]
        except ModuleNotFoundError as e:
            raise _usage(str(e)) from None
    precision = [w for w in caught if issubclass(w.category, pp.PrecisionWarning)]
    if precision:  # once per run, however many images
        print(f"flax-resnet predict: warning: {len(precision)} image(s) {printable(str(precision[0].message))}", file=sys.stderr)
    if args.json:
        print(json.dumps({"weights": str(info.path), "arch": model.arch, "preprocess": prep.describe(), "results": results}, indent=2))
        return 0
    print(f"weights     {printable(str(info.path))} ({model.arch}, {model.num_classes} classes, from {info.source})")
    print(f"preprocess  {printable(prep.describe())}")
    print(f"labels      {printable(_labels_note(info, labels, model.num_classes, args))}")
    width = max(len(str(model.num_classes - 1)), 5)
    for r in results:
        print(printable(r["image"]))
        for i, t in enumerate(r["top"], 1):
            label = f"  {printable(t['label'])}" if t["label"] is not None else ""
            print(f"  {i}. {t['prob']:.4f}  class {t['class']:>{width}}{label}")
    sys.stdout.flush()
    return 0
