"""One Linen factory per row of ``ARCHS``: ``flax_resnet.resnet50()``, ``flax_resnet.seresnext50_32x4d()``, ..."""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from flax_resnet import archs
from flax_resnet.archs import ARCHS
from flax_resnet.model import ResNet

Dtype = Any

_FACTORY_DOC = (
    "Flax {name} ({spec.source}: stem {spec.stem}, shortcut {spec.shortcut}): ``ResNet(arch={name!r}, ...)``.\n\n"
    "Args:\n    num_classes: outputs of ``fc``.\n    conv_bias: convs with bias (the seed layout).\n"
    "    dtype: compute dtype (``None`` follows the inputs).\n    param_dtype: dtype of params and BN statistics.\n"
    "    **kwargs: any other ``ResNet`` attribute (``in_channels``, ``features_only``, ``out_indices``, ...).\n"
)


def _factory(name: str) -> Callable[..., ResNet]:
    def make(
        num_classes: int = 1000, conv_bias: bool = False, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, **kwargs: Any
    ) -> ResNet:
        return ResNet(arch=name, num_classes=num_classes, conv_bias=conv_bias, dtype=dtype, param_dtype=param_dtype, **kwargs)

    return archs.named_factory(make, name, _FACTORY_DOC)


globals().update({name: _factory(name) for name in ARCHS})
__all__ = list(ARCHS)
