"""The per-record transforms of the image pipeline, without grain: decode, RandomResizedCrop's box, normalize.

``flax_resnet.imagedata.ops`` wraps them as grain operations and
``flax_resnet.imagedata.stream`` uses ``decode`` for the in-memory path.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
from typing import Any

import numpy as np

from flax_resnet import preprocess as pp
from flax_resnet.imagedata.sources import Encoded, check_header

AUGMENTS = {"standard": (0.08, 1.0), "light": (0.35, 1.0), "none": None}
RATIO = (3 / 4, 4 / 3)


class BadImage(ValueError):
    """An image that fails to decode; one line naming it."""


def decode(payload: Any) -> Any:
    """A record's payload (path, ``Encoded`` bytes, or HWC array) -> an RGB PIL image (``.convert("RGB")``, torchvision's loader).

    Raises:
        BadImage: unreadable or truncated, too many pixels, extreme aspect ratio.
    """
    Image = pp.pillow()
    if isinstance(payload, np.ndarray):
        a = payload if payload.dtype == np.uint8 else np.clip(np.rint(payload * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")
    if isinstance(payload, Encoded):
        payload, name = payload.data, payload.name
    else:
        name = payload if isinstance(payload, str) else f"<{len(payload)} bytes>"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_header refuses it in one line
            with Image.open(payload if isinstance(payload, str) else io.BytesIO(payload)) as img:
                problem = check_header(img, name)
                if problem is None:
                    return img.convert("RGB")  # loads every pixel: truncation shows here
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
        raise BadImage(f"{name}: not a readable image ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    raise BadImage(problem)


def rrc_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of torchvision's ``RandomResizedCrop.get_params`` (numpy's generator for torch's)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: the central crop of the largest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def eval_preprocess(base: pp.Preprocess, size: int) -> pp.Preprocess:
    """The weights' eval transform at ``size``: crop ``size``, resize scaled as ``base.resize / base.crop`` (256/224 -> 37 for 32)."""
    ratio = (base.resize or base.crop or size) / (base.crop or base.resize or size)
    return dataclasses.replace(base, resize=max(size, int(round(size * ratio))), crop=size, source=f"{base.source}, at {size}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What turns records into model inputs (part of a run's identity)."""

    size: int
    augment: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_pp: pp.Preprocess
    on_bad: str = "error"


def _normalize(a: np.ndarray, recipe: Recipe) -> np.ndarray:
    x = a.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(recipe.mean, np.float32)) / np.asarray(recipe.std, np.float32)


def _bad(e: BadImage, recipe: Recipe) -> str:
    """A decode failure: raised under ``on_bad="error"``; else its message travels as the record (counted by ``TrainStream``)."""
    if recipe.on_bad == "error":
        raise BadImage(f"{e} (--on-bad-image skip leaves such files out)")
    return str(e)
