"""Small image-classification datasets held in memory as NHWC numpy arrays.

``load_digits`` is scikit-learn's handwritten digits (1,797 real 8x8 scans
that ship inside scikit-learn), upscaled to 32x32; ``load_npz`` reads a
user's own ``.npz`` of ``images`` and ``labels`` and refuses data that would
train into garbage (non-finite pixels, labels out of range, channels-first
arrays, empty images, archives that inflate far beyond their size), each with
one line naming the file, the array and the first offending index.
``batches`` yields shuffled, optionally augmented mini-batches whose order
depends only on ``(seed, epoch)``, so a resumed run sees exactly the batches
an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from flax_resnet.io import npz

__all__ = [
    "Dataset",
    "DatasetError",
    "DatasetWarning",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "load_digits",
    "load_npz",
    "load_dataset",
    "batches",
    "num_batches",
    "random_shift",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's, for images in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("dataset", "imagenet", "none")
MAX_CLASSES = 1_000_000  # a larger head is a label bug, not a dataset


class DatasetError(ValueError):
    """A dataset file that cannot be trained on; the message names the file and the array."""


class DatasetWarning(UserWarning):
    """A dataset that trains but cannot be learned whole (a test class never seen in training)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split of float32 NHWC images and int32 labels.

    Images are ``(x - mean) / std`` per channel; ``mean``/``std`` are the
    *training* set's own (``normalize="dataset"``), ImageNet's
    (``"imagenet"``) or 0/1 (``"none"``), kept for inference on new images.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: np.ndarray
    std: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (half-pixel centres, as ``jax.image.resize``) resize of NHWC images."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images

    def matrix(src: int, dst: int) -> np.ndarray:
        # Row i holds the interpolation weights of output pixel i over the input pixels.
        pos = (np.arange(dst) + 0.5) * src / dst - 0.5
        pos = np.clip(pos, 0, src - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        frac = pos - lo
        m = np.zeros((dst, src))
        m[np.arange(dst), lo] += 1 - frac
        m[np.arange(dst), hi] += frac
        return m

    rh, rw = matrix(h, size), matrix(w, size)
    out = np.einsum("ih,nhwc,jw->nijc", rh, images.astype(np.float64), rw)
    return out.astype(np.float32)


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the digits data and seeded data splits need scikit-learn: pip install 'flax-resnet[train]'") from None


def _split(images, labels, test_fraction: float, seed: int, where: str = "digits"):
    _sklearn()
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise DatasetError(f"{where}: test_fraction must be between 0 and 1, got {test_fraction}")
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    n_test = int(np.ceil(test_fraction * len(labels)))
    n_classes = int((counts > 0).sum())
    if stratify is not None and not n_classes <= n_test <= len(labels) - n_classes:
        raise DatasetError(
            f"{where}: a {test_fraction:g} test split of {len(labels)} images holds {n_test} test and {len(labels) - n_test} training images; "
            f"a stratified split needs at least one per class ({n_classes}) in each: add images or give test_images/test_labels"
        )
    return train_test_split(images, labels, test_size=test_fraction, random_state=seed, stratify=stratify)


def _unseen_test_classes(where: str, y_train: np.ndarray, y_test: np.ndarray) -> None:
    unseen = np.setdiff1d(y_test, y_train)
    if unseen.size:
        import warnings

        i = int(np.argmax(np.isin(y_test, unseen)))
        warnings.warn(
            f"{where}: test label {int(y_test[i])} (test_labels[{i}]) and {unseen.size - 1} more class id(s) never occur in training: "
            "those test images cannot be classified right",
            DatasetWarning,
            stacklevel=3,
        )


def _normalization(normalize: str, x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = x_train.shape[-1]
    if normalize == "dataset":
        mean = x_train.mean(axis=(0, 1, 2), dtype=np.float64)
        std = x_train.std(axis=(0, 1, 2), dtype=np.float64)
        std = np.where(std > 0, std, 1.0)
    elif normalize == "imagenet":
        if c not in (1, 3):
            raise DatasetError(f"ImageNet normalization needs 1 or 3 channels, the images have {c}")
        # Grey images: the channel average (a grey pixel replicated to RGB sees about the same).
        mean, std = (np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)) if c == 3 else (np.mean(IMAGENET_MEAN, keepdims=True), np.mean(IMAGENET_STD, keepdims=True))
    elif normalize == "none":
        mean, std = np.zeros(c), np.ones(c)
    else:
        raise ValueError(f"unknown normalize {normalize!r}; use one of {', '.join(NORMALIZATIONS)}")
    return mean.astype(np.float32), std.astype(np.float32)


def _finish(name, x_train, y_train, x_test, y_test, num_classes: int, normalize: str = "dataset") -> Dataset:
    x_train = x_train.astype(np.float32)
    x_test = x_test.astype(np.float32)
    mean, std = _normalization(normalize, x_train)
    norm = lambda x: ((x - mean) / std).astype(np.float32)
    return Dataset(name, norm(x_train), np.asarray(y_train, np.int32), norm(x_test), np.asarray(y_test, np.int32), int(num_classes), mean, std)


def load_digits(size: int = 32, channels: int = 1, test_fraction: float = 0.2, seed: int = 0, normalize: str = "dataset") -> Dataset:
    """scikit-learn's handwritten digits, upscaled to ``size`` x ``size``.

    1,797 8x8 grey images with values 0..16 (divided by 16), ten classes.
    The split is a fixed stratified one (80/20 by default: 1,437 train,
    360 test).

    Args:
        size: output height and width (bilinear upscaling).
        channels: 1 (grey) or 3 (the grey image repeated, for RGB models).
        test_fraction: share of the images held out for testing.
        seed: seed of the split.
        normalize: ``"dataset"`` (the training set's mean/std),
            ``"imagenet"`` or ``"none"``.
    """
    _sklearn()
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = (d.images.astype(np.float32) / 16.0)[..., None]
    images = _resize(images, size)
    if channels == 3:
        images = np.repeat(images, 3, axis=-1)
    elif channels != 1:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    x_train, x_test, y_train, y_test = _split(images, d.target.astype(np.int32), test_fraction, seed)
    return _finish("digits", x_train, y_train, x_test, y_test, 10, normalize)


# ------------------------------------------------------------------ .npz files


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _first(mask: np.ndarray) -> tuple[int, ...]:
    """Index of the first True of ``mask`` (C order)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def _at(key: str, idx: tuple[int, ...]) -> str:
    return f"{key}[{', '.join(map(str, idx))}]"


def _check_images(path: str, key: str, shape: tuple[int, ...], dtype: np.dtype, channels_first: bool) -> None:
    """Checks of an image array's declared shape and dtype (before reading it)."""
    if len(shape) not in (3, 4):
        raise DatasetError(f"{path}: {key} must be (N, H, W) or (N, H, W, C), got shape {shape}")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_):
        raise DatasetError(f"{path}: {key} must hold integers or floats, got dtype {dtype}")
    if shape[0] == 0:
        raise DatasetError(f"{path}: {key} holds no images (shape {shape})")
    if 0 in shape:
        raise DatasetError(f"{path}: {key} has an empty image axis (shape {shape})")
    if len(shape) == 4:
        first_c, last_c = shape[1] in (1, 3), shape[-1] in (1, 3)
        if not channels_first and first_c and not last_c:
            raise DatasetError(
                f"{path}: {key} of shape {shape} looks channels-first (N, C, H, W); images are NHWC here: "
                "pass --channels-first (channels_first=True) to transpose them"
            )
        if channels_first and last_c and not first_c:
            raise DatasetError(f"{path}: {key} of shape {shape} looks channels-last (N, H, W, C) already: drop --channels-first")
    elif channels_first:
        raise DatasetError(f"{path}: --channels-first needs (N, C, H, W) images, {key} has shape {shape}")


