"""Evaluation preprocessing of the libraries whose weights this package reads.

Every pretrained ImageNet ResNet expects the resize, center crop and
normalization it was evaluated with:

* torchvision (``torchvision.transforms._presets.ImageClassification``, the
  ``transforms`` of each ``ResNet50_Weights`` entry): resize the shorter side
  to ``resize_size`` (256 for the ``IMAGENET1K_V1`` weights, 232 for
  ``IMAGENET1K_V2`` and ResNeXt-101 64x4d) with bilinear interpolation, center
  crop 224, scale to [0, 1], ImageNet mean/std. On PIL images the resize is
  PIL's ``Image.resize`` (antialiased), which is what this module calls.
* timm (``timm.data.create_transform(**resolve_data_config(model=m))``, eval
  branch ``transforms_imagenet_eval``): shorter side to
  ``floor(input_size / crop_pct)`` with the config's ``interpolation``, center
  crop ``input_size``; e.g. ``resnet50.a1_in1k``: crop_pct 0.95, 224, bicubic,
  so 235 -> 224.
* transformers (``ConvNextImageProcessor``, used by ``microsoft/resnet-*``):
  shorter side to ``int(shortest_edge / crop_pct)`` (256 for 224 / 0.875) with
  ``resample`` (3 = bicubic), center crop ``shortest_edge`` with the offset
  rounded down (``(h - crop) // 2``) where torchvision rounds half to even.

The output is NHWC float32, the layout of every model here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
MAX_SIDE = 8192  # resize / crop sides; a larger one is a typo, not an eval transform
MAX_PIXELS = 2**26  # an input image (64 MP) or a resized one; memory stays bounded whatever the aspect ratio


def pillow():
    """``PIL.Image``, or one line saying how to install it."""
    try:
        from PIL import Image
    except ModuleNotFoundError:
        raise ModuleNotFoundError("reading images needs Pillow: pip install 'flax-resnet[predict]'", name="PIL") from None
    return Image


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Resize (shorter side), center crop and normalize, as one library's eval transform.

    Attributes:
        resize: the shorter side after resizing (aspect ratio kept); ``None``
            keeps the size.
        crop: side of the square center crop; ``None``: no crop.
        interpolation: one of ``INTERPOLATIONS`` (PIL's filters).
        mean, std: per channel, applied after scaling to [0, 1].
        crop_rounding: ``"round"`` (torchvision and timm: ``round((h - crop) / 2)``,
            half to even) or ``"floor"`` (transformers: ``(h - crop) // 2``).
        source: where these numbers come from, for messages.
        warp: ``(height, width)``: resize to exactly this size, aspect ratio
            not kept (transformers' ``size: {"height", "width"}``), instead of
            ``resize``.
    """

    resize: int | None = 256
    crop: int | None = 224
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_rounding: str = "round"
    source: str = "torchvision IMAGENET1K_V1 (default)"
    warp: tuple[int, int] | None = None

    def __post_init__(self):
        if self.interpolation not in _PIL_RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
        if self.crop_rounding not in ("round", "floor"):
            raise ValueError(f"crop_rounding must be 'round' or 'floor', got {self.crop_rounding!r}")
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIDE):
                raise ValueError(f"{name} must be an integer from 1 to {MAX_SIDE} or None, got {v!r}")
        if self.warp is not None and (len(self.warp) != 2 or not all(isinstance(v, int) and 1 <= v <= MAX_SIDE for v in self.warp)):
            raise ValueError(f"warp must be (height, width), integers from 1 to {MAX_SIDE}, got {self.warp!r}")
        if self.resize is not None and self.crop is not None and self.crop > self.resize and self.warp is None:
            raise ValueError(f"crop {self.crop} does not fit an image resized to shorter side {self.resize}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean {self.mean} and std {self.std} must have the same, non-zero length")
        for name in ("mean", "std"):
            for v in getattr(self, name):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"{name} values must be finite numbers, got {list(getattr(self, name))}")
        if any(v <= 0 for v in self.std):
            raise ValueError(f"std values must be positive (a zero std divides by zero), got {list(self.std)}")

    def describe(self) -> str:
        """One line: ``resize 232 bilinear, crop 224, ImageNet mean/std (torchvision ...)``."""
        if self.warp is not None:
            parts = [f"warp to {self.warp[0]}x{self.warp[1]} {self.interpolation}"]
        else:
            parts = [f"resize {self.resize} {self.interpolation}" if self.resize else "no resize"]
        parts.append(f"crop {self.crop}" if self.crop else "no crop")
        stats = "ImageNet mean/std" if (tuple(self.mean), tuple(self.std)) == (IMAGENET_MEAN, IMAGENET_STD) else f"mean {list(self.mean)} std {list(self.std)}"
        return f"{', '.join(parts)}, {stats} ({self.source})"


def torchvision_preset(resize: int, source: str) -> Preprocess:
    """torchvision's ``ImageClassification(crop_size=224, resize_size=resize)``."""
    return Preprocess(resize, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, "round", source)


