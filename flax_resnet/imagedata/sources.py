"""Where training images come from: an image folder, a Hugging Face ``datasets`` directory, in-memory arrays.

Every source is a random-access list of records (``__len__``,
``__getitem__``) that grain reads: a record is ``(payload, label)``, the
payload an encoded image (a path or the file's bytes) or an HWC array.
``open_splits`` picks the source by what the path holds and returns the
train and validation splits with their class list.

Bad data, and what happens to it (``on_bad="error"`` refuses with one line
naming the file; ``"skip"`` leaves the file out and counts it):

* a file with an image extension that Pillow cannot identify (a text file
  named ``.jpg``), an image larger than ``MAX_PIXELS``, or one whose aspect
  ratio exceeds ``MAX_ASPECT`` (a 1 x 20000 strip would be resized to
  gigabytes): found when the folder is scanned (headers only), error or skip;
* a truncated or corrupt image: found when decoded, error or skip (the
  pipeline drops the record and names it on stderr);
* files without an image extension (``.txt``, ``.DS_Store``): ignored and
  counted, as torchvision's ``ImageFolder`` ignores them;
* an empty class folder, or a class in ``val`` missing from ``train``:
  always refused (the labels would not mean what the folder names say);
* grayscale, palette, RGBA, CMYK and 16-bit images: converted with
  ``.convert("RGB")`` exactly as torchvision's loader does; one warning per
  kind where that loses information (alpha dropped, CMYK converted naively,
  16-bit values clipped to 255).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Sequence

import numpy as np

from flax_resnet.preprocess import pillow

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: its decompression-bomb limit
MAX_ASPECT = 50  # longer side / shorter side
VAL_NAMES = ("val", "validation", "valid", "test")
LOSSY_MODES = {  # PIL mode -> what .convert("RGB") loses
    "RGBA": "alpha channel dropped",
    "LA": "alpha channel dropped",
    "PA": "alpha channel dropped",
    "CMYK": "CMYK converted to RGB without a color profile",
    "I;16": "16-bit values clipped to 0..255",
    "I;16B": "16-bit values clipped to 0..255",
    "I;16L": "16-bit values clipped to 0..255",
    "I": "32-bit integer values clipped to 0..255",
    "F": "floating-point values clipped to 0..255",
}
ON_BAD = ("error", "skip")


class DataError(ValueError):
    """Data that cannot be trained on; the message is one line naming the file or folder."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_header(img: Any, name: str) -> str | None:
    """Why an opened PIL image is refused (too many pixels, extreme aspect ratio), or None."""
    w, h = img.size
    if w < 1 or h < 1:
        return f"{name}: empty image ({w}x{h})"
    if w * h > MAX_PIXELS:
        return f"{name}: {w}x{h} is over {MAX_PIXELS:,} pixels (Pillow's decompression-bomb limit)"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return f"{name}: {w}x{h} has an aspect ratio over {MAX_ASPECT}:1; crop or pad it"
    return None


def _probe(path: str) -> tuple[str | None, str | None]:
    """``(mode, problem)`` from the file's header (no pixel is decoded)."""
    Image = pillow()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_header refuses it in one line
            with Image.open(path) as img:
                return img.mode, check_header(img, path)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for non-images
        return None, f"{path}: not a readable image ({type(e).__name__}: {' '.join(str(e).split())[:120]})"


@dataclasses.dataclass
class Split:
    """One split: records and their class names.

    Attributes:
        records: a random-access source of ``(payload, label)``.
        classes: class names by label.
        name: for messages and run identity.
        identity: a digest of what the split holds (files and labels).
    """

    records: Any
    classes: tuple[str, ...]
    name: str
    identity: str

    def __len__(self) -> int:
        return len(self.records)


class FileRecords:
    """``(path, label)`` records of an image folder; grain's random-access source (picklable)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]):
        self.paths = list(paths)
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return self.paths[int(i)], int(self.labels[int(i)])

    def __repr__(self) -> str:  # grain checks a resumed iterator's source by repr
        return f"FileRecords({len(self.paths)} files, {_digest(self.paths, self.labels.tolist())})"


class ArrayRecords:
    """``(HWC array, label)`` records of in-memory images (uint8 0..255 or float 0..1)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[int(i)], int(self.labels[int(i)])

    def __repr__(self) -> str:
        return f"ArrayRecords({len(self.labels)} images, {_digest(self.images.shape, self.labels.tolist())})"


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]


def _class_files(root: str) -> tuple[tuple[str, ...], list[tuple[str, int]], int]:
    """torchvision's ``ImageFolder`` listing: sorted class folders, their image files; non-images counted."""
    classes = tuple(sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")))
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    items, ignored = [], 0
    for label, c in enumerate(classes):
        files = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, c), followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(dirpath, f))
                else:
                    ignored += 1
        if not files:
            raise DataError(f"{os.path.join(root, c)}: empty class folder (no {'/'.join(IMG_EXTENSIONS)} files); remove it or add images")
        items += [(f, label) for f in files]
    return classes, items, ignored


