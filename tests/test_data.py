"""Datasets: digits, user .npz files, and every kind of data that would train into garbage refused in one line.

The bad-input cases run the ``train`` command itself (in process: the refusal
comes before any compilation) and check exit status 2, a single stderr line
naming the file, the array and the first offending index, and that nothing
was written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from flax_resnet import data
from flax_resnet.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images_labels(n=40, size=8, channels=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    return images, labels


# ------------------------------------------------------------------- loading


def test_digits_dataset():
    ds = data.load_digits()
    assert ds.image_shape == (32, 32, 1) and ds.num_classes == 10
    assert len(ds.train_labels) == 1437 and len(ds.test_labels) == 360
    assert np.bincount(ds.test_labels).min() >= 35  # stratified
    assert abs(float(ds.train_images.mean())) < 1e-4 and abs(float(ds.train_images.std()) - 1) < 1e-3
    b1 = [y for _, y in data.batches(ds.train_images, ds.train_labels, 100, seed=1, epoch=3)]
    b2 = [y for _, y in data.batches(ds.train_images, ds.train_labels, 100, seed=1, epoch=3)]
    b3 = [y for _, y in data.batches(ds.train_images, ds.train_labels, 100, seed=1, epoch=4)]
    assert len(b1) == 14 and all(np.array_equal(a, b) for a, b in zip(b1, b2))
    assert not np.array_equal(b1[0], b3[0])
    x = np.arange(2 * 5 * 5, dtype=np.float32).reshape(2, 5, 5, 1)
    shifted = data.random_shift(x, np.random.default_rng(0), 1)
    assert shifted.shape == x.shape and not np.array_equal(shifted, x)


def test_load_npz_scales_splits_and_normalizes(tmp_path):
    images, labels = _images_labels(n=48, size=12, channels=1, classes=3)
    np.savez(tmp_path / "d.npz", images=images[..., 0], labels=labels)
    ds = data.load_npz(tmp_path / "d.npz", size=16)
    assert ds.image_shape == (16, 16, 1) and ds.num_classes == 3
    assert len(ds.train_labels) + len(ds.test_labels) == 48 and ds.train_labels.dtype == np.int32
    # "dataset": the training set's own per-channel mean/std of the /255 images.
    raw = data.load_npz(tmp_path / "d.npz", size=16, normalize="none")
    np.testing.assert_allclose(raw.mean, 0) and np.testing.assert_allclose(raw.std, 1)
    assert 0 <= raw.train_images.min() and raw.train_images.max() <= 1
    np.testing.assert_allclose(ds.mean, raw.train_images.mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(ds.train_images, (raw.train_images - ds.mean) / ds.std, rtol=1e-5, atol=1e-5)


def test_imagenet_normalization_and_grey_to_rgb(tmp_path):
    images, labels = _images_labels(channels=3)
    np.savez(tmp_path / "rgb.npz", images=images, labels=labels, test_images=images[:8], test_labels=labels[:8])
    ds = data.load_npz(tmp_path / "rgb.npz", normalize="imagenet")
    np.testing.assert_allclose(ds.mean, data.IMAGENET_MEAN, rtol=1e-6) and np.testing.assert_allclose(ds.std, data.IMAGENET_STD, rtol=1e-6)
    # the fixed test split is the file's, normalized as torchvision's Normalize does
    expect = (images[:8] / 255.0 - np.asarray(data.IMAGENET_MEAN)) / np.asarray(data.IMAGENET_STD)
    np.testing.assert_allclose(ds.test_images, expect, rtol=1e-5, atol=1e-5)
    grey = images[..., :1]
    np.savez(tmp_path / "grey.npz", images=grey, labels=labels)
    rgb = data.load_npz(tmp_path / "grey.npz", channels=3, normalize="none")
    assert rgb.image_shape == (8, 8, 3) and np.array_equal(rgb.train_images[..., 0], rgb.train_images[..., 2])


def test_channels_first_is_transposed_when_asked(tmp_path):
    images, labels = _images_labels(channels=3)
    np.savez(tmp_path / "nhwc.npz", images=images, labels=labels)
    np.savez(tmp_path / "nchw.npz", images=images.transpose(0, 3, 1, 2), labels=labels)
    a = data.load_npz(tmp_path / "nhwc.npz")
    b = data.load_npz(tmp_path / "nchw.npz", channels_first=True)
    assert b.image_shape == (8, 8, 3)
    np.testing.assert_array_equal(a.train_images, b.train_images)


def test_num_classes_given_or_inferred_from_dense_labels(tmp_path):
    images, labels = _images_labels(classes=4)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    assert data.load_npz(tmp_path / "d.npz").num_classes == 4
    assert data.load_npz(tmp_path / "d.npz", num_classes=7).num_classes == 7  # classes with no example yet
    labels = labels.copy()
    labels[labels == 2] = 3  # ids 0, 1, 3: not dense
    np.savez(tmp_path / "gap.npz", images=images, labels=labels)
    with pytest.raises(data.DatasetError, match=r"labels\[2\] = 3 but the labels hold only 3 distinct class ids, not every id 0..3: pass --num-classes"):
        data.load_npz(tmp_path / "gap.npz")
    assert data.load_npz(tmp_path / "gap.npz", num_classes=4).num_classes == 4


# ------------------------------------------------------- refused, one line each


def _bomb(path, n=12_000):
    """A 64x64x3 uint8 'images' array of zeros: ~140 MiB deflated into ~0.6 MiB, written in chunks."""
    shape = (n, 64, 64, 3)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("images.npy", "w", force_zip64=True) as m:
            np.lib.format.write_array_header_1_0(m, {"descr": "|u1", "fortran_order": False, "shape": shape})
            chunk, left = bytes(2**24), int(np.prod(shape))
            while left:
                m.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
        with z.open("labels.npy", "w") as m:
            np.lib.format.write_array(m, np.zeros(n, np.int64))


def _forged(path):
    """images.npy whose header declares 10^6 images but holds the bytes of 40."""
    images, labels = _images_labels()
    with zipfile.ZipFile(path, "w") as z:
        with z.open("images.npy", "w") as m:
            np.lib.format.write_array_header_1_0(m, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 8, 8, 3)})
            m.write(images.tobytes())
        with z.open("labels.npy", "w") as m:
            np.lib.format.write_array(m, labels)


def _case(name):
    images, labels = _images_labels()
    f = images.astype(np.float64) / 255
    if name == "nan":
        f[3, 2, 1, 0] = np.nan
        return dict(images=f, labels=labels), [], "images[3, 2, 1, 0] is nan"
    if name == "inf":
        f[0, 7, 0, 2] = -np.inf
        return dict(images=f.astype(np.float32), labels=labels), [], "images[0, 7, 0, 2] is -inf"
    if name == "beyond_float32":
        f[5, 0, 0, 1] = 1e39
        return dict(images=f, labels=labels), [], "images[5, 0, 0, 1] = 1e+39 does not fit float32"
    if name == "test_nan":
        t = f[:8].copy()
        t[6, 1, 1, 1] = np.nan
        return dict(images=f, labels=labels, test_images=t, test_labels=labels[:8]), [], "test_images[6, 1, 1, 1] is nan"
    if name == "label_wraps_int32":
        y = labels.astype(np.int64)
        y[7] = 2**32 + 1  # astype(int32) would make it 1
        return dict(images=images, labels=y), [], "labels[7] = 4294967297"
    if name == "label_2_31":
        y = labels.copy()
        y[9] = 2**31 - 1
        return dict(images=images, labels=y), [], "labels[9] = 2147483647"
    if name == "stray_label":
        y = labels.copy()
        y[11] = 100_000
        return dict(images=images, labels=y), [], "labels[11] = 100000 but the labels hold only 5 distinct class ids"
    if name == "stray_label_num_classes":
        y = labels.copy()
        y[11] = 100_000
        return dict(images=images, labels=y), ["--num-classes", "4"], "labels[11] = 100000 is not a class id below num_classes 4"
    if name == "test_label_out_of_range":
        return dict(images=images, labels=labels, test_images=images[:8], test_labels=np.full(8, 4)), ["--num-classes", "4"], "test_labels[0] = 4"
    if name == "negative_label":
        y = labels.copy()
        y[13] = -1
        return dict(images=images, labels=y), [], "labels[13] = -1"
    if name == "float_labels":
        return dict(images=images, labels=labels.astype(np.float32)), [], "labels must be a 1-D integer array, got float32"
    if name == "label_count":
        return dict(images=images, labels=labels[:-1]), [], "labels has 39 entries for 40 images"
    if name == "nchw":
        return dict(images=images.transpose(0, 3, 1, 2), labels=labels), [], "images of shape (40, 3, 8, 8) looks channels-first"
    if name == "nhwc_with_channels_first":
        return dict(images=images[:, :5], labels=labels), ["--channels-first"], "images of shape (40, 5, 8, 3) looks channels-last"
    if name == "zero_size":
        return dict(images=np.zeros((40, 0, 0), np.uint8), labels=labels), [], "images has an empty image axis (shape (40, 0, 0))"
    if name == "no_images":
        return dict(images=np.zeros((0, 8, 8), np.uint8), labels=labels[:0]), [], "images holds no images"
    if name == "complex":
        return dict(images=images.astype(np.complex64), labels=labels), [], "images must hold integers or floats, got dtype complex64"
    if name == "num_classes_too_large":
        return dict(images=images, labels=labels), ["--num-classes", "2000000"], "num_classes must be between 1 and 1,000,000, got 2000000"
    if name == "missing_labels":
        return dict(images=images, y=labels), [], "lacks array(s) labels"
    raise AssertionError(name)


BAD = ["nan", "inf", "beyond_float32", "test_nan", "label_wraps_int32", "label_2_31", "stray_label", "stray_label_num_classes",
       "test_label_out_of_range", "negative_label", "float_labels", "label_count", "nchw", "nhwc_with_channels_first", "zero_size",
       "no_images", "complex", "num_classes_too_large", "missing_labels", "npy", "bomb", "forged_header", "not_a_zip"]


def _write_bad(name, tmp_path):
    path = tmp_path / "bad.npz"
    if name == "npy":
        path = tmp_path / "bad.npy"
        np.save(path, _images_labels()[0])
        return path, [], "is a single .npy array; a dataset is a .npz with images and labels"
    if name == "bomb":
        _bomb(path)
        return path, [], "images declares 147,456,128 bytes stored in"
    if name == "forged_header":
        _forged(path)
        return path, [], "images declares shape (1000000, 8, 8, 3) (192,000,000 bytes of uint8) but holds 7,680"
    if name == "not_a_zip":
        path.write_bytes(b"PK\x03\x04 not really a zip")
        return path, [], "is not a readable .npz file (BadZipFile"
    arrays, extra, needle = _case(name)
    np.savez(path, **arrays)
    return path, extra, needle


@pytest.mark.parametrize("name", BAD)
def test_train_refuses_bad_data_in_one_line(name, tmp_path, monkeypatch, capsys):
    path, extra, needle = _write_bad(name, tmp_path)
    monkeypatch.chdir(tmp_path)  # the default --workdir is runs/ARCH-DATASET under the current directory
    before = sorted(os.listdir(tmp_path))
    rc = cli_main(["train", "--arch", "resnet18", "--dataset", str(path), "--epochs", "1", "--batch-size", "4"] + extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith(f"flax-resnet train: error: {path}"), err
    assert needle in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_library_refusals_are_dataset_errors(tmp_path):
    """The same checks through the Python API: ``DatasetError`` (a ``ValueError``) with the same line."""
    for name in ("nan", "stray_label", "nchw"):
        arrays, _, needle = _case(name)
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(data.DatasetError) as e:
            data.load_npz(tmp_path / f"{name}.npz")
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_refusal_exit_status_in_a_real_process(tmp_path):
    """The installed command's exit status and stderr for a NaN pixel, as a shell sees them."""
    path, _, needle = _write_bad("nan", tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "flax_resnet", "train", "--dataset", str(path), "--workdir", str(tmp_path / "w")],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()