def _number(cfg: dict, key: str, default: Any, where: str, lo: float, hi: float, integer: bool = False) -> Any:
    """``cfg[key]`` as a finite number in ``(lo, hi]``, or one line naming ``where`` and ``key``."""
    v = cfg.get(key, default)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo < v <= hi
    if ok and integer:
        ok = float(v).is_integer()
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{where}: {key} must be {kind} in ({lo:g}, {hi:g}], found {v!r}")
    return int(v) if integer else float(v)


def _stats(cfg: dict, key: str, default: tuple, where: str, n: int | None = None) -> tuple[float, ...]:
    v = cfg.get(key, default)
    if not isinstance(v, (list, tuple)) or not v or (n is not None and len(v) != n):
        raise ValueError(f"{where}: {key} must be a list of {n or 'some'} numbers, found {v!r}")
    return tuple(_number({key: x}, key, None, where, -math.inf, math.inf) for x in v)


def _mapping(cfg: Any, where: str) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def timm_preset(cfg: dict, source: str) -> Preprocess:
    """timm's eval transform from a ``pretrained_cfg`` dict (``config.json``'s ``pretrained_cfg``).

    Every field read is checked (``source`` names the file and field in messages).

    Raises:
        ValueError: a field of the wrong type or out of range, one line.
    """
    cfg = _mapping(cfg, source)
    size = cfg.get("input_size", (3, 224, 224))
    if not isinstance(size, (list, tuple)) or len(size) != 3:
        raise ValueError(f"{source}: input_size must be [channels, height, width], found {size!r}")
    c, h, w = (_number({"input_size": x}, "input_size", None, source, 0, MAX_SIDE, integer=True) for x in size)
    if h != w:
        raise ValueError(f"{source}: input_size {list(size)} is not square; only square center crops are supported")
    crop_pct = _number(cfg, "crop_pct", 0.875, source, 0, 1)
    mode = cfg.get("crop_mode", "center")
    if mode != "center":
        raise ValueError(f"{source}: timm crop_mode {mode!r} is not supported (only 'center')")
    interp = cfg.get("interpolation", "bilinear")
    interp = "bicubic" if interp == "random" else interp
    if not isinstance(interp, str) or interp not in _PIL_RESAMPLE:
        raise ValueError(f"{source}: interpolation must be one of {', '.join(INTERPOLATIONS)}, found {interp!r}")
    resize = math.floor(w / crop_pct)
    if resize > MAX_SIDE:
        raise ValueError(f"{source}: input_size {w} / crop_pct {crop_pct} resizes to {resize}, more than {MAX_SIDE}")
    mean = _stats(cfg, "mean", IMAGENET_MEAN, source, c if c in (1, 3) else None)
    std = _stats(cfg, "std", IMAGENET_STD, source, len(mean))
    if min(std) <= 0:
        raise ValueError(f"{source}: std must be positive, found {list(std)}")
    return Preprocess(resize, w, interp, mean, std, "round", source)


def transformers_preset(cfg: dict, source: str) -> Preprocess:
    """``ConvNextImageProcessor``'s eval transform from a ``preprocessor_config.json`` dict.

    ``size`` is ``{"shortest_edge": N}`` (resize to ``int(N / crop_pct)``,
    crop ``N``; from 384 on, a warp to ``N x N``), ``{"height": H, "width": W}``
    (a warp to ``H x W``, no crop) or a bare ``N`` (as ``shortest_edge``).
    Every field read is checked.

    Raises:
        ValueError: a field of the wrong type or out of range, one line naming ``source`` and the field.
    """
    cfg = _mapping(cfg, source)
    size = cfg.get("size", {"shortest_edge": 224})
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        warp = (_number(size, "height", None, f"{source} size", 0, MAX_SIDE, True), _number(size, "width", None, f"{source} size", 0, MAX_SIDE, True))
        edge = None
    elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
        edge, warp = _number(size, "shortest_edge", None, f"{source} size", 0, MAX_SIDE, True), None
    elif isinstance(size, (int, float)) and not isinstance(size, bool):
        edge, warp = _number(cfg, "size", None, source, 0, MAX_SIDE, True), None
    else:
        raise ValueError(f'{source}: size must be {{"shortest_edge": N}}, {{"height": H, "width": W}} or N, found {size!r}')
    resample_code = _number(cfg, "resample", 3, source, -1, 5, integer=True)
    resample = {v: k for k, v in _PIL_RESAMPLE.items()}[resample_code]
    normalize = cfg.get("do_normalize", True)
    if not isinstance(normalize, bool):
        raise ValueError(f"{source}: do_normalize must be true or false, found {normalize!r}")
    mean = _stats(cfg, "image_mean", IMAGENET_MEAN, source) if normalize else (0.0, 0.0, 0.0)
    std = _stats(cfg, "image_std", IMAGENET_STD, source, len(mean)) if normalize else (1.0, 1.0, 1.0)
    if min(std) <= 0:
        raise ValueError(f"{source}: image_std must be positive, found {list(std)}")
    if edge is not None and edge >= 384:  # ConvNext's processor warps to edge x edge without cropping
        warp = (edge, edge)
    if warp is not None:
        return Preprocess(None, None, resample, mean, std, "floor", source, warp)
    crop_pct = _number(cfg, "crop_pct", 0.875, source, 0, 1)
    return Preprocess(int(edge / crop_pct), edge, resample, mean, std, "floor", source)


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """``(h, w)`` with the shorter side ``shorter``; the longer one truncated like torchvision's ``Resize(int)``."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def crop_box(height: int, width: int, crop: int, rounding: str = "round") -> tuple[int, int]:
    """``(top, left)`` of a ``crop`` x ``crop`` center crop (torchvision's ``CenterCrop`` for ``round``)."""
    if crop > height or crop > width:
        raise ValueError(f"a {crop}x{crop} crop does not fit a {height}x{width} image; resize first")
    if rounding == "floor":
        return (height - crop) // 2, (width - crop) // 2
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _resize(image: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """PIL resize of an HWC uint8 (as RGB/L, like torchvision on PIL images) or float array (per channel, mode F)."""
    Image = pillow()
    h, w = size
    resample = _PIL_RESAMPLE[interpolation]
    if image.dtype == np.uint8 and image.shape[-1] in (1, 3):
        img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        out = np.asarray(img.resize((w, h), resample))
        return out[..., None] if out.ndim == 2 else out
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode="F").resize((w, h), resample)) for c in range(image.shape[-1])]
    return np.stack(chans, axis=-1)


