"""Every way in gives the same model: one ``ModelConfig`` and the same logits, Linen and NNX.

Sources that differ in every setting: v1 strides from a transformers model
directory (a setting the weights cannot show), the seed layout's conv biases
with 1-channel input, timm's deep stem and avg-pool shortcut as a headless
backbone (``num_classes=0``), and grouped convs. Each goes in through
``from_torch``, ``load``, ``from_pretrained`` (caches built here) and the
``convert`` command followed by ``load``, under both APIs; all must agree
with each other exactly and with torch within fp32 noise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import flax_resnet
import flax_resnet.nnx as frn
import torch_ref
from flax_resnet import ModelConfig, hub
from parity import fixtures

ROOT = fixtures.__file__.rsplit("/parity/", 1)[0]
SIZE = 32


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _hf_repo(cache, repo: str, files: dict) -> None:
    """A Hugging Face hub cache entry as huggingface_hub lays it out (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snap / name)


def _transformers_v1(tmp):
    """A transformers ResNet-26 (bottleneck) saved with downsample_in_bottleneck=True: v1 strides."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(
        num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[2, 2, 2, 2], layer_type="bottleneck",
        downsample_in_bottleneck=True, num_labels=5,
    )
    model = transformers.ResNetForImageClassification(cfg).eval()
    _randomize_bn(model)
    model.save_pretrained(tmp / "hf_dir")
    _hf_repo(tmp / "hf", "org/resnet26-v1", {"config.json": tmp / "hf_dir" / "config.json", "model.safetensors": tmp / "hf_dir" / "model.safetensors"})
    run = lambda x: model(pixel_values=x).logits  # noqa: E731
    expected = ModelConfig("resnet26", "transformers", num_classes=5, in_channels=3, stride_in_1x1=True)
    return dict(state_dict=model.state_dict(), path=tmp / "hf_dir", name="org/resnet26-v1", torch=run, config=expected, hidden={"stride_in_1x1": True})


def _seed_1ch(tmp):
    """The seed layout (convs with bias, ``identity_downsample``) of ResNet-50 on 1-channel images."""
    model = fixtures.reference_model("resnet50", layout="seed", num_classes=7, img_channels=1, calibrate_size=SIZE)
    torch.save(model.state_dict(), tmp / "seed.pth")
    expected = ModelConfig("resnet50", "seed", num_classes=7, in_channels=1)
    return dict(state_dict=model.state_dict(), path=tmp / "seed.pth", name=str(tmp / "seed.pth"), torch=model, config=expected, hidden={})


def _timm_headless(tmp, arch: str = "resnet10t"):
    """timm's deep tiered stem and avg-pool shortcut, headless (num_classes=0), as a timm hub directory."""
    model = fixtures.reference_model(arch, num_classes=0, calibrate_size=SIZE)
    (tmp / "timm_dir").mkdir()
    (tmp / "timm_dir" / "config.json").write_text(json.dumps({"architecture": f"{arch}.test", "num_classes": 0, "num_features": 512}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "timm_dir" / "model.safetensors"))
    _hf_repo(tmp / "hf", f"timm/{arch}.test", {"config.json": tmp / "timm_dir" / "config.json", "model.safetensors": tmp / "timm_dir" / "model.safetensors"})
    expected = ModelConfig(arch, "torchvision", num_classes=0, in_channels=3)
    return dict(state_dict=model.state_dict(), path=tmp / "timm_dir", name=f"timm/{arch}.test", torch=model, config=expected, hidden={})


