"""One NNX factory per row of ``ARCHS``: ``flax_resnet.nnx.resnet50(rngs=...)``, ..."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from flax_resnet import archs
from flax_resnet.archs import ARCHS
from flax_resnet.nnx.model import ResNet

Dtype = Any

_FACTORY_DOC = (
    "Flax NNX {name} ({spec.source}; stem {spec.stem}, shortcut {spec.shortcut}), in train mode.\n\n"
    "Args:\n"
    "    num_classes: outputs of the classifier.\n"
    "    rngs: ``nnx.Rngs`` for the initializers (default ``nnx.Rngs(0)``).\n"
    "    in_channels: input channels.\n"
    "    conv_bias: convs with bias (the seed layout of resnet50/101/152).\n"
    "    dtype: compute dtype (``None``: follow the inputs; ``jnp.bfloat16``: mixed precision).\n"
    "    param_dtype: dtype of parameters and BatchNorm statistics.\n"
    "    **kwargs: any other ``ResNet`` argument (``scan_blocks``, ``remat``, ``axis_name``, ...).\n"
)


def _factory(name: str):
    def make(
        num_classes: int = 1000,
        *,
        rngs: nnx.Rngs | None = None,
        in_channels: int = 3,
        conv_bias: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        **kwargs: Any,
    ) -> ResNet:
        return ResNet(
            name, num_classes, in_channels, conv_bias=conv_bias, dtype=dtype, param_dtype=param_dtype,
            rngs=nnx.Rngs(0) if rngs is None else rngs, **kwargs,
        )

    return archs.named_factory(make, name, _FACTORY_DOC)


globals().update({name: _factory(name) for name in ARCHS})
__all__ = list(ARCHS)
