"""convert and train on hostile input and hostile disks (issue #22): bombs, races, full and read-only disks, odd datasets.

Full and read-only disks are real: a small tmpfs (or a read-only one) is
mounted for the test, which needs root and ``mount -t tmpfs``; elsewhere
these tests skip (``test_hostile.test_disk_full_while_writing`` covers a
refused write with RLIMIT_FSIZE without privileges).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager

import numpy as np
import pytest

import flax_resnet
from flax_resnet import data
from flax_resnet import io as ckio
from hostile_util import RSS_LIMIT_KB, ROOT, assert_one_line, random_state_dict, run_cli, run_measured


@contextmanager
def tmpfs(path, options):
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# ----------------------------------------------------------------- convert


def _bomb(tmp_path, n, commands):
    """``n`` zero bytes deflated into a member whose key names no architecture: refused from the zip directory, in bounded memory."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, z.open("junk.npy", "w", force_zip64=True) as m:
        np.lib.format.write_array_header_1_0(m, {"descr": "|u1", "fortran_order": False, "shape": (n,)})
        chunk = bytes(2**24)
        for _ in range(n // len(chunk)):
            m.write(chunk)
    assert path.stat().st_size < n / 200
    for command in commands:
        t0 = time.perf_counter()
        rc, out, err, kb = run_measured(tmp_path, command, path, *([tmp_path / "out.msgpack"] if command == "convert" else []))
        seconds = time.perf_counter() - t0
        assert_one_line(rc, out, err, 2, str(path), f"junk declares {n + 128:,} bytes stored in", "a likely deflate bomb, refused before inflating", command=command)
        assert 0 < kb < RSS_LIMIT_KB, kb
        print(f"{command} {path.stat().st_size:,}-byte bomb.npz of {n:,} bytes: peak RSS {kb / 1024:.0f} MiB, {seconds:.1f} s (with the interpreter's start)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.npz"]


def test_convert_bomb_npz_is_bounded_by_its_headers(tmp_path):
    _bomb(tmp_path, 2**28, ["convert"])


@pytest.mark.slow
def test_convert_and_inspect_a_2gib_bomb_npz(tmp_path):
    """The audit's bomb: 2 MB deflating to 2 GiB."""
    _bomb(tmp_path, 2**31, ["convert", "inspect"])


def _race(tmp_path, suffix, rounds):
    """Two processes write the same DST at once: each either wins whole or fails in one line; never a mixed file."""
    srcs = []
    for seed in (1, 2):
        srcs.append(tmp_path / f"src{seed}.safetensors")
        ckio.save(srcs[-1], random_state_dict(seed=seed))
    dst = tmp_path / f"dst{suffix}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    whole = [ckio.formats.flat(ckio.resolve(ckio.read(s)).variables) for s in srcs]
    for force in rounds:
        if not force:
            ckio.atomic.remove(dst)  # two creators racing for a new DST
        procs = [subprocess.Popen([sys.executable, "-m", "flax_resnet", "convert", str(s), str(dst), *force], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for s in srcs]
        results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
        assert any(rc == 0 for rc, _, _ in results), results
        for rc, out, err in results:
            if rc:
                assert_one_line(rc, out, err, 2, str(dst), "already exists", command="convert")
        got = ckio.formats.flat(flax_resnet.load(dst)[1])
        assert any(all(np.array_equal(np.asarray(got[k]), a) for k, a in w.items()) for w in whole)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src1.safetensors", "src2.safetensors", dst.name])


def test_two_converts_to_one_destination(tmp_path):
    _race(tmp_path, ".npz", [["--force"]])


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".npz", ".msgpack", ".safetensors", ""])
def test_two_converts_to_one_destination_every_format(tmp_path, suffix):
    _race(tmp_path, suffix, [["--force"], []])


def _full_disk(tmp_path, capsys, arch, size):
    src = tmp_path / "src.safetensors"
    ckio.save(src, random_state_dict(arch=arch, num_classes=1000))
    with tmpfs(tmp_path / "disk", f"size={size}") as disk:
        for suffix in (".safetensors", ".npz", ".msgpack", ".pth", ""):
            dst = disk / f"out{suffix}"
            rc, out, err = run_cli(capsys, "convert", src, dst)
            assert_one_line(rc, out, err, 2, str(dst), "No space left on device", command="convert")
            assert list(disk.iterdir()) == [], (suffix, list(disk.iterdir()))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore threads after Orbax's failure
