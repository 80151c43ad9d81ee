"""from_pretrained: torchvision names through torch hub's cache, hub ids through the Hugging Face cache (built here, offline)."""

import functools
import hashlib
import http.server
import json
import threading

import jax
import numpy as np
import pytest
import torch

import flax_resnet
import torch_ref
from flax_resnet import hub


@functools.lru_cache(maxsize=None)
def _state_dict(num_classes=1000):
    torch.manual_seed(0)
    m = torch_ref.resnet18(num_classes=num_classes, layout="torchvision")
    with torch.no_grad():  # non-default BN statistics, so swapped leaves would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_same(a, b):
    (ma, va), (mb, vb) = a, b
    assert ma == mb
    la, ta = jax.tree.flatten(va)
    lb, tb = jax.tree.flatten(vb)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


def _hf_repo(cache, repo, files):
    """A Hugging Face hub cache entry as huggingface_hub lays it out (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / "hf" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, dict):
            (snap / name).write_text(json.dumps(content))
        else:
            content(snap / name)
    return snap


def _write_safetensors(path):
    from safetensors.torch import save_file

    save_file(_state_dict(), str(path))


def test_torch_hub_dir_follows_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert hub.torch_hub_dir() == tmp_path / "th" / "hub" / "checkpoints"
    assert str(hub.torch_hub_dir()) == torch.hub.get_dir() + "/checkpoints"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert str(hub.torch_hub_dir()) == torch.hub.get_dir() + "/checkpoints" == str(tmp_path / "xdg" / "torch" / "hub" / "checkpoints")


def test_torchvision_names_hit_the_torch_hub_cache(caches):
    d = hub.torch_hub_dir()
    d.mkdir(parents=True)
    torch.save(_state_dict(), d / "resnet18-f37072fd.pth")  # random weights under torchvision's name: check_hash=False
    expected = flax_resnet.load(d / "resnet18-f37072fd.pth")
    for name in ("ResNet18_Weights.IMAGENET1K_V1", "ResNet18_Weights.DEFAULT", "resnet18", "resnet18.tv_in1k", "resnet18-f37072fd.pth"):
        info = hub.resolve(name, download=False, check_hash=False)
        assert info.source == "torchvision" and info.path == d / "resnet18-f37072fd.pth"
        assert (info.preprocess.resize, info.preprocess.crop, info.preprocess.interpolation) == (256, 224, "bilinear")
        assert info.labels == hub.imagenet_labels()
    _assert_same(flax_resnet.from_pretrained("ResNet18_Weights.IMAGENET1K_V1", download=False, check_hash=False), expected)
    model, variables = flax_resnet.from_pretrained("resnet18", download=False, check_hash=False, dtype=jax.numpy.bfloat16)
    assert model.dtype == jax.numpy.bfloat16
    nnx_model = flax_resnet.from_pretrained("resnet18.tv_in1k", api="nnx", download=False, check_hash=False)
    from flax_resnet import nnx as fnnx

    _assert_same((nnx_model.arch, fnnx.to_linen(nnx_model)), (expected[0].arch, expected[1]))


def test_torchvision_table():
    w = hub.TORCHVISION_WEIGHTS
    assert w["resnet50_weights.imagenet1k_v2"].file == "resnet50-11ad3fa6.pth" and w["resnet50_weights.imagenet1k_v2"].resize == 232
    assert w["resnet50_weights.imagenet1k_v1"].file == "resnet50-0676ba61.pth" and w["resnet50_weights.imagenet1k_v1"].resize == 256
    assert w["resnet50"] is w["resnet50_weights.default"] is w["resnet50_weights.imagenet1k_v2"] is w["resnet50.tv2_in1k"]
    assert w["resnext101_64x4d"].resize == 232  # its only (V1) weights use the new recipe's 232
    assert w["resnet50_weights.imagenet1k_v2"].url == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    assert {v.arch for v in w.values()} == {a for a in flax_resnet.ARCHS if a in hub.TORCHVISION_WEIGHTS}
    labels = hub.imagenet_labels()  # torchvision's weights.meta["categories"]
    assert len(labels) == len(set(labels)) == 1000
    assert (labels[0], labels[207], labels[281], labels[999]) == ("tench", "golden retriever", "tabby", "toilet tissue")


def test_missing_torchvision_file_is_one_line(caches, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"^resnet50-11ad3fa6.pth \(ResNet50_Weights.IMAGENET1K_V2\) is not in .*checkpoints and download=False"):
        hub.resolve("ResNet50_Weights.IMAGENET1K_V2", download=False)

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(hub.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as e:
        flax_resnet.from_pretrained("resnet50")
    msg = str(e.value)
    assert "\n" not in msg and "is not in" in msg and "the download failed: network unreachable" in msg and "resnet50-11ad3fa6.pth" in msg
    assert not list(hub.torch_hub_dir().glob("*")), "a failed download leaves nothing behind"


def _serve(directory):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_into_the_torch_hub_cache_checks_the_hash(caches, monkeypatch):
    served = caches / "served"
    served.mkdir()
    tmp = served / "x.pth"
    torch.save(_state_dict(), tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    good = f"resnet18-{sha[:8]}.pth"
    tmp.rename(served / good)
    (served / "resnet18-00000000.pth").write_bytes((served / good).read_bytes())
    server = _serve(served)
    try:
        monkeypatch.setattr(hub, "TORCHVISION_URL", f"http://127.0.0.1:{server.server_port}/")
        monkeypatch.setitem(hub.TORCHVISION_WEIGHTS, "resnet18", hub.TorchvisionWeights("ResNet18_Weights.TEST", "resnet18", good, 256))
        got = flax_resnet.from_pretrained("resnet18")
        assert (hub.torch_hub_dir() / good).read_bytes() == (served / good).read_bytes()
        _assert_same(got, flax_resnet.load(served / good))
        bad = hub.TorchvisionWeights("ResNet18_Weights.BAD", "resnet18", "resnet18-00000000.pth", 256)
        monkeypatch.setitem(hub.TORCHVISION_WEIGHTS, "resnet18", bad)
        with pytest.raises(FileNotFoundError, match=r"download failed: SHA-256 .* does not start with 00000000"):
            hub.resolve("resnet18")
        assert sorted(p.name for p in hub.torch_hub_dir().iterdir()) == [good]
    finally:
        server.shutdown()


def test_timm_hub_id_through_the_hf_cache(caches):
    cfg = {
        "architecture": "resnet18",
        "num_classes": 1000,
        "label_names": [f"n{i:08d}" for i in range(1000)],
        "pretrained_cfg": {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "center",
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
    snap = _hf_repo(caches, "timm/resnet18.a1_in1k", {"config.json": cfg, "model.safetensors": _write_safetensors})
    expected = flax_resnet.load(snap)
    for name in ("timm/resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k", "resnet18.a1_in1k"):
        info = hub.resolve(name, download=False)
        assert info.source == "timm" and info.directory == info.path == snap
        assert info.labels[7] == "n00000007" and len(info.labels) == 1000
        p = info.preprocess
        assert (p.resize, p.crop, p.interpolation, p.crop_rounding) == (235, 224, "bicubic", "round")  # floor(224 / 0.95)
    _assert_same(flax_resnet.from_pretrained("timm/resnet18.a1_in1k", download=False), expected)


def test_transformers_hub_id_through_the_hf_cache(caches, monkeypatch):
    # A real transformers ResNet (ResNet-18 shapes, 10 classes) saved as save_pretrained / the hub cache hold it.
    import transformers

    config = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                                       num_labels=10, id2label={i: f"class {i}" for i in range(10)})
    torch.manual_seed(0)
    proc = {"crop_pct": 0.875, "do_normalize": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": {"shortest_edge": 224}}
    snap = _hf_repo(caches, "microsoft/resnet-18", {"preprocessor_config.json": proc})
    transformers.ResNetForImageClassification(config).save_pretrained(snap)
    info = hub.resolve("microsoft/resnet-18", download=False)
    assert info.source == "transformers" and info.directory == info.path == snap
    assert info.labels == tuple(f"class {i}" for i in range(10))
    p = info.preprocess
    assert (p.resize, p.crop, p.interpolation, p.crop_rounding) == (256, 224, "bicubic", "floor")
    got = flax_resnet.from_pretrained("microsoft/resnet-18", download=False)
    assert (got[0].arch, got[0].num_classes) == ("resnet18", 10)
    _assert_same(got, flax_resnet.load(snap))
    # the snapshot directory itself is a name too
    assert hub.resolve(str(snap)).labels == info.labels
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the documented offline path: downloads allowed, the cache only
    assert hub.resolve("microsoft/resnet-18").path == snap


def test_hf_misses_are_one_line(caches, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"^timm/resnet50.a1_in1k is not in the Hugging Face cache .*hf \(config.json missing\) and download=False"):
        hub.resolve("timm/resnet50.a1_in1k", download=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        hub.resolve("microsoft/resnet-50")
    _hf_repo(caches, "timm/resnet26.x", {"config.json": {"architecture": "resnet26"}})
    with pytest.raises(FileNotFoundError, match=r"model.safetensors or pytorch_model.bin missing"):
        hub.resolve("timm/resnet26.x", download=False)


def test_unknown_names_and_apis():
    with pytest.raises(ValueError, match=r"^unknown pretrained name 'resnet5O'"):
        hub.resolve("resnet5O")
    with pytest.raises(FileNotFoundError, match=r"^runs/x/model.safetensors: no such file or directory$"):
        hub.resolve("runs/x/model.safetensors")
    with pytest.raises(ValueError, match="unknown api"):
        flax_resnet.from_pretrained("resnet50", api="keras")


def test_a_plain_file_is_a_name(tmp_path):
    path = tmp_path / "mine.safetensors"
    _write_safetensors(path)
    info = hub.resolve(path)
    assert info.source == "file" and info.labels is None and info.preprocess == flax_resnet.preprocess.Preprocess()
    _assert_same(flax_resnet.from_pretrained(path), flax_resnet.load(path))
