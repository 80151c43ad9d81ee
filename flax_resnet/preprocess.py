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
    """

    resize: int | None = 256
    crop: int | None = 224
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_rounding: str = "round"
    source: str = "torchvision IMAGENET1K_V1 (default)"

    def __post_init__(self):
        if self.interpolation not in _PIL_RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
        if self.crop_rounding not in ("round", "floor"):
            raise ValueError(f"crop_rounding must be 'round' or 'floor', got {self.crop_rounding!r}")
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} have different lengths")

    def describe(self) -> str:
        """One line: ``resize 232 bilinear, crop 224, ImageNet mean/std (torchvision ...)``."""
        parts = [f"resize {self.resize} {self.interpolation}" if self.resize else "no resize"]
        parts.append(f"crop {self.crop}" if self.crop else "no crop")
        stats = "ImageNet mean/std" if (tuple(self.mean), tuple(self.std)) == (IMAGENET_MEAN, IMAGENET_STD) else f"mean {list(self.mean)} std {list(self.std)}"
        return f"{', '.join(parts)}, {stats} ({self.source})"


def torchvision_preset(resize: int, source: str) -> Preprocess:
    """torchvision's ``ImageClassification(crop_size=224, resize_size=resize)``."""
    return Preprocess(resize, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, "round", source)


def timm_preset(cfg: dict, source: str) -> Preprocess:
    """timm's eval transform from a ``pretrained_cfg`` dict (``config.json``'s ``pretrained_cfg``)."""
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct", 0.875))
    mode = cfg.get("crop_mode", "center")
    if mode != "center":
        raise ValueError(f"{source}: timm crop_mode {mode!r} is not supported (only 'center')")
    interp = cfg.get("interpolation", "bilinear")
    interp = "bicubic" if interp == "random" else interp
    return Preprocess(
        math.floor(size / crop_pct), size, interp,
        tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)), "round", source,
    )


def transformers_preset(cfg: dict, source: str) -> Preprocess:
    """``ConvNextImageProcessor``'s eval transform from a ``preprocessor_config.json`` dict."""
    size = cfg.get("size", {"shortest_edge": 224})
    edge = int(size["shortest_edge"] if isinstance(size, dict) else size)
    resample = {v: k for k, v in _PIL_RESAMPLE.items()}.get(int(cfg.get("resample", 3)), "bicubic")
    mean = tuple(cfg.get("image_mean", IMAGENET_MEAN)) if cfg.get("do_normalize", True) else (0.0, 0.0, 0.0)
    std = tuple(cfg.get("image_std", IMAGENET_STD)) if cfg.get("do_normalize", True) else (1.0, 1.0, 1.0)
    if edge >= 384:  # ConvNext's processor warps to edge x edge without cropping
        raise ValueError(f"{source}: shortest_edge {edge} >= 384 (resize without crop) is not supported")
    return Preprocess(int(edge / float(cfg.get("crop_pct", 0.875))), edge, resample, mean, std, "floor", source)


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
        ValueError: not an HWC image, or a crop larger than the resized image.
    """
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W, C), got shape {a.shape}")
    if a.shape[-1] != len(pp.mean):
        raise ValueError(f"expected {len(pp.mean)} channels in the last axis (HWC), got shape {a.shape}")
    if pp.resize is not None:
        a = _resize(a, resized_size(a.shape[0], a.shape[1], pp.resize), pp.interpolation)
    if pp.crop is not None:
        top, left = crop_box(a.shape[0], a.shape[1], pp.crop, pp.crop_rounding)
        a = a[top : top + pp.crop, left : left + pp.crop]
    x = a.astype(np.float32) / np.float32(255.0) if a.dtype == np.uint8 else a.astype(np.float32)
    return (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)


def read_image(path: str, channels: int = 3) -> np.ndarray:
    """An image file as HWC uint8 (RGB, or L for one channel), EXIF rotation not applied (as torchvision's loader).

    Raises:
        FileNotFoundError; ValueError: not an image Pillow can read.
    """
    Image = pillow()
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            a = np.asarray(img)
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    return a[..., None] if a.ndim == 2 else a


def batch(images: Sequence[Any], pp: Preprocess) -> np.ndarray:
    """Preprocesses several images into one NHWC float32 batch."""
    return np.stack([apply(im, pp) for im in images])
