"""Pretrained names offline and by name (#23 item 4): each friction the issue names, reproduced on caches built here."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import flax_resnet
from flax_resnet import hub
from flax_resnet.cli import main as cli_main
from test_hub import _hf_repo, _state_dict, _write_safetensors, caches  # noqa: F401 - caches is a fixture

ROOT = Path(__file__).resolve().parents[1]
TIMM_CFG = {  # timm's push_to_hub config of an ImageNet-1k model: no label_names (as timm/resnet50.a1_in1k's)
    "architecture": "resnet18",
    "num_classes": 1000,
    "pretrained_cfg": {"tag": "a1_in1k", "input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.95,
                       "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 1000},
}


def _run(capsys, *argv):
    try:
        rc = cli_main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _images(path, n=1, size=32):
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (n, size, size, 3), np.uint8))
    return path


def _real_named_file(directory: Path) -> str:
    """A resnet18 state_dict saved under a name whose hash prefix is its own SHA-256, as torchvision's files are."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "tmp.pth"
    torch.save(_state_dict(), tmp)
    name = f"resnet18-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(directory / name)
    return name


# ------------------------------------------------------------------ torchvision: the hash in the file name


def test_a_random_file_under_torchvisions_name_is_refused(caches, capsys, tmp_path):
    d = hub.torch_hub_dir()
    d.mkdir(parents=True)
    torch.save(_state_dict(), d / "resnet18-f37072fd.pth")  # the issue: accepted as IMAGENET1K_V1, no hash check
    with pytest.raises(ValueError) as e:
        hub.resolve("ResNet18_Weights.IMAGENET1K_V1", download=False)
    msg = str(e.value)
    assert "\n" not in msg and "resnet18-f37072fd.pth: SHA-256 " in msg and "does not start with f37072fd" in msg
    assert "not torchvision's ResNet18_Weights.IMAGENET1K_V1" in msg and "check_hash=False" in msg
    with pytest.raises(ValueError, match="does not start with f37072fd"):
        flax_resnet.from_pretrained("resnet18", download=False)
    assert hub.resolve("resnet18", download=False, check_hash=False).path == d / "resnet18-f37072fd.pth"  # the opt-out
    # The command line says it in its own terms, and --no-check-hash is the opt-out there.
    batch = _images(tmp_path / "x.npz")
    rc, out, err = _run(capsys, "predict", batch, "--weights", "resnet18", "--no-download", "--resize", 0, "--crop", 0)
    assert rc == 2 and err.count("\n") == 1 and "--no-check-hash to use it" in err and "check_hash=False" not in err, err
    rc, out, err = _run(capsys, "predict", batch, "--weights", "resnet18", "--no-download", "--no-check-hash", "--resize", 0, "--crop", 0, "--json")
    assert rc == 0, err
    assert json.loads(out)["results"][0]["top"][0]["label"] in hub.imagenet_labels()


def test_offline_torchvision_file_in_the_torch_hub_cache_loads(caches, monkeypatch):
    # The documented offline path: torchvision's file, as downloaded, in $TORCH_HOME/hub/checkpoints.
    name = _real_named_file(hub.torch_hub_dir())
    monkeypatch.setitem(hub.TORCHVISION_WEIGHTS, "resnet18", hub.TorchvisionWeights("ResNet18_Weights.TEST", "resnet18", name, 256))

    def no_network(*a, **k):
        raise AssertionError("no download may happen")

    monkeypatch.setattr(hub.urllib.request, "urlopen", no_network)
    info = hub.resolve("resnet18")  # download allowed, but the cached file (hash checked) is used
    assert info.path == hub.torch_hub_dir() / name and info.labels == hub.imagenet_labels()
    model, variables = flax_resnet.from_pretrained("resnet18")
    assert model.arch == "resnet18"


# ------------------------------------------------------------------ Hugging Face: offline, fast, one line