def _images(path: str, key: str, x: np.ndarray, channels_first: bool) -> np.ndarray:
    """float32 NHWC images from a checked array; integers scaled by 1/255, bools to 0/1."""
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            i = _first(bad)
            raise DatasetError(f"{path}: {_at(key, i)} is {x[i]}: every pixel must be finite (one NaN/Inf makes every normalized pixel NaN)")
        if np.finfo(x.dtype).max > np.finfo(np.float32).max:
            big = np.abs(x) > np.finfo(np.float32).max
            if big.any():
                i = _first(big)
                raise DatasetError(f"{path}: {_at(key, i)} = {x[i]:g} does not fit float32 (|x| <= 3.4e38)")
        x = x.astype(np.float32)
    elif x.dtype == np.bool_:
        x = x.astype(np.float32)
    else:
        x = x.astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[..., None]
    elif channels_first:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x


def _labels(path: str, key: str, y: np.ndarray, n: int, num_classes: int | None) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: {key} must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
    if len(y) != n:
        raise DatasetError(f"{path}: {key} has {len(y)} entries for {n} images")
    if len(y) and (y < 0).any():
        i = _first(y < 0)
        raise DatasetError(f"{path}: {_at(key, i)} = {y[i]}: class ids must be >= 0")
    if len(y) and (y >= MAX_CLASSES).any():  # before any cast: a uint64 2**63 + 3 would wrap to a small id
        i = _first(y >= MAX_CLASSES)
        raise DatasetError(f"{path}: {_at(key, i)} = {y[i]} is not a class id (at most {MAX_CLASSES:,} classes)")
    if num_classes is not None and len(y) and (y >= num_classes).any():
        i = _first(y >= num_classes)
        raise DatasetError(f"{path}: {_at(key, i)} = {y[i]} is not a class id below num_classes {num_classes}")
    return y


