"""``build``: the one place a ``ModelConfig`` becomes a model; ``model_config``: the way back.

Every loader (``load``, ``from_pretrained``, ``from_torch``, Linen and NNX)
and every tool that makes a model for another (the parity harness, the
train command, ``LinenApply``) builds from a config: ``build`` or, below it,
the one constructor path of each front end (``ResNet.from_config``, which
modules under ``flax_resnet.nnx`` and ``flax_resnet.convert`` call because
this module imports both front ends). A setting that changes the numbers
(v1 strides, conv bias, BN eps, precision, ...) reaches both or neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flax_resnet.config import ModelConfig
from flax_resnet.model import ResNet
from flax_resnet.nnx.model import ResNet as NNXResNet

APIS = ("linen", "nnx")
# Runtime arguments: they do not change the numbers, so they are not part of the config.
RUNTIME = {"linen": ("axis_name",), "nnx": ("axis_name", "rngs")}
_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def check_api(api: str) -> str:
    """``api`` if it is ``"linen"`` or ``"nnx"``; ValueError otherwise."""
    if api not in APIS:
        raise ValueError(f"unknown api {api!r}; choose 'linen' or 'nnx'")
    return api


def build(config: ModelConfig, api: str = "linen", **runtime: Any):
    """The model ``config`` describes.

    Args:
        config: the model description (from ``infer_config``, ``load_variables``,
            ``model_config``, or written out).
        api: ``"linen"`` (a ``flax_resnet.ResNet`` module, variables apart) or
            ``"nnx"`` (a ``flax_resnet.nnx.ResNet`` with fresh weights, in train mode).
        **runtime: settings that do not change the numbers: ``axis_name``
            (both), ``rngs`` (NNX; default ``nnx.Rngs(0)``).

    Raises:
        ValueError: an unknown ``api``; a config field or unknown name in ``runtime``.
    """
    check_api(api)
    for name in runtime:
        if name in _FIELDS:
            raise ValueError(f"{name!r} is a ModelConfig field: pass config.replace({name}=...) instead")
        if name not in RUNTIME[api]:
            raise ValueError(f"unknown runtime argument {name!r} for api={api!r}; choose from {', '.join(RUNTIME[api])}")
    return (ResNet if api == "linen" else NNXResNet).from_config(config, **runtime)


def _dtype_name(value: Any) -> str | None:
    return None if value is None else np.dtype(value).name


def model_config(model: Any, variables: Any = None) -> ModelConfig:
    """The ``ModelConfig`` of a Linen or NNX ``ResNet``: ``build(model_config(m), api)`` is ``m`` again.

    Args:
        model: a ``flax_resnet.ResNet`` or ``flax_resnet.nnx.ResNet``.
        variables: a Linen model's variables: their stem kernel gives the
            input channels (as at ``apply``), else ``model.in_channels``.

    Raises:
        ValueError: a Linen model without ``in_channels`` and no ``variables``.
    """
    if not isinstance(model, (ResNet, NNXResNet)):
        raise TypeError(f"model_config expects a flax_resnet ResNet (Linen or NNX), got {type(model).__name__}")
    in_channels = model.in_channels
    if variables is not None and isinstance(model, ResNet):  # the weights' stem decides (as at apply)
        stem = variables["params"]["conv1"]
        in_channels = int(np.shape((stem["kernel"] if "kernel" in stem else stem["0"]["kernel"]))[2])
    if in_channels is None:
        raise ValueError("model_config: this Linen ResNet takes its input channels from the input; pass its variables")
    spec = model.spec
    layout = model.layout or ("seed" if model.conv_bias and spec.has_seed_layout else "torchvision")
    kw = {name: getattr(model, name) for name in _FIELDS if name not in ("arch", "layout", "in_channels", "dtype", "param_dtype")}
    return ModelConfig(
        spec, layout, in_channels=in_channels, dtype=_dtype_name(model.dtype), param_dtype=_dtype_name(model.param_dtype), **kw
    )
