"""flax-resnet predict and the evaluation preprocessing it applies."""

import json
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import flax_resnet
import torch_ref
from flax_resnet import cli, hub
from flax_resnet import preprocess as pp


def _smooth_image(h, w, seed=0):
    """A photo-like uint8 RGB image: low-frequency gradients, no clipping anywhere."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [0.5 + 0.2 * np.sin(2 * np.pi * (a * x + b * y) + c) + 0.15 * x - 0.1 * y for a, b, c in rng.uniform(0.5, 3, (3, 3))]
    return np.clip(np.round(np.stack(chans, -1) * 255), 0, 255).astype(np.uint8)


def _torch_resize(a, size, mode):
    t = torch.from_numpy(np.asarray(a, np.float64)).permute(2, 0, 1)[None]
    return F.interpolate(t, size=size, mode=mode, antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resize_matches_torch_antialiased_interpolate(mode):
    # torch's antialiased interpolate is written to reproduce PIL's resampling filters (torchvision
    # documents its tensor Resize(antialias=True) as matching the PIL path), in float64 here.
    noise = np.random.default_rng(1).uniform(0, 1, (300, 411, 3)).astype(np.float32)  # float images: per-channel mode F
    size = pp.resized_size(300, 411, 232)
    assert size == (232, 317)  # int(232 * 411 / 300) = 317
    np.testing.assert_allclose(pp._resize(noise, size, mode), _torch_resize(noise, size, mode), atol=1e-5)
    # uint8 images go through PIL's 8-bit path (what torchvision does to PIL images): a horizontal and a
    # vertical pass, each rounded to uint8, so within 1.5 levels (the first rounding passes through bicubic's lobes)
    img = _smooth_image(375, 500)
    size = pp.resized_size(375, 500, 256)
    assert size == (256, 341)
    ref = np.clip(_torch_resize(img, size, mode), 0, 255)
    assert np.abs(pp._resize(img, size, mode).astype(np.float64) - ref).max() <= 1.5


def test_center_crop_geometry():
    # torchvision's CenterCrop: round((h - crop) / 2), Python's round (half to even); transformers floors.
    assert pp.crop_box(256, 341, 224) == (16, 58)  # 58.5 -> 58
    assert pp.crop_box(259, 343, 224) == (18, 60)  # 17.5 -> 18, 59.5 -> 60
    assert pp.crop_box(259, 343, 224, "floor") == (17, 59)
    assert pp.crop_box(224, 224, 224) == (0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        pp.crop_box(200, 300, 224)
    img = np.arange(259 * 343 * 3, dtype=np.float32).reshape(259, 343, 3)
    out = pp.apply(img, pp.Preprocess(resize=None, crop=224, mean=(0, 0, 0), std=(1, 1, 1)))
    np.testing.assert_array_equal(out, img[18:242, 60:284])


def test_normalization_is_torchvision_order():
    img = _smooth_image(224, 224)
    out = pp.apply(img, pp.Preprocess(resize=None, crop=None))
    ref = (torch.from_numpy(img).float() / 255 - torch.tensor(pp.IMAGENET_MEAN)) / torch.tensor(pp.IMAGENET_STD)
    np.testing.assert_array_equal(out, ref.numpy())  # ToTensor then Normalize, float32


def test_presets_of_each_source():
    tv1, tv2 = pp.torchvision_preset(256, "v1"), pp.torchvision_preset(232, "v2")
    assert (tv1.resize, tv1.crop, tv1.interpolation) == (256, 224, "bilinear") and tv2.resize == 232
    timm = pp.timm_preset({"input_size": [3, 224, 224], "crop_pct": 0.95, "interpolation": "bicubic"}, "timm")
    assert (timm.resize, timm.crop, timm.interpolation) == (235, 224, "bicubic")
    tr = pp.transformers_preset({"crop_pct": 0.875, "resample": 2, "size": {"shortest_edge": 224}}, "hf")
    assert (tr.resize, tr.crop, tr.interpolation, tr.crop_rounding) == (256, 224, "bilinear", "floor")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    path = d / "resnet18-f37072fd.pth"  # torchvision's file name: the V1 preprocessing (256 -> 224)
    torch.save(torch_ref.resnet18(layout="torchvision").state_dict(), path)
    imgs = [_smooth_image(300, 260, 1), _smooth_image(199, 311, 2)]
    files = []
    for i, a in enumerate(imgs):
        files.append(d / f"img{i}.png")
        Image.fromarray(a).save(files[-1])
    np.savez(d / "batch.npz", images=np.stack([_smooth_image(240, 250, 3), _smooth_image(240, 250, 4)]))
    return d, path, files


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_predict_equals_model_apply_on_the_preprocessed_images(weights, capsys):
    d, path, files = weights
    rc, out, err = _run(capsys, "predict", *files, d / "batch.npz", "--weights", path, "--top-k", 3, "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["arch"] == "resnet18" and got["preprocess"].startswith("resize 256 bilinear, crop 224, ImageNet mean/std")
    prep = pp.torchvision_preset(256, "ResNet18_Weights.IMAGENET1K_V1")
    with np.load(d / "batch.npz") as z:
        images = [np.asarray(Image.open(f).convert("RGB")) for f in files] + list(z["images"])
    x = np.stack([pp.apply(im, prep) for im in images])
    assert x.shape == (4, 224, 224, 3)
    model, variables = flax_resnet.load(path)
    probs = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, x), axis=-1))
    assert [r["image"] for r in got["results"]] == [str(f) for f in files] + [f"{d / 'batch.npz'}[{i}]" for i in range(2)]
    labels = hub.imagenet_labels()
    for r, p in zip(got["results"], probs):
        top = np.argsort(-p)[:3]
        assert [t["class"] for t in r["top"]] == top.tolist()
        np.testing.assert_allclose([t["prob"] for t in r["top"]], p[top], rtol=1e-5)
        assert [t["label"] for t in r["top"]] == ([labels[c] for c in top] if labels else [None] * 3)


def test_overrides_float_npz_and_the_text_report(weights, capsys, tmp_path):
    d, path, files = weights
    imgs = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=imgs)
    rc, out, err = _run(capsys, "predict", tmp_path / "f.npz", "--weights", path, "--resize", 0, "--crop", 0, "--mean", 0.5, "--std", 0.25, "--top-k", 2, "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert "no resize, no crop, mean [0.5, 0.5, 0.5] std [0.25, 0.25, 0.25]" in got["preprocess"]
    model, variables = flax_resnet.load(path)
    expected = np.argsort(-np.asarray(jax.jit(model.apply)(variables, (imgs - 0.5) / 0.25)), -1)[:, :2]
    assert [[t["class"] for t in r["top"]] for r in got["results"]] == expected.tolist()
    # the text report: weights and preprocessing, then per image its name and k lines
    rc, out, err = _run(capsys, "predict", tmp_path / "f.npz", "--weights", path, "--resize", 0, "--crop", 0, "--mean", 0.5, "--std", 0.25, "--top-k", 2)
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith(f"weights     {path} (resnet18, 1000 classes") and lines[1].startswith("preprocess  no resize")
    assert lines[2] == "labels      1000 from torchvision (ImageNet-1k)"
    assert lines[3] == f"{tmp_path / 'f.npz'}[0]" and len(lines) == 9
    for i, (line, t) in enumerate(zip(lines[4:6], got["results"][0]["top"]), 1):
        assert line == f"  {i}. {t['prob']:.4f}  class {t['class']:>5}" + (f"  {t['label']}" if t["label"] else "")


def test_predict_bad_input_is_one_line(weights, capsys, tmp_path, monkeypatch):
    d, path, files = weights
    (tmp_path / "notes.txt").write_text("not an image")
    np.savez(tmp_path / "nchw.npz", images=np.zeros((2, 3, 32, 32), np.uint8))
    cases = [
        ((tmp_path / "missing.png", "--weights", path), "missing.png"),
        ((tmp_path / "notes.txt", "--weights", path), "notes.txt: not a readable image"),
        ((tmp_path / "nchw.npz", "--weights", path), "expected NHWC (N, H, W, 3)"),
        ((files[0], "--weights", path, "--top-k", 0), "--top-k must be at least 1"),
        ((files[0], "--weights", path, "--mean", 0.5, 0.5, "--std", 1, 1), "normalization has 2 values"),
        ((files[0], "--weights", "resnet5O"), "unknown pretrained name 'resnet5O'"),
        ((files[0], "--weights", path, "--crop", 300), "does not fit"),
    ]
    for argv, needle in cases:
        rc, out, err = _run(capsys, "predict", *argv)
        assert rc == 2 and out == "" and err.count("\n") == 1 and needle in err, (argv, err)
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow not installed
    rc, out, err = _run(capsys, "predict", files[0], "--weights", path)
    assert rc == 2 and err.count("\n") == 1 and "pip install 'flax-resnet[predict]'" in err, err