def _dense_classes(path: str, labels: dict[str, np.ndarray]) -> int:
    """The number of classes when the labels use every id 0..K-1; otherwise refuses."""
    classes = np.unique(np.concatenate([y.astype(np.int64) for y in labels.values()]))
    k = int(classes[-1]) + 1
    if k != len(classes):
        key, y = max(labels.items(), key=lambda kv: int(kv[1].max(initial=0)))
        i = _first(y == classes[-1])
        raise DatasetError(
            f"{path}: {_at(key, i)} = {classes[-1]} but the labels hold only {len(classes)} distinct class ids, "
            f"not every id 0..{classes[-1]}: pass --num-classes (num_classes=) to train a head of that many classes"
        )
    return k


def load_npz(
    path: str | os.PathLike,
    size: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    num_classes: int | None = None,
    channels_first: bool = False,
    channels: int | None = None,
    normalize: str = "dataset",
) -> Dataset:
    """A user's dataset from a ``.npz`` file.

    Required keys: ``images`` (N, H, W) or (N, H, W, C), and ``labels`` (N,)
    integer class ids from 0. Optional ``test_images`` / ``test_labels`` give
    a fixed test split; otherwise ``test_fraction`` of the data is held out
    (stratified, seeded). Integer images are divided by 255, float images
    are taken as they are (ImageNet's mean/std expect values in [0, 1]).

    Args:
        path: the ``.npz`` file (``np.savez(path, images=..., labels=...)``).
        size: resize images to ``size`` x ``size`` (bilinear); ``None`` keeps them.
        test_fraction: held-out share when the file has no test split.
        seed: seed of that split.
        num_classes: size of the classifier; default: inferred from the
            labels when they use every id 0..K-1 (a stray id like 100000
            is refused rather than turned into a 100,001-class head).
        channels_first: the images are (N, C, H, W): transpose them. Without
            it such arrays (a leading axis of 1 or 3, a trailing one that is
            not) are refused.
        channels: 3 repeats grey images to RGB (for an RGB checkpoint).
        normalize: ``"dataset"`` (the training set's per-channel mean/std),
            ``"imagenet"`` (torchvision's mean/std, for ImageNet weights) or
            ``"none"``.

    Raises:
        DatasetError: the file cannot be trained on (one line naming the
            file, the array and the first offending index).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such dataset file: {path}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; use one of {', '.join(NORMALIZATIONS)}")
    if num_classes is not None and not 1 <= num_classes <= MAX_CLASSES:
        raise DatasetError(f"{path}: num_classes must be between 1 and {MAX_CLASSES:,}, got {num_classes}")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise DatasetError(f"{path} is a single .npy array; a dataset is a .npz with images and labels: np.savez(path, images=x, labels=y)")
    keys = ("images", "labels", "test_images", "test_labels")
    declared = {k: (m.shape, m.dtype) for k, m in npz.members(path, DatasetError).items() if k in keys}
    missing = [k for k in ("images", "labels") if k not in declared]
    if missing:
        raise DatasetError(f"{path} lacks array(s) {', '.join(missing)}; np.savez(path, images=x, labels=y)")
    if ("test_images" in declared) != ("test_labels" in declared):
        raise DatasetError(f"{path} must have both test_images and test_labels, or neither")
    image_keys = [k for k in ("images", "test_images") if k in declared]
    for k in image_keys:
        _check_images(path, k, *declared[k], channels_first)
    pixels = sum(int(np.prod(declared[k][0], dtype=object)) for k in image_keys)
    need, avail = 3 * 4 * pixels, _available_memory()  # float32 copies: read, normalized, split
    if avail is not None and need > avail:
        raise DatasetError(f"{path}: the images need ~{need / 2**30:.1f} GiB as float32, {avail / 2**30:.1f} GiB of memory is available")

    def read(key):
        return npz.read(path, key, DatasetError)

    x = _images(path, "images", read("images"), channels_first)
    if x.min() == x.max():
        raise DatasetError(f"{path}: every pixel of every image is {x.flat[0]:g}: constant images hold nothing to learn")
    y = _labels(path, "labels", read("labels"), len(x), num_classes)
    labels = {"labels": y}
    if "test_images" in declared:
        xt = _images(path, "test_images", read("test_images"), channels_first)
        yt = _labels(path, "test_labels", read("test_labels"), len(xt), num_classes)
        if xt.shape[1:] != x.shape[1:]:
            raise DatasetError(f"{path}: test_images are {xt.shape[1:]} (NHWC), images are {x.shape[1:]}")
        labels["test_labels"] = yt
    if num_classes is None:
        num_classes = _dense_classes(path, labels)
    y = y.astype(np.int32)
    if channels is not None and x.shape[-1] != channels:
        if (x.shape[-1], channels) != (1, 3):
            raise DatasetError(f"{path}: images have {x.shape[-1]} channels, {channels} are needed")
        x = np.repeat(x, 3, -1)
        if "test_images" in declared:
            xt = np.repeat(xt, 3, -1)
    if size:
        x = _resize(x, size)
    if "test_images" in declared:
        x_train, y_train, x_test, y_test = x, y, (_resize(xt, size) if size else xt), yt.astype(np.int32)
    else:
        if len(x) < 2:
            raise DatasetError(f"{path} needs at least 2 images to split off a test set")
        x_train, x_test, y_train, y_test = _split(x, y, test_fraction, seed, path)
    _unseen_test_classes(path, np.asarray(y_train), np.asarray(y_test))
    name = os.path.splitext(os.path.basename(path))[0]
    return _finish(name, x_train, y_train, x_test, y_test, num_classes, normalize)


def load_dataset(name: str, **kwargs) -> Dataset:
    """``"digits"`` or a path to a ``.npz`` file (see ``load_digits`` and ``load_npz``)."""
    if name == "digits":
        for k in ("num_classes", "channels_first"):
            kwargs.pop(k, None)
        return load_digits(**kwargs)
    if name.endswith((".npz", ".npy")) or os.path.exists(name):
        return load_npz(name, **kwargs)
    raise ValueError(f"unknown dataset {name!r}: use 'digits' or a path to a .npz file with images and labels")


def random_shift(images: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Translates each image by up to ``max_shift`` pixels in H and W (edge pixels fill the gap)."""
    if max_shift <= 0:
        return images
    n, h, w, c = images.shape
    p = max_shift
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
    dy = rng.integers(0, 2 * p + 1, size=n)
    dx = rng.integers(0, 2 * p + 1, size=n)
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches in an epoch of ``n`` examples."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    max_shift: int = 0,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mini-batches of one epoch; deterministic in ``(seed, epoch)``.

    Training batches drop the remainder so every step has the same shape
    (one compilation). ``max_shift`` applies ``random_shift`` augmentation.
    """
    n = len(labels)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    for b in range(num_batches(n, batch_size, drop_last)):
        idx = order[b * batch_size : (b + 1) * batch_size]
        x = images[idx]
        if max_shift:
            x = random_shift(x, rng, max_shift)
        yield x, labels[idx]