def apply(image: Any, pp: Preprocess) -> np.ndarray:
    """One image (HWC array, uint8 0..255 or float 0..1, or a PIL image) -> normalized HWC float32.

    Raises:
        ValueError: not an HWC image, an empty one, one over ``MAX_PIXELS``
            before or after resizing, or a crop larger than the resized image.
    """
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W, C), got shape {a.shape}")
    if a.shape[-1] != len(pp.mean):
        raise ValueError(f"expected {len(pp.mean)} channels in the last axis (HWC), got shape {a.shape}")
    if 0 in a.shape:
        raise ValueError(f"an empty image (shape {a.shape})")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise ValueError(f"a {a.shape[0]}x{a.shape[1]} image has more than {MAX_PIXELS:,} pixels; refused")
    if pp.warp is not None:
        a = _resize(a, pp.warp, pp.interpolation)
    elif pp.resize is not None:
        size = resized_size(a.shape[0], a.shape[1], pp.resize)
        if size[0] * size[1] > MAX_PIXELS:
            raise ValueError(
                f"a {a.shape[0]}x{a.shape[1]} image (aspect ratio {max(a.shape[:2]) / min(a.shape[:2]):.0f}:1) resized to "
                f"shorter side {pp.resize} becomes {size[0]}x{size[1]}, more than {MAX_PIXELS:,} pixels; crop it first"
            )
        a = _resize(a, size, pp.interpolation)
    if pp.crop is not None:
        top, left = crop_box(a.shape[0], a.shape[1], pp.crop, pp.crop_rounding)
        a = a[top : top + pp.crop, left : left + pp.crop]
    x = a.astype(np.float32) / np.float32(255.0) if a.dtype == np.uint8 else a.astype(np.float32)
    return (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)


class PrecisionWarning(UserWarning):
    """An image read with less precision than it holds (16-bit images clipped to 8 bits)."""


_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _open(path: str):
    """``Image.open`` with one-line errors; the size checked against ``MAX_PIXELS`` before any decoding."""
    Image = pillow()
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, DecompressionBombError, ...
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    w, h = img.size
    if w * h > MAX_PIXELS or w == 0 or h == 0:
        img.close()
        raise ValueError(f"{path}: a {h}x{w} image; images of 1 to {MAX_PIXELS:,} pixels are read")
    return img


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header alone.

    Raises:
        FileNotFoundError; ValueError: not an image Pillow reads, or over ``MAX_PIXELS``.
    """
    with _open(path) as img:
        return img.size[1], img.size[0]


def read_image(path: str, channels: int = 3) -> np.ndarray:
    """An image file as HWC uint8 (RGB, or L for one channel), EXIF rotation not applied (as torchvision's loader).

    As torchvision's PIL loader: RGBA loses its alpha channel, grey is
    repeated to RGB, and 16-bit images are clipped to 8 bits (a
    ``PrecisionWarning`` says so).

    Raises:
        FileNotFoundError; ValueError: not an image Pillow can read, or over ``MAX_PIXELS``.
    """
    import warnings

    with _open(path) as img:
        try:
            if img.mode in _WIDE_MODES:
                warnings.warn(f"with more than 8 bits per pixel (first: {path}, mode {img.mode}) were clipped to 8 bits, as torchvision's PIL loader does", PrecisionWarning, stacklevel=2)
            a = np.asarray(img.convert("L" if channels == 1 else "RGB"))
        except Exception as e:  # truncated files, decoder errors
            raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    return a[..., None] if a.ndim == 2 else a


def batch(images: Sequence[Any], pp: Preprocess) -> np.ndarray:
    """Preprocesses several images into one NHWC float32 batch."""
    return np.stack([apply(im, pp) for im in images])
