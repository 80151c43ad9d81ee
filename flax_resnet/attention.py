"""Channel attention a row of ``ARCHS`` selects (``attn``): timm's squeeze-and-excitation.

``SqueezeExcite`` (Linen) and ``SqueezeExciteNNX`` mirror timm's ``SEModule``
(``timm/layers/squeeze_excite.py``) with its default ReLU and sigmoid gate
and no BatchNorm: ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``, ``fc1`` and
``fc2`` 1x1 convs with bias (torch keys ``se.fc1.weight``/``.bias``,
``se.fc2.weight``/``.bias``). Their shapes come from
``archs.BlockSpec.attn_convs`` (timm's ``rd_ratio`` and ``make_divisible``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.archs import ConvSpec
from flax_resnet.layers import conv, relu


class SqueezeExcite(nn.Module):
    """timm's ``SEModule`` (``se``): ``fc1`` 1x1 conv, ReLU, ``fc2`` 1x1 conv, sigmoid gate on the channels."""

    convs: tuple[ConvSpec, ConvSpec]
    conv: Any  # the model's conv factory; fc1/fc2 always carry a bias

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fc1, fc2 = self.convs
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = relu(self, conv(self.conv, fc1, "fc1", use_bias=True)(s))
        s = conv(self.conv, fc2, "fc2", use_bias=True)(s)
        return x * nn.sigmoid(s)


class SqueezeExciteNNX(nnx.Module):
    """The NNX twin of ``SqueezeExcite`` (attributes ``fc1``, ``fc2``)."""

    def __init__(self, convs: tuple[ConvSpec, ConvSpec], make_conv: Any, rngs: nnx.Rngs):
        fc1, fc2 = convs
        self.fc1 = make_conv(fc1, rngs, use_bias=True)
        self.fc2 = make_conv(fc2, rngs, use_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        return x * nnx.sigmoid(self.fc2(nnx.relu(self.fc1(s))))