def test_full_disk_for_every_output_format(tmp_path, capsys):
    pytest.importorskip("torch")
    _full_disk(tmp_path, capsys, "resnet18", "8m")  # resnet18 is 47 MB


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_for_every_output_format_at_resnet50_size(tmp_path, capsys):
    pytest.importorskip("torch")
    _full_disk(tmp_path, capsys, "resnet50", "60m")  # resnet50 is 102 MB: the disk fills half-way


# ----------------------------------------------------------------- train


def _npz(path, images=None, labels=None, **more):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8) if images is None else images
    labels = np.arange(len(images)) % 4 if labels is None else labels
    np.savez(path, images=images, labels=labels, **more)
    return path


def _forged(path, shape):
    with zipfile.ZipFile(path, "w") as z:
        with z.open("images.npy", "w") as m:
            np.lib.format.write_array_header_1_0(m, {"descr": "|u1", "fortran_order": False, "shape": shape})
            m.write(bytes(40 * 8 * 8 * 3))
        with z.open("labels.npy", "w") as m:
            np.lib.format.write_array(m, np.arange(40) % 4)
    return path


def _train_cases(tmp_path):
    rng = np.random.default_rng(0)
    yield "constant", _npz(tmp_path / "c.npz", images=np.full((40, 8, 8, 3), 7, np.uint8)), (), "every pixel of every image is 0.027451: constant images hold nothing to learn"
    yield "declared_1e9", _forged(tmp_path / "f.npz", (10**9, 224, 224, 3)), (), "images declares shape (1000000000, 224, 224, 3) (150,528,000,000,000 bytes of uint8) but holds 7,680"
    yield "num_classes_0", _npz(tmp_path / "n0.npz"), ("--num-classes", 0), "--num-classes must be >= 1"
    yield "num_classes_2", _npz(tmp_path / "n2.npz"), ("--num-classes", 2), "labels[2] = 2 is not a class id below num_classes 2"
    yield "uint64", _npz(tmp_path / "u.npz", labels=np.array([0, 1, 2**63 + 3, 3] * 10, np.uint64)), (), "labels[2] = 9223372036854775811 is not a class id (at most 1,000,000 classes)"
    yield "few_test_images", _npz(tmp_path / "few.npz", images=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), labels=np.arange(30) % 10), (), "a 0.2 test split of 30 images holds 6 test and 24 training images; a stratified split needs at least one per class (10)"


@pytest.mark.parametrize("case", ["constant", "declared_1e9", "num_classes_0", "num_classes_2", "uint64", "few_test_images"])
def test_train_refuses_in_one_line(tmp_path, capsys, case):
    name, path, extra, needle = next(c for c in _train_cases(tmp_path) if c[0] == case)
    rc, out, err = run_cli(capsys, "train", "--arch", "resnet18", "--dataset", path, "--epochs", 1, "--batch-size", 4, "--workdir", tmp_path / "run", *extra)
    assert_one_line(rc, out, err, 2, needle, command="train")
    assert needle.startswith("--") or f"error: {path}: " in err
    assert not (tmp_path / "run").exists()


def test_a_test_label_never_seen_in_training_is_warned(tmp_path, capsys):
    from flax_resnet import train_cli

    images = np.random.default_rng(0).integers(0, 256, (48, 8, 8, 3), dtype=np.uint8)
    path = _npz(tmp_path / "t.npz", images=images[:40], test_images=images[40:], test_labels=np.array([0, 1, 2, 3, 4, 0, 1, 2]))
    with pytest.warns(data.DatasetWarning, match=r"t.npz: test label 4 \(test_labels\[4\]\) and 0 more class id\(s\) never occur in training"):
        ds = data.load_npz(path)
    assert ds.num_classes == 5
    args = argparse.Namespace(dataset=str(path), data=None, size=None, seed=0, num_classes=None, channels_first=False, normalize="dataset",
                              batch_size=4, max_shift=0)
    train_cli._load_data(args, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {path}: test label 4"), err


def test_train_into_a_read_only_workdir_is_one_line(tmp_path, capsys):
    path = _npz(tmp_path / "ok.npz")
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        rc, out, err = run_cli(capsys, "train", "--arch", "resnet18", "--dataset", path, "--epochs", 1, "--batch-size", 4, "--workdir", ro)
        assert_one_line(rc, out, err, 2, f"--workdir {ro} is not writable", command="train", out_empty=False)
        assert list(ro.iterdir()) == []
