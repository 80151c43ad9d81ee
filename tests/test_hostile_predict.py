"""``flax-resnet predict`` on hostile and odd inputs (issue #22): one line and exit status 2, or the documented result.

The weights are a random 10-class resnet18 saved by the test; images are
16..32 px with ``--resize 32 --crop 32`` so every forward pass is tiny.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from flax_resnet import predict
from flax_resnet import preprocess as pp
from hostile_util import RSS_LIMIT_KB, ROOT, assert_one_line, run_cli, run_measured, save_weights

SMALL = ("--resize", 32, "--crop", 32, "--top-k", 3)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return save_weights(tmp_path_factory.mktemp("w") / "r18.safetensors")


def _rgb(h=24, w=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _json(capsys, *argv):
    rc, out, err = run_cli(capsys, "predict", *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


# ----------------------------------------------------------------- pixels (the HIGH finding)


@pytest.mark.parametrize("value,needle", [(np.nan, "pixel (0, 0, 0) is nan: every pixel must be finite"),
                                          (np.inf, "pixel (0, 0, 0) is inf"),
                                          (1e30, "pixel (0, 0, 0) = 1e+30 is outside 0..1")])
def test_non_finite_or_out_of_range_npz_images_are_refused(w, tmp_path, capsys, value, needle):
    np.savez(tmp_path / "x.npz", images=np.full((3, 16, 16, 3), value, np.float32))
    rc, out, err = run_cli(capsys, "predict", tmp_path / "x.npz", "--weights", w, *SMALL)
    assert_one_line(rc, out, err, 2, f"{tmp_path / 'x.npz'}[0]: ", needle)


def test_a_bad_pixel_deep_in_a_stream_leaves_no_output(w, tmp_path, capsys):
    x = np.random.default_rng(0).uniform(0, 1, (40, 16, 16, 3)).astype(np.float32)
    x[37, 3, 4, 2] = -0.5
    np.savez(tmp_path / "x.npz", images=x)
    rc, out, err = run_cli(capsys, "predict", tmp_path / "x.npz", "--weights", w, *SMALL, "--batch-size", 4)
    assert_one_line(rc, out, err, 2, "x.npz[37]: pixel (3, 4, 2) = -0.5 is outside 0..1", "--value-range")


def test_value_range_scales_other_ranges(w, tmp_path, capsys):
    u8 = np.stack([_rgb(16, 16, i) for i in range(3)])
    np.savez(tmp_path / "u8.npz", images=u8)
    np.savez(tmp_path / "f255.npz", images=u8.astype(np.float64))
    ref = _json(capsys, tmp_path / "u8.npz", "--weights", w, *SMALL)["results"]
    got = _json(capsys, tmp_path / "f255.npz", "--weights", w, *SMALL, "--value-range", 0, 255)["results"]
    for a, b in zip(ref, got):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        np.testing.assert_allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], rtol=1e-5)
    rc, out, err = run_cli(capsys, "predict", tmp_path / "f255.npz", "--weights", w, *SMALL)
    assert_one_line(rc, out, err, 2, "is outside 0..1")
    rc, out, err = run_cli(capsys, "predict", tmp_path / "f255.npz", "--weights", w, *SMALL, "--value-range", 1, 0)
    assert_one_line(rc, out, err, 2, "--value-range must be two finite numbers LO < HI")


# ----------------------------------------------------------------- options


@pytest.mark.parametrize("extra,needle", [
    (("--std", 0), "std values must be positive"),
    (("--mean", "nan"), "mean values must be finite"),
    (("--resize", 32, "--crop", 64), "crop 64 does not fit an image resized to shorter side 32"),
    (("--resize", 100000, "--crop", 32), "resize must be an integer from 1 to 8192"),
    (("--crop", 100000, "--resize", 0), "crop must be an integer from 1 to 8192"),
])
def test_bad_preprocessing_options_are_one_line(w, tmp_path, capsys, extra, needle):
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    rc, out, err = run_cli(capsys, "predict", tmp_path / "a.png", "--weights", w, *SMALL, *extra)
    assert_one_line(rc, out, err, 2, needle)


def test_labels_file_not_utf8_and_hostile_text_is_escaped(w, tmp_path, capsys):
    name = tmp_path / "evil\x1b[2Jname.png"
    Image.fromarray(_rgb()).save(name)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 10)
    rc, out, err = run_cli(capsys, "predict", name, "--weights", w, *SMALL, "--labels", tmp_path / "latin1.txt")
    assert_one_line(rc, out, err, 2, "latin1.txt: --labels is not UTF-8 text")
    (tmp_path / "labels.txt").write_text("".join(f"class\x1b]0;owned\x07{i}\n" for i in range(10)))
    rc, out, err = run_cli(capsys, "predict", name, "--weights", w, *SMALL, "--labels", tmp_path / "labels.txt")
    assert rc == 0, err
    assert "\x1b" not in out and "\x07" not in out
    assert "evil\\x1b[2Jname.png" in out and "class\\x1b]0;owned\\x07" in out


# ----------------------------------------------------------------- files that are not images


def test_fifo_device_and_directory_are_refused_without_reading(w, tmp_path, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=run_cli(capsys, "predict", fifo, "--weights", w, *SMALL)))
    t.start()
    t.join(60)
    if t.is_alive():  # unblock the reader so the test run can go on, then fail
        with open(fifo, "wb"):
            pass
        t.join()
        pytest.fail("predict blocked on a FIFO")
    assert_one_line(*result["r"], 2, "pipe.png: not a regular file")
    rc, out, err = run_cli(capsys, "predict", "/dev/urandom", "--weights", w, *SMALL)
    assert_one_line(rc, out, err, 2, "/dev/urandom: not a regular file")
    rc, out, err = run_cli(capsys, "predict", tmp_path, "--weights", w, *SMALL)
    assert_one_line(rc, out, err, 2, f"{tmp_path}: a directory, not an image file")


def test_absurd_aspect_ratio_is_refused_in_bounded_memory(w, tmp_path):
    Image.fromarray(np.full((1, 16000, 3), 128, np.uint8)).save(tmp_path / "strip.png")
    rc, out, err, kb = run_measured(tmp_path, "predict", tmp_path / "strip.png", "--weights", w)
    assert_one_line(rc, out, err, 2, "strip.png: a 1x16000 image (aspect ratio 16000:1)", "256x4096000", "crop it first")
    print(f"predict on a 1 x 16000 PNG: peak RSS {kb / 1024:.0f} MiB")
    assert 0 < kb < RSS_LIMIT_KB, kb


def test_huge_images_refused_from_the_header(w, tmp_path, capsys):
    Image.new("L", (9000, 8000)).save(tmp_path / "big.png")  # 72 MP of zeros: a few KB on disk
    rc, out, err = run_cli(capsys, "predict", tmp_path / "big.png", "--weights", w, *SMALL)
    assert_one_line(rc, out, err, 2, "big.png: a 8000x9000 image; images of 1 to 67,108,864 pixels are read")


def test_npz_declaring_a_mass_of_images_is_capped_in_bounded_memory(w, tmp_path):
    """0.3 MB declaring 2000 x 224 x 224 x 3 zeros (300 MB): refused before inflating, by the one .npz reader."""
    import zipfile

    path = tmp_path / "mass.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("images.npy", "w", force_zip64=True) as m:
        np.lib.format.write_array_header_1_0(m, {"descr": "|u1", "fortran_order": False, "shape": (2000, 224, 224, 3)})
        for _ in range(2000):
            m.write(bytes(224 * 224 * 3))
    assert path.stat().st_size < 1e6
    rc, out, err, kb = run_measured(tmp_path, "predict", path, "--weights", w)
    assert_one_line(rc, out, err, 2, "mass.npz: images declares 301,056,128 bytes stored in", "refused before inflating")
    print(f"predict on a {path.stat().st_size:,}-byte .npz declaring 2000 x 224 x 224 x 3: peak RSS {kb / 1024:.0f} MiB")
    assert 0 < kb < RSS_LIMIT_KB, kb


def test_inputs_stream_batch_by_batch():
    """``iter_images`` and ``batches`` are lazy: the first batch comes out of an endless input."""

    def endless():
        i = 0
        while True:
            yield f"img{i}", _rgb(16, 16, i % 7)
            i += 1

    prep = pp.Preprocess(32, 32)
    stream = predict.batches(endless(), prep, 5)
    names, batch = next(stream)
    assert names == [f"img{i}" for i in range(5)] and batch.shape == (5, 32, 32, 3)
    names, _ = next(stream)
    assert names[0] == "img5"
    # large images get fewer per batch: images x height x width stays under MAX_BATCH_PIXELS
    big = pp.Preprocess(None, 1024)
    names, batch = next(predict.batches(((f"b{i}", np.zeros((1024, 1024, 3), np.uint8)) for i in range(9)), big, 8))
    assert len(names) == predict.MAX_BATCH_PIXELS // (1024 * 1024) == 4


def test_npz_images_are_read_in_chunks(tmp_path):
    x = np.random.default_rng(0).uniform(0, 1, (50, 8, 8, 3)).astype(np.float32)
    x[45, 0, 0, 0] = np.nan
    np.savez_compressed(tmp_path / "x.npz", images=x)
    got = []
    with pytest.raises(ValueError, match=r"x.npz\[45\]: pixel \(0, 0, 0\) is nan"):
        for name, a in predict.iter_images(predict.check_inputs([tmp_path / "x.npz"]), 3):
            got.append(a)
    assert len(got) == 45
    np.testing.assert_array_equal(np.stack(got), x[:45])


# ----------------------------------------------------------------- image kinds with a documented treatment


def test_rgba_grey_and_16_bit_images(w, tmp_path, capsys):
    rgb = _rgb(24, 24, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.random.default_rng(1).integers(0, 256, (24, 24, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    grey = rgb[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(tmp_path / "grey3.png")
    wide = (rgb[..., 1].astype(np.uint16) * 3)  # values up to 765: 16-bit
    Image.fromarray(wide).save(tmp_path / "wide16.png")
    Image.fromarray(np.repeat(np.minimum(wide, 255).astype(np.uint8)[..., None], 3, -1)).save(tmp_path / "clipped.png")
    rc, out, err = run_cli(capsys, "predict", *(tmp_path / f for f in ("rgb.png", "rgba.png", "grey.png", "grey3.png", "wide16.png", "clipped.png", "wide16.png")),
                           "--weights", w, *SMALL, "--json")
    assert rc == 0, err
    r = {os.path.basename(x["image"]) + str(i): x["top"] for i, x in enumerate(json.loads(out)["results"])}
    assert r["rgb.png0"] == r["rgba.png1"]  # alpha dropped, as torchvision's loader
    assert r["grey.png2"] == r["grey3.png3"]  # grey repeated to RGB
    assert r["wide16.png4"] == r["clipped.png5"] == r["wide16.png6"]  # clipped to 8 bits...
    assert err.count("\n") == 1 and "warning: 2 image(s) with more than 8 bits per pixel (first: " in err  # ...with one warning


# ----------------------------------------------------------------- many files


def _many(tmp_path, capsys, w, n, measure, side=32):
    d = tmp_path / "many"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    files = sorted(d.iterdir())
    small = ("--resize", side, "--crop", side, "--top-k", 3)
    argv = ["predict", *files, "--weights", w, *small, "--batch-size", 16, "--json"]
    if measure:
        rc, out, err, kb = run_measured(tmp_path, *argv)
    else:
        rc, out, err = run_cli(capsys, *argv)
        kb = 1
    assert rc == 0, err[-2000:]
    results = json.loads(out)["results"]
    assert [r["image"] for r in results] == list(map(str, files))
    # the same numbers as a run on a few of them alone (other batches, other padding)
    few = [0, 1, n - 1]
    alone = _json(capsys, *(files[i] for i in few), "--weights", w, *small)["results"]
    for i, a in zip(few, alone):
        assert [t["class"] for t in results[i]["top"]] == [t["class"] for t in a["top"]]
        np.testing.assert_allclose([t["prob"] for t in results[i]["top"]], [t["prob"] for t in a["top"]], rtol=1e-4)
    return results, kb


def test_predict_on_100_tiny_files(w, tmp_path, capsys):
    _many(tmp_path, capsys, w, 100, measure=False)


@pytest.mark.slow
def test_predict_on_10000_tiny_files_in_bounded_memory(w, tmp_path, capsys):
    results, kb = _many(tmp_path, capsys, w, 10_000, measure=True, side=16)
    print(f"predict on 10,000 files: peak RSS {kb / 1024:.0f} MiB")
    assert len(results) == 10_000 and 0 < kb < RSS_LIMIT_KB, kb


# ----------------------------------------------------------------- a closed stdout


def test_a_closed_stdout_is_no_error(w, tmp_path):
    """``flax-resnet inspect X | head -2``: the reader goes away; no 'Broken pipe' error, status 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "flax_resnet", "inspect", str(w)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    p.stdout.close()  # before anything is written: every write meets EPIPE
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert err == "", err
