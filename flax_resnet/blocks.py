"""The Linen ResNet's parts, each written out as torchvision and timm write it.

``BasicBlock`` and ``Bottleneck`` are the residual blocks; ``DeepStem`` is
timm's 3-conv stem (``stem_type="deep"``), ``ConvShortcut``/``AvgDownShortcut``
the projection shortcuts (timm's ``avg_down``), ``ConvPool`` timm's
``replace_stem_pool``. A row of ``flax_resnet.ARCHS`` selects them by name
(``STEMS``, ``SHORTCUTS``, ``ATTENTION``, ``BLOCKS``). Module names are torch's,
so every parameter path is the torch key (``layer1/0/downsample/0/kernel`` is
``layer1.0.downsample.0.weight``).

Every ReLU goes through ``layers.relu``, which records the sign of its input when
the ``relu_signs`` collection is mutable (the parity harness matches fp32
ReLU kinks with it; nothing is recorded otherwise).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from flax_resnet.archs import BlockSpec, ConvSpec
from flax_resnet.attention import SqueezeExcite
from flax_resnet.layers import avg_pool_ceil, conv, relu

ModuleDef = Any


def _conv(factory: ModuleDef, features: int, kernel: int, name: str, stride: int = 1, groups: int = 1) -> nn.Module:
    """A torch ``Conv2d(..., kernel, stride, padding=kernel // 2, groups)``."""
    return conv(factory, ConvSpec(0, features, kernel, stride, kernel // 2, groups), name)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: ``conv1`` 3x3 (with the block's stride), ``bn1``, ReLU, ``conv2`` 3x3, ``bn2``, [attention], + shortcut, ReLU."""

    spec: BlockSpec
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.forward(x, train)

    def forward(self, x, train: bool):
        b = self.spec
        y = _conv(self.conv, b.width, 3, "conv1", stride=b.stride)(x)
        y = relu(self, self.norm(name="bn1")(y, train))
        y = _conv(self.conv, b.out_ch, 3, "conv2")(y)
        y = self.norm(name="bn2", scale_init=_last_scale(self.zero_init_residual))(y, train)
        y = _attention(self, y)
        shortcut = SHORTCUTS[b.shortcut](b, self.conv, self.norm, name="downsample")(x, train) if b.project else x
        return relu(self, y + shortcut)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck``: ``conv1`` 1x1, ``conv2`` 3x3 (``groups``), ``conv3`` 1x1 to ``4 * planes``, each with its BN.

    ResNet v1.5 (torchvision's and timm's default) strides in the 3x3
    ``conv2``; v1 (``stride_in_1x1``, the paper and Caffe) in ``conv1``.
    """

    spec: BlockSpec
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.forward(x, train)

    def forward(self, x, train: bool):
        b = self.spec
        s1, s3 = (b.stride, 1) if b.stride_in_1x1 else (1, b.stride)
        y = _conv(self.conv, b.width, 1, "conv1", stride=s1)(x)
        y = relu(self, self.norm(name="bn1")(y, train))
        y = _conv(self.conv, b.width, 3, "conv2", stride=s3, groups=b.groups)(y)
        y = relu(self, self.norm(name="bn2")(y, train))
        y = _conv(self.conv, b.out_ch, 1, "conv3")(y)
        y = self.norm(name="bn3", scale_init=_last_scale(self.zero_init_residual))(y, train)
        y = _attention(self, y)
        shortcut = SHORTCUTS[b.shortcut](b, self.conv, self.norm, name="downsample")(x, train) if b.project else x
        return relu(self, y + shortcut)


def _last_scale(zero: bool):
    return nn.initializers.zeros if zero else nn.initializers.ones


def _attention(block: nn.Module, y: jax.Array) -> jax.Array:
    """The row's attention after the last BN (``se``), or ``y`` as it is."""
    b = block.spec
    if b.attn is None:
        return y
    return ATTENTION[b.attn](b.attn_convs, block.conv, name=b.attn)(y)


class ConvShortcut(nn.Module):
    """torchvision's ``downsample``: ``0`` 1x1 conv with the block's stride, ``1`` BN."""

    spec: BlockSpec
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _conv(self.conv, self.spec.out_ch, 1, "0", stride=self.spec.stride)(x)
        return self.norm(name="1")(x, train)


class AvgDownShortcut(nn.Module):
    """timm's ``downsample_avg``: ``0`` ``AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)`` (identity at stride 1), ``1`` 1x1 conv, ``2`` BN."""

    spec: BlockSpec
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.spec.stride > 1:
            x = avg_pool_ceil(x, self.spec.stride)
        x = _conv(self.conv, self.spec.out_ch, 1, "1")(x)
        return self.norm(name="2")(x, train)


class DeepStem(nn.Module):
    """timm's deep stem (``conv1``): conv ``0``, BN ``1``, ReLU, conv ``3``, BN ``4``, ReLU, conv ``6`` (then the model's ``bn1``)."""

    convs: tuple[ConvSpec, ...]
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        c0, c3, c6 = self.convs
        x = relu(self, self.norm(name="1")(conv(self.conv, c0, "0")(x), train))
        x = relu(self, self.norm(name="4")(conv(self.conv, c3, "3")(x), train))
        return conv(self.conv, c6, "6")(x)


class ConvPool(nn.Module):
    """timm's ``replace_stem_pool`` (``maxpool``): ``0`` 3x3/2 conv, ``1`` BN, ReLU."""

    pool: ConvSpec
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        return relu(self, self.norm(name="1")(conv(self.conv, self.pool, "0")(x), train))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
SHORTCUTS = {"conv": ConvShortcut, "avg_down": AvgDownShortcut}
ATTENTION = {"se": SqueezeExcite}
