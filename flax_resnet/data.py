"""Small image-classification datasets held in memory as NHWC numpy arrays.

``load_digits`` is scikit-learn's handwritten digits (1,797 real 8x8 scans
that ship inside scikit-learn), upscaled to 32x32; ``load_npz`` reads a
user's own ``.npz`` of ``images`` and ``labels``. ``batches`` yields
shuffled, optionally augmented mini-batches whose order depends only on
``(seed, epoch)``, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

__all__ = ["Dataset", "load_digits", "load_npz", "load_dataset", "batches", "num_batches", "random_shift"]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split of float32 NHWC images and int32 labels.

    Images are normalized per channel with the *training* mean and std
    (``mean``/``std``, kept for inference on new images).
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


def _split(images, labels, test_fraction: float, seed: int):
    _sklearn()
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    return train_test_split(images, labels, test_size=test_fraction, random_state=seed, stratify=stratify)


def _finish(name, x_train, y_train, x_test, y_test, num_classes=None) -> Dataset:
    x_train = x_train.astype(np.float32)
    x_test = x_test.astype(np.float32)
    mean = x_train.mean(axis=(0, 1, 2))
    std = x_train.std(axis=(0, 1, 2))
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    norm = lambda x: ((x - mean) / std).astype(np.float32)
    y_train = np.asarray(y_train, np.int32)
    y_test = np.asarray(y_test, np.int32)
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return Dataset(name, norm(x_train), y_train, norm(x_test), y_test, int(num_classes), mean.astype(np.float32), std)


def load_digits(size: int = 32, channels: int = 1, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's handwritten digits, upscaled to ``size`` x ``size``.

    1,797 8x8 grey images with values 0..16, ten classes. The split is a
    fixed stratified one (80/20 by default: 1,437 train, 360 test).

    Args:
        size: output height and width (bilinear upscaling).
        channels: 1 (grey) or 3 (the grey image repeated, for RGB models).
        test_fraction: share of the images held out for testing.
        seed: seed of the split.
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
    return _finish("digits", x_train, y_train, x_test, y_test, num_classes=10)


def load_npz(path: str | os.PathLike, size: int | None = None, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A user's dataset from a ``.npz`` file.

    Required keys: ``images`` (N, H, W) or (N, H, W, C), and ``labels`` (N,)
    integer class ids from 0. Optional ``test_images`` / ``test_labels`` give
    a fixed test split; otherwise ``test_fraction`` of the data is held out
    (stratified, seeded). Integer images are scaled by 1/255.

    Args:
        path: the ``.npz`` file.
        size: resize images to ``size`` x ``size`` (bilinear); ``None`` keeps them.
        test_fraction: held-out share when the file has no test split.
        seed: seed of that split.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such dataset file: {path}")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - anything unreadable is a usage error
        raise ValueError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    with f:
        keys = set(getattr(f, "files", ()))
        missing = [k for k in ("images", "labels") if k not in keys]
        if missing:
            raise ValueError(f"{path} lacks key(s) {', '.join(missing)}; it has: {', '.join(sorted(keys)) or 'none'}")
        if ("test_images" in keys) != ("test_labels" in keys):
            raise ValueError(f"{path} must have both test_images and test_labels, or neither")
        arrays = {k: f[k] for k in keys}

    def images_of(key):
        x = arrays[key]
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f"{key} must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
        if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            x = x.astype(np.float32) / 255.0
        elif not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{key} must be numeric, got dtype {x.dtype}")
        x = x.astype(np.float32)
        return _resize(x, size) if size else x

    def labels_of(key, n):
        y = arrays[key]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{key} must be a 1-D integer array, got {y.dtype} {y.shape}")
        if len(y) != n:
            raise ValueError(f"{key} has {len(y)} entries for {n} images")
        if len(y) and y.min() < 0:
            raise ValueError(f"{key} must be class ids >= 0")
        return y.astype(np.int32)

    x = images_of("images")
    y = labels_of("labels", len(x))
    if len(x) == 0:
        raise ValueError(f"{path} holds no images")
    if "test_images" in keys:
        xt = images_of("test_images")
        yt = labels_of("test_labels", len(xt))
        if xt.shape[1:] != x.shape[1:]:
            raise ValueError(f"test_images are {xt.shape[1:]}, images are {x.shape[1:]}")
        x_train, y_train, x_test, y_test = x, y, xt, yt
    else:
        if len(x) < 2:
            raise ValueError(f"{path} needs at least 2 images to split off a test set")
        x_train, x_test, y_train, y_test = _split(x, y, test_fraction, seed)
    name = os.path.splitext(os.path.basename(path))[0]
    return _finish(name, x_train, y_train, x_test, y_test)


def load_dataset(name: str, **kwargs) -> Dataset:
    """``"digits"`` or a path to a ``.npz`` file (see ``load_npz``)."""
    if name == "digits":
        return load_digits(**kwargs)
    if name.endswith(".npz") or os.path.exists(name):
        kwargs.pop("channels", None)
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
