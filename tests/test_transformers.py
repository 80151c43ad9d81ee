"""The transformers layout, live against Hugging Face transformers' own ResNet modules."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

import flax_resnet
import torch_ref
from flax_resnet import archs, convert
from parity import fixtures, harness
from parity.hf import TransformersResNet, reference_model

# microsoft/resnet-18 and -50 (the hub configs' architecture fields), and a v1 bottleneck.
CONFIGS = {
    "resnet-18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
    "resnet-50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048]),
    "resnet-26-v1": dict(layer_type="bottleneck", depths=[2, 2, 2, 2], hidden_sizes=[256, 512, 1024, 2048], downsample_in_bottleneck=True),
}
ARCH = {"resnet-18": "resnet18", "resnet-50": "resnet50", "resnet-26-v1": "resnet26"}


def hf_model(name: str, num_labels: int = 7, seed: int = 0) -> ResNetForImageClassification:
    """A seeded transformers ResNet with random BN affine params and calibrated running stats, in eval mode."""
    return reference_model(CONFIGS[name], num_labels=num_labels, seed=seed)


def test_keys_match_transformers_both_ways():
    for name, arch in ARCH.items():
        m = ResNetForImageClassification(ResNetConfig(num_labels=1000, **CONFIGS[name]))
        sd = m.state_dict()
        cfg = convert.infer_config(sd)
        assert (cfg.arch, cfg.layout, cfg.num_classes) == (arch, "transformers", 1000)
        expected = {leaf.torch_key: leaf.torch_shape for leaf in convert.leaves(cfg)}
        params = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        assert expected == params
    # transformers' own figure for microsoft/resnet-50 with 1000 labels, and torchvision's.
    m = ResNetForImageClassification(ResNetConfig(num_labels=1000))
    assert sum(p.numel() for p in m.parameters()) == 25_557_032 == archs.PARAM_COUNTS["resnet50"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_exact_and_loads_strict(name):
    m = hf_model(name)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.num_batches_tracked.fill_(17)
    sd = m.state_dict()
    model, variables = flax_resnet.from_torch(sd)
    back = convert.flax_to_torch(variables, layout="transformers", num_batches_tracked=17)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert np.array_equal(back[k], v.numpy()), k
    fresh = ResNetForImageClassification(m.config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    # The same weights, re-laid out as torchvision keys, load strictly into torch_ref.
    tv = convert.flax_to_torch(variables, layout="torchvision")
    torch_ref.ResNet(ARCH[name], num_classes=7).load_state_dict({k: torch.from_numpy(v) for k, v in tv.items()}, strict=True)


def test_headless_model_keys_convert():
    m = ResNetModel(ResNetConfig(**CONFIGS["resnet-18"])).eval()
    cfg = convert.infer_config(m.state_dict())
    assert (cfg.arch, cfg.layout, cfg.num_classes) == ("resnet18", "transformers", 0)
    model, variables = flax_resnet.from_torch(m.state_dict())
    assert "fc" not in variables["params"]
    x = fixtures.images(2, 3, 48, 48).numpy()
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).pooler_output.flatten(1).numpy()
    out = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_against_transformers_float64(name):
    m = TransformersResNet(hf_model(name))
    x = fixtures.images(2, 3, 45, 51).numpy()  # odd sizes
    r = harness.run_parity(m, x, modes=("eval", "train", "grad"), dtype="float64")
    assert r.passed, r.format()
    assert r.point("eval", "logits").rel < 1e-10


@pytest.mark.parametrize("name", ["resnet-18"])  # resnet-50: float64 above; its fp32 numbers are torch_ref's (tests/test_parity.py)
def test_parity_against_transformers_float32(name):
    m = TransformersResNet(hf_model(name))
    x = fixtures.images(2, 3, 64, 64).numpy()
    r = harness.run_parity(m, x, modes=("eval", "train", "grad"), dtype="float32")
    assert r.passed, r.format()
    assert r.kinks is not None, "the gradient reference was taken on Flax's side of every ReLU kink (transformers' module names mapped)"
    # transformers' tensors are reported by the stage of the torch_ref module they map to, as every layout's are
    assert [p.name for p in r.points if p.mode == "grad"] == ["loss", "grad stem", "grad layer1", "grad layer2", "grad layer3", "grad layer4", "grad fc"]


def test_relu_owner_names_torch_ref_modules():
    owner = TransformersResNet.relu_owner
    assert owner("resnet.embedder.embedder.activation") == ""
    assert owner("resnet.encoder.stages.2.layers.1.layer.0.activation") == "layer3.1"
    assert owner("resnet.encoder.stages.0.layers.0.activation") == "layer1.0"
    with pytest.raises(ValueError, match="pooler"):
        owner("resnet.pooler.activation")


@pytest.fixture()
def saved(tmp_path):
    m = hf_model("resnet-26-v1")
    m.save_pretrained(tmp_path / "hf")
    return m, tmp_path


def test_model_directory_loads_with_its_config(saved):
    m, tmp = saved
    model, variables = flax_resnet.load(tmp / "hf")
    assert (model.arch, model.num_classes, model.stride_in_1x1) == ("resnet26", 7, True)
    x = fixtures.images(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        ref = m.double()(x).logits.numpy()
    import jax

    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        out = np.asarray(model.apply(v64, x.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flax_resnet", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_converts_a_directory_and_exports_transformers_keys(saved):
    m, tmp = saved
    r = _cli("convert", tmp / "hf", tmp / "r26.msgpack")
    assert r.returncode == 0, r.stderr
    meta = flax_resnet.io.read(tmp / "r26.msgpack").meta
    assert meta["labels"] == [f"class {i}" for i in range(7)] and meta["stride_in_1x1"] is True
    r = _cli("convert", tmp / "r26.msgpack", tmp / "back.safetensors", "--layout", "transformers")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    back = load_file(tmp / "back.safetensors")
    fresh = ResNetForImageClassification(m.config)
    fresh.load_state_dict(back, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(back[k], v), k
    # v1 survives the msgpack: the loaded model strides in the 1x1 conv.
    model, _ = flax_resnet.load(tmp / "r26.msgpack")
    assert model.stride_in_1x1


def test_bad_model_directories_are_one_line(tmp_path):
    m = hf_model("resnet-18")
    m.save_pretrained(tmp_path / "ok")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    wrong = tmp_path / "wrong"
    m.save_pretrained(wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["depths"] = [3, 4, 6, 3]
    (wrong / "config.json").write_text(json.dumps(cfg))
    timm = tmp_path / "timm"
    timm.mkdir()
    (timm / "config.json").write_text(json.dumps({"architecture": "resnet51q.ra2_in1k", "num_classes": 7}))
    (timm / "model.safetensors").write_bytes((tmp_path / "ok" / "model.safetensors").read_bytes())
    cases = {
        "noweights": "without weights",
        "wrong": "depths is [3, 4, 6, 3] but the weights hold [2, 2, 2, 2]",
        "timm": "unknown timm architecture 'resnet51q.ra2_in1k'",
    }
    for d, msg in cases.items():
        r = _cli("convert", tmp_path / d, tmp_path / f"{d}.msgpack")
        assert r.returncode == 2, (d, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0] and str(tmp_path / d) in lines[0], (d, r.stderr)
        assert not (tmp_path / f"{d}.msgpack").exists()


def test_timm_hub_directory_names_the_architecture(tmp_path):
    from safetensors.torch import save_file

    tm = fixtures.reference_model("resnet18d", num_classes=5)
    d = tmp_path / "timm-resnet18d"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({"architecture": "resnet18d.ra2_in1k", "num_classes": 5, "label_names": list("abcde")}))
    model, variables = flax_resnet.load(d)
    assert model.arch == "resnet18d"
    x = fixtures.images(2, 3, 33, 47)
    with torch.no_grad():
        ref = tm(x).numpy()
    out = np.asarray(model.apply(variables, x.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # A directory whose config names another architecture than the weights hold is refused, naming both.
    (d / "config.json").write_text(json.dumps({"architecture": "resnet26d", "num_classes": 5}))
    with pytest.raises(convert.ConversionError, match="resnet26d"):
        flax_resnet.load(d)