def _grouped(tmp):
    """ResNeXt-50 32x4d (grouped 3x3 convs) in torch hub's cache under torchvision's file name."""
    model = fixtures.reference_model("resnext50_32x4d", num_classes=1000, calibrate_size=SIZE)
    name = "ResNeXt50_32X4D_Weights.IMAGENET1K_V2"
    (tmp / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    path = tmp / "torch" / "hub" / "checkpoints" / hub.TORCHVISION_WEIGHTS[name.lower()].file
    torch.save(model.state_dict(), path)
    expected = ModelConfig("resnext50_32x4d", "torchvision", num_classes=1000, in_channels=3)
    return dict(state_dict=model.state_dict(), path=path, name=name, torch=model, config=expected, hidden={})


SOURCES = {"transformers_v1": _transformers_v1, "seed_1ch": _seed_1ch, "timm_headless": _timm_headless, "grouped": _grouped}


def _linen(way):
    model, variables = way
    return lambda x: model.apply(variables, jnp.asarray(x)), flax_resnet.model_config(model, variables)


def _nnx(model):
    model.eval()
    return lambda x: model(jnp.asarray(x)), flax_resnet.model_config(model)


def _convert_cli(src, dst):
    p = subprocess.run([sys.executable, "-m", "flax_resnet", "convert", str(src), str(dst)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    return dst


def _convert_here(src, dst):
    flax_resnet.io.convert(src, dst)  # what the command runs, without a new interpreter
    return dst


def _walk(source, tmp_path, monkeypatch, convert):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = source(tmp_path)
    cfg = src["config"]
    x = fixtures.images(2, cfg.in_channels, SIZE, SIZE)
    with torch.no_grad():
        want = src["torch"](x).numpy()
    x = x.numpy().transpose(0, 2, 3, 1)
    converted = convert(src["path"], tmp_path / "converted.msgpack")

    ways = {
        "from_torch": _linen(flax_resnet.from_torch(src["state_dict"], **src["hidden"])),
        "nnx.from_torch": _nnx(frn.from_torch(src["state_dict"], **src["hidden"])),
        "load": _linen(flax_resnet.load(src["path"])),
        "load(api=nnx)": _nnx(flax_resnet.load(src["path"], api="nnx")),
        "from_pretrained": _linen(flax_resnet.from_pretrained(src["name"], download=False, check_hash=False)),
        "from_pretrained(api=nnx)": _nnx(flax_resnet.from_pretrained(src["name"], api="nnx", download=False, check_hash=False)),
        "convert+load": _linen(flax_resnet.load(converted)),
        "convert+load(api=nnx)": _nnx(flax_resnet.load(converted, api="nnx")),
    }
    configs = {name: c for name, (_, c) in ways.items()}
    assert configs == {name: cfg for name in ways}
    assert flax_resnet.io.load_variables(src["path"])[0] == cfg

    scale = float(np.abs(want).max())
    logits = {name: np.asarray(run(x)) for name, (run, _) in ways.items()}
    first = logits["from_torch"]
    assert first.shape == want.shape == (2, cfg.num_classes or cfg.spec.num_features)
    np.testing.assert_allclose(first, want, rtol=0, atol=2e-5 * scale)  # torch fp32 against Flax fp32
    for name, y in logits.items():
        np.testing.assert_allclose(y, first, rtol=0, atol=1e-6 * scale, err_msg=name)
    if cfg.stride_in_1x1:  # the setting matters: the same weights as v1.5 are another network
        run, _ = _linen(flax_resnet.from_torch(src["state_dict"]))
        assert np.abs(np.asarray(run(x)) - want).max() > 1e-2 * scale


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_every_way_in_gives_one_config_and_the_same_logits(source, tmp_path, monkeypatch):
    _walk(source, tmp_path, monkeypatch, _convert_cli)


def test_every_way_in_fast(tmp_path, monkeypatch):
    """The smallest source (timm's resnet10t, headless) through every way in; ``convert`` in-process."""
    _walk(_timm_headless, tmp_path, monkeypatch, _convert_here)


def test_grouped_convs_fast():
    """Grouped 3x3 convs at tiny size (a custom ``ArchSpec``: only ``from_torch`` reads those) build one config, Linen and NNX."""
    spec = flax_resnet.ArchSpec("tiny_resnext", "bottleneck", (1, 1, 1, 1), groups=8, width_per_group=4)
    torch.manual_seed(0)
    model = fixtures.randomize_and_calibrate(torch_ref.ResNet(spec, num_classes=4), in_channels=3, size=SIZE)
    x = fixtures.images(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x).numpy()
    x = x.numpy().transpose(0, 2, 3, 1)
    sd = model.state_dict()
    ways = {"from_torch": _linen(flax_resnet.from_torch(sd, arch=spec)), "nnx.from_torch": _nnx(frn.from_torch(sd, arch=spec))}
    expected = ModelConfig(spec, num_classes=4)
    assert {name: c for name, (_, c) in ways.items()} == {name: expected for name in ways}
    assert ModelConfig.from_dict(json.loads(json.dumps(expected.to_dict()))) == expected  # a custom ArchSpec serializes too
    scale = float(np.abs(want).max())
    for name, (run, _) in ways.items():
        np.testing.assert_allclose(np.asarray(run(x)), want, rtol=0, atol=2e-5 * scale, err_msg=name)