def test_hf_hub_offline_reads_the_cache(caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = _hf_repo(caches, "timm/resnet18.a1_in1k", {"config.json": TIMM_CFG, "model.safetensors": _write_safetensors})
    info = hub.resolve("timm/resnet18.a1_in1k")  # download=True by default: HF_HUB_OFFLINE keeps it to the cache
    assert info.path == snap and info.source == "timm"
    # timm's in1k config names no classes: ImageNet's, in torchvision's (= timm's) order, and timm's preprocessing.
    assert info.labels == hub.imagenet_labels() and info.labels[0] == "tench"
    assert (info.preprocess.resize, info.preprocess.interpolation) == (235, "bicubic")
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        hub.resolve("timm/resnet50.a1_in1k")


def test_labels_are_only_imagenets_where_the_config_says_so(caches):
    other = {**TIMM_CFG, "pretrained_cfg": {**TIMM_CFG["pretrained_cfg"], "tag": "my_birds"}}
    _hf_repo(caches, "me/birds", {"config.json": other, "model.safetensors": _write_safetensors})
    assert hub.resolve("me/birds", download=False).labels is None
    path = caches / "plain.safetensors"
    _write_safetensors(path)
    info = hub.resolve(path)
    assert info.labels is None and info.preprocess.source.endswith("(default)")


@pytest.mark.slow  # three conversions and a predict
def test_a_converted_in1k_directory_keeps_imagenets_labels_in_the_file(caches, capsys, tmp_path):
    snap = _hf_repo(caches, "timm/resnet18.a1_in1k", {"config.json": TIMM_CFG, "model.safetensors": _write_safetensors})
    for fmt in ("safetensors", "msgpack", "npz"):
        out_file = tmp_path / f"r18.{fmt}"
        rc, out, err = _run(capsys, "convert", snap, out_file)
        assert rc == 0, err
        assert hub.resolve(out_file).labels == hub.imagenet_labels(), fmt
    rc, out, err = _run(capsys, "predict", _images(tmp_path / "x.npz", size=240), "--weights", tmp_path / "r18.safetensors", "--top-k", 1)
    assert rc == 0 and out.splitlines()[2] == "labels      1000 from the file's metadata (ImageNet-1k)", out
    assert out.splitlines()[4].split("  ")[-1] in hub.imagenet_labels()


def _no_network_env(tmp_path):
    """No network, deterministically: the hub's address refuses connections (HF_ENDPOINT is read at import)."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)
    return env


@pytest.mark.parametrize("name", ["timm/resnet50.a1_in1k", "resnet50.a1_in1k", "microsoft/resnet-50"])
def test_a_hub_id_without_network_fails_fast_in_one_line(name, tmp_path):
    # The issue: 25 s of huggingface_hub's "Retrying in 1s [Retry 1/5]" lines before the error.
    code = ("import time; from flax_resnet import hub\nt = time.perf_counter()\ntry:\n    hub.resolve(%r)\n"
            "except FileNotFoundError as e:\n    print(round(time.perf_counter() - t, 2)); print(e)\n") % name
    r = subprocess.run([sys.executable, "-c", code], env=_no_network_env(tmp_path), capture_output=True, text=True, timeout=60)
    seconds, message = r.stdout.splitlines()
    assert r.returncode == 0 and r.stderr == "", r.stderr  # not one retry line
    assert float(seconds) < 5, seconds
    assert "is not in the Hugging Face cache" in message and "the hub cannot be reached" in message


def test_predict_on_a_hub_id_without_network_is_one_line(tmp_path):
    batch = _images(tmp_path / "x.npz")
    r = subprocess.run([sys.executable, "-m", "flax_resnet", "predict", str(batch), "--weights", "timm/resnet50.a1_in1k"],
                       env=_no_network_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("flax-resnet predict: error: timm/resnet50.a1_in1k is not in the Hugging Face cache")


# ------------------------------------------------------------------ predict: inputs first, CLI terms, labels


def test_predict_checks_its_inputs_before_the_weights(caches, capsys, tmp_path):
    t0 = time.perf_counter()
    rc, out, err = _run(capsys, "predict", tmp_path / "nope.jpg", "--weights", "ResNet50_Weights.IMAGENET1K_V2")
    assert rc == 2 and err.strip() == f"flax-resnet predict: error: {tmp_path / 'nope.jpg'}: no such image file", err
    assert time.perf_counter() - t0 < 2  # nothing loaded, nothing downloaded
    rc, out, err = _run(capsys, "predict", tmp_path, "--weights", "resnet50")
    assert rc == 2 and "a directory, not an image file" in err, err
    rc, out, err = _run(capsys, "predict", _images(tmp_path / "x.npz"), "--weights", "ResNet50_Weights.IMAGENET1K_V2", "--no-download")
    assert rc == 2 and err.count("\n") == 1 and "and --no-download" in err and "download=False" not in err, err


def test_predict_says_where_labels_and_preprocessing_come_from(caches, capsys, tmp_path):
    _hf_repo(caches, "timm/resnet18.a1_in1k", {"config.json": TIMM_CFG, "model.safetensors": _write_safetensors})
    batch = _images(tmp_path / "x.npz", size=240)
    rc, out, err = _run(capsys, "predict", batch, "--weights", "timm/resnet18.a1_in1k", "--no-download", "--top-k", 2)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[1].startswith("preprocess  resize 235 bicubic, crop 224, ImageNet mean/std (timm pretrained_cfg")
    assert lines[2] == "labels      1000 from timm (ImageNet-1k)"  # the issue: "class 335" with "label": null
    assert lines[4].split("  ")[-1] in hub.imagenet_labels()
    plain = caches / "plain.safetensors"
    _write_safetensors(plain)
    rc, out, err = _run(capsys, "predict", batch, "--weights", plain, "--top-k", 1)
    assert rc == 0, err
    assert "(torchvision IMAGENET1K_V1 (default))" in out.splitlines()[1]
    assert out.splitlines()[2] == "labels      none (the weights name no classes; --labels FILE names them)"


# ------------------------------------------------------------------ names: lists and "did you mean"


def test_list_models_and_list_pretrained():
    assert flax_resnet.list_models() == list(flax_resnet.ARCHS)
    assert flax_resnet.list_models("resnet50*") == ["resnet50", "resnet50c", "resnet50d", "resnet50s", "resnet50t"]
    assert flax_resnet.list_models("WIDE*") == ["wide_resnet50_2", "wide_resnet101_2"]
    names = flax_resnet.list_pretrained()
    assert len(names) == len(set(names))
    tv = [n for n in names if "_Weights." in n]
    assert len(tv) == 17 and "ResNet50_Weights.IMAGENET1K_V2" in tv and "ResNet50_Weights.DEFAULT" not in tv
    assert flax_resnet.list_pretrained("*resnet-*") == [f"microsoft/resnet-{d}" for d in (18, 34, 50, 101, 152)]
    for n in names:  # every listed name is one resolve knows: with empty caches it is "not cached", never "unknown"
        if n.startswith("timm/"):
            assert n.split("/")[1].split(".")[0] in flax_resnet.ARCHS, n
        else:
            assert n in tv or n.startswith("microsoft/resnet-"), n


def test_every_listed_name_resolves_to_a_cache_miss(caches):
    for n in flax_resnet.list_pretrained():
        with pytest.raises(FileNotFoundError, match=r"is not in"):
            hub.resolve(n, download=False)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--arch", "resnt50"], "argument --arch: unknown architecture 'resnt50'; did you mean 'resnet50'?"),
        (["predict", "IMG", "--weights", "ResNet50_Weight.IMAGENET1K_V2"], "did you mean 'ResNet50_Weights.IMAGENET1K_V2'?"),
        (["predict", "IMG", "--weights", "resnet5O"], "did you mean 'resnet50'?"),
        (["predict", "IMG", "--weights", "timm/resnet50.a1_in1kk", "--no-download"], "did you mean 'timm/resnet50.a1_in1k'?"),
    ],
)
def test_typos_get_did_you_mean(argv, needle, caches, capsys, tmp_path):
    img = _images(tmp_path / "x.npz")
    rc, out, err = _run(capsys, *[str(img) if a == "IMG" else a for a in argv])
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_get_arch_suggests_the_nearest_name():
    with pytest.raises(ValueError, match=r"^unknown architecture 'resnet5o'; did you mean 'resnet50'\?$"):
        flax_resnet.get_arch("resnet5o")
    with pytest.raises(ValueError, match="choose one of resnet18, resnet34"):
        flax_resnet.get_arch("vgg16")


# ------------------------------------------------------------------ inspect: long metadata


def test_inspect_shortens_long_metadata(caches, capsys):
    labels = [f"class number {i}" for i in range(1000)]  # a model directory's 1000 labels: 12,942 characters in the issue
    snap = _hf_repo(caches, "timm/resnet18.x", {"config.json": {**TIMM_CFG, "label_names": labels}, "model.safetensors": _write_safetensors})
    rc, out, err = _run(capsys, "inspect", snap)
    assert rc == 0, err
    meta = next(l for l in out.splitlines() if l.startswith("metadata"))
    assert len(meta) < 300 and '"class number 4", "... (1000 in all)"' in meta and meta.endswith("(--full shows all)"), meta
    assert max(map(len, out.splitlines())) < 300
    rc, out, err = _run(capsys, "inspect", snap, "--full")
    meta = next(l for l in out.splitlines() if l.startswith("metadata"))
    assert rc == 0 and all(f'"{x}"' in meta for x in labels) and "--full" not in meta