def _scan(items: list[tuple[str, int]], on_bad: str, report: dict) -> list[tuple[str, int]]:
    """Reads every header (threads); refuses or drops unreadable/oversized files; notes lossy modes."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        probes = list(pool.map(lambda it: _probe(it[0]), items))
    kept = []
    for (path, label), (mode, problem) in zip(items, probes):
        if problem is not None:
            if on_bad == "error":
                raise DataError(f"{problem} (--on-bad-image skip leaves such files out)")
            report.setdefault("skipped", []).append(problem)
            continue
        if mode in LOSSY_MODES:
            report.setdefault("lossy", {}).setdefault(mode, path)
        kept.append((path, label))
    return kept


def _folder_split(root: str, on_bad: str, report: dict, classes: tuple[str, ...] | None = None) -> Split:
    found, items, ignored = _class_files(root)
    if classes is not None:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(f"{root}: class folder {extra[0]!r} is not in the training classes ({len(classes)}: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
        remap = [classes.index(c) for c in found]  # val may lack some classes
        items = [(p, remap[l]) for p, l in items]
    else:
        classes = found
    report["ignored"] = report.get("ignored", 0) + ignored
    items = _scan(items, on_bad, report)
    if not items:
        raise DataError(f"{root}: no readable images")
    rel = [(os.path.relpath(p, root), l) for p, l in items]
    return Split(FileRecords([p for p, _ in items], [l for _, l in items]), classes, root, _digest(classes, rel))


def _subset(split: Split, idx: np.ndarray, name: str) -> Split:
    r = split.records
    records = FileRecords([r.paths[i] for i in idx], r.labels[idx]) if isinstance(r, FileRecords) else _Indexed(r, idx)
    return Split(records, split.classes, name, _digest(split.identity, name, idx.tolist()))


class _Indexed:
    """A subset of another source, by index (picklable)."""

    def __init__(self, base, idx):
        self.base, self.idx = base, np.asarray(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        return self.base[int(self.idx[int(i)])]

    def __repr__(self) -> str:
        return f"Subset({self.base!r}, {_digest(self.idx.tolist())})"


def seeded_split(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Train/val subsets of one split, stratified per class, deterministic in ``seed``."""
    labels = np.asarray([split.records[i][1] for i in range(len(split))]) if not hasattr(split.records, "labels") else split.records.labels
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(len(idx) * val_fraction))) if len(idx) > 1 else 0
        val += idx[:k].tolist()
    val_idx = np.sort(np.asarray(val, np.int64))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return _subset(split, train_idx, split.name + f" (train, seed {seed})"), _subset(split, val_idx, split.name + f" (val {val_fraction:g}, seed {seed})")


def _datasets():
    try:
        import datasets
    except ModuleNotFoundError:
        raise ModuleNotFoundError("reading a Hugging Face datasets directory needs datasets: pip install 'flax-resnet[datasets]'", name="datasets") from None
    return datasets


class Encoded(NamedTuple):
    """An encoded image held in memory (a ``datasets`` row's bytes) and the name its errors give it."""

    data: bytes
    name: str


class HFRecords:
    """``(Encoded or path, label)`` records of a Hugging Face ``datasets.Dataset`` (picklable: Arrow files are memory-mapped)."""

    def __init__(self, ds, image_col: str, label_col: str, where: str = "datasets"):
        self.ds, self.image_col, self.label_col, self.where = ds, image_col, label_col, where
        self.labels = np.asarray(ds[label_col], np.int32)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[int(i)]
        im = row[self.image_col]
        payload = im.get("bytes") or im.get("path") if isinstance(im, dict) else im
        if isinstance(payload, bytes):
            payload = Encoded(payload, f"{self.where} row {int(i)} ({self.image_col!r})")
        return payload, int(row[self.label_col])

    def __repr__(self) -> str:
        return f"HFRecords({len(self.labels)} rows, {getattr(self.ds, '_fingerprint', '')})"


