"""ModelConfig: validation, JSON round trip, build/model_config, and checkpoints that store it."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet
import flax_resnet.nnx as frn
import torch_ref
from flax_resnet import ModelConfig
from flax_resnet.convert import torch_to_flax

# Every setting away from its default, so a field dropped anywhere shows.
SETTINGS = dict(
    stride_in_1x1=True, zero_init_residual=True, bn_momentum=0.8, bn_eps=1e-3, dtype="bfloat16", param_dtype="float32", precision="highest",
    scan_blocks=True, remat=True,
)


def test_fields_are_validated_in_one_line():
    bad = {
        "arch": dict(arch="resnet9000"),
        "layout": dict(arch="resnet18", layout="seed"),
        "num_classes": dict(arch="resnet18", num_classes=-1),
        "in_channels": dict(arch="resnet18", in_channels=True),
        "stride_in_1x1": dict(arch="resnet18", stride_in_1x1="yes"),
        "bn_eps": dict(arch="resnet18", bn_eps=0.0),
        "bn_momentum": dict(arch="resnet18", bn_momentum=1.5),
        "dtype": dict(arch="resnet18", dtype="int8"),
        "precision": dict(arch="resnet18", precision="fast"),
        "conv_bias": dict(arch="resnet50", layout="seed", conv_bias=False),
    }
    for field, kw in bad.items():
        with pytest.raises(ValueError, match=rf"^ModelConfig\.{field}: [^\n]+$"):
            ModelConfig(**kw)


def test_from_dict_refuses_unknown_fields_and_types():
    with pytest.raises(ValueError, match=r"^ModelConfig: unknown field\(s\) strides; known: "):
        ModelConfig.from_dict({"arch": "resnet18", "strides": 2})
    with pytest.raises(ValueError, match=r"^ModelConfig\.dtype: expected a string, got int$"):
        ModelConfig.from_dict({"arch": "resnet18", "dtype": 3})
    with pytest.raises(ValueError, match=r"^ModelConfig\.arch: missing"):
        ModelConfig.from_dict({"num_classes": 3})
    with pytest.raises(ValueError, match=r"^ModelConfig: expected a dict of fields, got list$"):
        ModelConfig.from_dict(["resnet18"])


def test_json_round_trip_and_normalized_values():
    cfg = ModelConfig("resnet50", "seed", 10, 1, dtype=jnp.bfloat16, param_dtype=np.float64, precision=jax.lax.Precision.HIGHEST)
    assert (cfg.conv_bias, cfg.dtype, cfg.param_dtype, cfg.precision) == (True, "bfloat16", "float64", "highest")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.replace(layout="torchvision").conv_bias is False  # the bias follows the layout unless given
    assert cfg.replace(num_classes=3).conv_bias is True


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_build_and_model_config_are_inverse(api):
    cfg = ModelConfig("resnet18", num_classes=3, in_channels=1, **SETTINGS)
    model = nnx.eval_shape(lambda: flax_resnet.build(cfg, api)) if api == "nnx" else flax_resnet.build(cfg, api)
    assert flax_resnet.model_config(model) == cfg
    assert model.stride_in_1x1 and model.bn_eps == 1e-3 and model.precision == jax.lax.Precision.HIGHEST
    with pytest.raises(ValueError, match="'dtype' is a ModelConfig field"):
        flax_resnet.build(cfg, api, dtype=jnp.float32)
    with pytest.raises(ValueError, match="unknown api"):
        flax_resnet.build(cfg, "torch")


@functools.lru_cache(maxsize=None)
def _state_dict(arch: str, num_classes: int):
    torch.manual_seed(0)
    return torch_ref.ResNet(arch, num_classes=num_classes).state_dict()


def _variables(cfg):
    """Variables of ``cfg``'s architecture (the unrolled tree, which ``save`` writes), made by torch: no compile."""
    return torch_to_flax(_state_dict(cfg.arch, cfg.num_classes))


@pytest.mark.parametrize("suffix", [".msgpack", ".safetensors", ".npz", ""])
def test_checkpoints_store_the_config(tmp_path, suffix):
    """``save(config=...)`` writes every setting; ``load`` (Linen and NNX) builds that model again."""
    cfg = ModelConfig("resnet18", num_classes=3, **SETTINGS)
    variables = _variables(cfg)
    path = tmp_path / f"ckpt{suffix}"
    flax_resnet.save(path, variables, config=cfg)
    loaded, loaded_vars = flax_resnet.load(path)
    assert flax_resnet.model_config(loaded, loaded_vars) == cfg
    assert loaded_vars["params"]["layer1"]["rest"]["conv1"]["kernel"].shape[0] == 1  # scan_blocks: the stacked tree
    assert flax_resnet.model_config(flax_resnet.load(path, api="nnx")) == cfg


def test_an_nnx_model_saves_its_own_config(tmp_path):
    cfg = ModelConfig("resnet18", num_classes=3, **{**SETTINGS, "scan_blocks": False, "remat": False})
    model = frn.from_torch(_state_dict("resnet18", 3), **{k: v for k, v in SETTINGS.items() if k not in ("scan_blocks", "remat")})
    assert flax_resnet.model_config(model) == cfg
    flax_resnet.save(tmp_path / "nnx.msgpack", model)
    assert flax_resnet.io.load_variables(tmp_path / "nnx.msgpack")[0] == cfg


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_from_torch_builds_a_whole_config(api):
    """``from_torch(sd, config=cfg)`` is ``cfg`` holding the weights: every setting, cast and stacked as it says."""
    cfg = ModelConfig("resnet18", num_classes=3, **{**SETTINGS, "param_dtype": "bfloat16"})
    convert = frn.from_torch if api == "nnx" else lambda sd, **kw: flax_resnet.from_torch(sd, **kw)[0]
    model = convert(_state_dict("resnet18", 3), config=cfg)
    assert flax_resnet.model_config(model) == cfg
    if api == "linen":
        _, variables = flax_resnet.from_torch(_state_dict("resnet18", 3), config=cfg)
        assert variables["params"]["layer1"]["rest"]["conv1"]["kernel"].dtype == jnp.bfloat16
    with pytest.raises(flax_resnet.ConversionError, match=r"resnet18 \(5 classes, 3 channels\).*the state_dict holds a resnet18 with 3 classes"):
        convert(_state_dict("resnet18", 3), config=cfg.replace(num_classes=5))
    with pytest.raises(flax_resnet.ConversionError, match="resnet34 .*missing key"):
        convert(_state_dict("resnet18", 3), config=cfg.replace(arch="resnet34"))
    with pytest.raises(ValueError, match="pass config, or arch, bn_eps, not both"):
        convert(_state_dict("resnet18", 3), config=cfg, arch="resnet18", bn_eps=1e-3)


def test_files_without_a_config_still_load(tmp_path):
    """Older files store no config: the weights' settings, defaults for the rest; a contradicting config is refused."""
    cfg = ModelConfig("resnet18", num_classes=3)
    variables = _variables(cfg)
    flax_resnet.save(tmp_path / "old.msgpack", variables)
    assert flax_resnet.io.load_variables(tmp_path / "old.msgpack")[0] == cfg
    with pytest.raises(flax_resnet.CheckpointError, match=r"metadata config describes resnet34 .* but the weights hold resnet18"):
        flax_resnet.save(tmp_path / "bad.msgpack", variables, config=cfg.replace(arch="resnet34"))


def test_from_pretrained_nnx_keeps_v1_strides(tmp_path, monkeypatch):
    """The bug this config fixes: ``from_pretrained(dir, api="nnx")`` built v1.5 from a v1 transformers directory."""
    transformers = pytest.importorskip("transformers")
    tcfg = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[2, 2, 2, 2], layer_type="bottleneck", downsample_in_bottleneck=True, num_labels=3)
    transformers.ResNetForImageClassification(tcfg).save_pretrained(tmp_path / "d")
    assert flax_resnet.model_config(flax_resnet.from_pretrained(str(tmp_path / "d"), api="nnx")).stride_in_1x1
    assert flax_resnet.model_config(*flax_resnet.from_pretrained(str(tmp_path / "d"))).stride_in_1x1