def _hf_split(ds, where: str, classes: tuple[str, ...] | None) -> Split:
    datasets = _datasets()
    cols = ds.column_names
    image_col = next((c for c in ("image", "img", "pixel_values") if c in cols), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in cols), None)
    if image_col is None or label_col is None:
        raise DataError(f"{where}: needs an image column (image/img) and a label column (label/labels); it has {', '.join(cols)}")
    feat = ds.features[label_col]
    if isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    names = tuple(feat.names) if isinstance(feat, datasets.ClassLabel) else None
    records = HFRecords(ds, image_col, label_col, where)
    y = records.labels
    if len(y) == 0:
        raise DataError(f"{where}: no rows")
    if y.min() < 0:
        raise DataError(f"{where}: label {int(y.min())} at row {int(np.argmin(y))} is negative")
    if names is None:
        names = classes or tuple(str(i) for i in range(int(y.max()) + 1))
    if classes is not None and names != classes[: len(names)]:
        raise DataError(f"{where}: its class names differ from the training split's")
    if int(y.max()) >= len(classes or names):
        raise DataError(f"{where}: label {int(y.max())} at row {int(np.argmax(y))} is out of range for {len(classes or names)} classes")
    fp = getattr(ds, "_fingerprint", None) or _digest(len(ds), y[:1000].tolist())
    return Split(records, tuple(classes or names), where, _digest(fp, names))


def _open_hf(path: str):
    """``{split name: datasets.Dataset}`` of a ``save_to_disk`` directory or a folder of parquet files."""
    datasets = _datasets()
    if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
        d = datasets.load_from_disk(path)
        return dict(d) if isinstance(d, datasets.DatasetDict) else {"train": d}
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs if f.endswith(".parquet"))
    by_split: dict[str, list[str]] = {}
    for f in files:
        rel = os.path.relpath(f, path).lower()
        split = next((s for s in ("train",) + VAL_NAMES if rel.startswith(s) or f"/{s}" in "/" + rel or f"{s}-" in rel), "train")
        by_split.setdefault(split, []).append(f)
    return {s: datasets.Dataset.from_parquet(fs) for s, fs in by_split.items()}


def detect(path: str) -> str:
    """``"npz"``, ``"hf"`` (save_to_disk or parquet folder) or ``"folder"`` for what ``path`` holds."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            npy = f.read(6) == b"\x93NUMPY"  # the .npz reader says how to make a dataset of it
        if path.endswith(".npz") or npy:
            return "npz"
        raise DataError(f"{path}: a file, but not a .npz; --data takes an image folder, a datasets directory or a .npz")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such data directory: {path}")
    names = set(os.listdir(path))
    if names & {"dataset_dict.json", "state.json", "dataset_info.json"}:
        return "hf"
    for dp, _, fs in os.walk(path):
        if any(f.endswith(".parquet") for f in fs):
            return "hf"
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in fs):
            return "folder"
    raise DataError(f"{path}: no images, parquet files or datasets directory found")


@dataclasses.dataclass
class Splits:
    """The train and validation splits of a source, and what opening them found."""

    train: Split
    val: Split
    classes: tuple[str, ...]
    kind: str
    report: dict

    def identity(self) -> str:
        return _digest(self.kind, self.classes, self.train.identity, self.val.identity)


def open_splits(path: str, *, on_bad: str = "error", val_fraction: float = 0.1, seed: int = 0) -> Splits:
    """Opens an image folder or a Hugging Face datasets directory as train/val splits.

    An image folder is ``path/train/<class>/...`` with an optional
    ``path/val/<class>/...`` (or ``validation``, ``valid``, ``test``), or
    just ``path/<class>/...``; without a validation folder a stratified
    ``val_fraction`` is split off with ``seed``. Classes are sorted folder
    names (label i is the i-th), as torchvision's ``ImageFolder``. A
    ``datasets`` directory (``save_to_disk``) or parquet folder uses its
    ``train`` split and one of ``validation``/``val``/``test``.

    Raises:
        DataError: one line naming the folder or file (see the module docstring).
        ModuleNotFoundError: Pillow or ``datasets`` is not installed (one line naming the extra).
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    kind = detect(path)
    report: dict = {}
    val = None
    if kind == "hf":
        parts = _open_hf(path)
        if "train" not in parts:
            raise DataError(f"{path}: no 'train' split (has {', '.join(parts)})")
        train = _hf_split(parts["train"], f"{path} [train]", None)
        vname = next((s for s in VAL_NAMES if s in parts), None)
        if vname is not None:
            val = _hf_split(parts[vname], f"{path} [{vname}]", train.classes)
    else:
        pillow()
        train_dir = os.path.join(path, "train")
        if os.path.isdir(train_dir):
            train = _folder_split(train_dir, on_bad, report)
            vdir = next((os.path.join(path, v) for v in VAL_NAMES if os.path.isdir(os.path.join(path, v))), None)
            if vdir is not None:
                val = _folder_split(vdir, on_bad, report, classes=train.classes)
        else:
            train = _folder_split(path, on_bad, report)
    if val is None:
        train, val = seeded_split(train, val_fraction, seed)
        if len(val) == 0:
            raise DataError(f"{path}: too few images to split off a validation set; add a val/ folder")
    for mode, example in report.get("lossy", {}).items():
        _say(f"warning: {mode} images (e.g. {example}) are converted to RGB as torchvision's loader does: {LOSSY_MODES[mode]}")
    return Splits(train, val, train.classes, kind, report)
