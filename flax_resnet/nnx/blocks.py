"""The NNX ResNet's parts, written out as torchvision and timm write them.

The twins of ``flax_resnet.blocks`` with torch's attribute names:
``BasicBlock``/``Bottleneck`` (``conv1``, ``bn1``, ..., ``se``,
``downsample``), timm's deep stem and ``avg_down`` shortcut and
``replace_stem_pool`` as ``nnx.List`` (torch's ``Sequential`` indices), so
``nnx.state(model)`` paths are the Linen variable paths. A row of ``ARCHS``
selects them (``BLOCKS``, ``SHORTCUTS``, ``STEMS``, ``ATTENTION``).
Convolutions run ``flax_resnet.kernels``, as the Linen model does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet import kernels
from flax_resnet.archs import ArchSpec, BlockSpec, ConvSpec, stem_convs, stem_pool_conv
from flax_resnet.attention import SqueezeExciteNNX
from flax_resnet.layers import avg_pool_ceil, batch_norm

Dtype = Any

# The Linen model's initializers (torchvision's kaiming normal, fan_out, for convs).
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nnx.Module):
    """``torch.nn.BatchNorm2d`` over the last (channel) axis, NHWC.

    The NNX twin of ``flax_resnet.layers.BatchNorm`` (same function,
    ``flax_resnet.layers.batch_norm``): unbiased running-variance
    update, statistics in at least float32 under bfloat16 compute. In train
    mode (``use_running_average=False``, set by ``model.train()``) each call
    normalizes with batch statistics and updates ``mean``/``var`` in place.

    Attributes:
        scale, bias: ``nnx.Param`` (torch's ``weight``/``bias``).
        mean, var: ``nnx.BatchStat`` (torch's ``running_mean``/``running_var``).
        use_running_average: eval mode.
        momentum: Flax convention; 0.9 equals torch's momentum 0.1.
        epsilon: torch's ``eps``.
        dtype: output dtype; ``None`` promotes the input with the params.
        axis_name: average batch statistics over this mapped axis.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        axis_name: str | None = None,
        zero_scale: bool = False,
    ):
        self.scale = nnx.Param((jnp.zeros if zero_scale else jnp.ones)((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))
        self.use_running_average = use_running_average
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.axis_name = axis_name

    def set_view(self, use_running_average: bool | None = None):
        """For ``nnx.view(model, use_running_average=...)``: an eval (or train) view sharing the variables."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        train = not self.use_running_average
        y, stats = batch_norm(
            x, self.scale[...], self.bias[...], self.mean[...], self.var[...], train=train,
            momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name, dtype=self.dtype,
        )
        if stats is not None:
            self.mean[...], self.var[...] = stats
        return y


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What every layer of one ResNet shares (static)."""

    conv_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    in_loop: bool = False  # inside nnx.scan: the loop form of the CPU kernels

    def conv(self, c: ConvSpec, rngs: nnx.Rngs, use_bias: bool | None = None) -> nnx.Conv:
        # Explicit symmetric padding as in torch (and the Linen model).
        return nnx.Conv(
            c.in_ch,
            c.out_ch,
            (c.kernel, c.kernel),
            strides=(c.stride, c.stride),
            padding=((c.padding, c.padding), (c.padding, c.padding)),
            feature_group_count=c.groups,
            use_bias=self.conv_bias if use_bias is None else use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=_conv_init,
            conv_general_dilated=_loop_conv if self.in_loop else _conv,
            rngs=rngs,
        )

    def bn(self, features: int, zero_scale: bool = False) -> BatchNorm:
        return BatchNorm(
            features, momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype,
            param_dtype=self.param_dtype, axis_name=self.axis_name, zero_scale=zero_scale,
        )


def _conv(*args, out_sharding=None, **kwargs):
    # nnx.Conv always passes out_sharding (None by default), which the kernels
    # take for an unknown option and answer with the plain conv: drop it when unset.
    if out_sharding is not None:
        kwargs["out_sharding"] = out_sharding
    return kernels.conv_general_dilated(*args, **kwargs)


def _loop_conv(*args, out_sharding=None, **kwargs):
    if out_sharding is not None:
        kwargs["out_sharding"] = out_sharding
    return kernels.loop_conv_general_dilated(*args, **kwargs)


class AvgDown(nnx.Module):
    """The pooling of an ``avg_down`` shortcut (``downsample[0]``): torch's ``AvgPool2d(2, stride, ceil_mode=True)``."""

    def __init__(self, stride: int):
        self.stride = stride

    def __call__(self, x: jax.Array) -> jax.Array:
        return avg_pool_ceil(x, self.stride) if self.stride > 1 else x


def _spec(c_in: int, out: int, kernel: int, stride: int = 1, groups: int = 1) -> ConvSpec:
    """A torch ``Conv2d(c_in, out, kernel, stride, padding=kernel // 2, groups)``."""
    return ConvSpec(c_in, out, kernel, stride, kernel // 2, groups)


def _attention(b: BlockSpec, s: _Settings, rngs: nnx.Rngs):
    return ATTENTION[b.attn](b.attn_convs, s.conv, rngs) if b.attn is not None else None


def _run(layers, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


class BasicBlock(nnx.Module):
    """torchvision's ``BasicBlock``: ``conv1`` 3x3 (with the block's stride), ``bn1``, ReLU, ``conv2`` 3x3, ``bn2``, [``se``], + ``downsample``, ReLU."""

    def __init__(self, b: BlockSpec, s: _Settings, *, zero_init_residual: bool = False, rngs: nnx.Rngs):
        self.conv1 = s.conv(_spec(b.in_ch, b.width, 3, b.stride), rngs)
        self.bn1 = s.bn(b.width)
        self.conv2 = s.conv(_spec(b.width, b.out_ch, 3), rngs)
        self.bn2 = s.bn(b.out_ch, zero_scale=zero_init_residual)
        self.se = _attention(b, s, rngs)
        self.downsample = SHORTCUTS[b.shortcut](b, s, rngs) if b.project else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.se is not None:
            y = self.se(y)
        return nnx.relu(y + (x if self.downsample is None else _run(self.downsample, x)))


class Bottleneck(nnx.Module):
    """torchvision's ``Bottleneck``: ``conv1`` 1x1, ``conv2`` 3x3 (``groups``), ``conv3`` 1x1 to ``4 * planes``, each with its BN.

    ResNet v1.5 strides in the 3x3 ``conv2``; v1 (``stride_in_1x1``) in ``conv1``.
    """

    def __init__(self, b: BlockSpec, s: _Settings, *, zero_init_residual: bool = False, rngs: nnx.Rngs):
        s1, s3 = (b.stride, 1) if b.stride_in_1x1 else (1, b.stride)
        self.conv1 = s.conv(_spec(b.in_ch, b.width, 1, s1), rngs)
        self.bn1 = s.bn(b.width)
        self.conv2 = s.conv(_spec(b.width, b.width, 3, s3, b.groups), rngs)
        self.bn2 = s.bn(b.width)
        self.conv3 = s.conv(_spec(b.width, b.out_ch, 1), rngs)
        self.bn3 = s.bn(b.out_ch, zero_scale=zero_init_residual)
        self.se = _attention(b, s, rngs)
        self.downsample = SHORTCUTS[b.shortcut](b, s, rngs) if b.project else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.se is not None:
            y = self.se(y)
        return nnx.relu(y + (x if self.downsample is None else _run(self.downsample, x)))


def conv_shortcut(b: BlockSpec, s: _Settings, rngs: nnx.Rngs) -> nnx.List:
    """torchvision's ``downsample``: ``[0]`` 1x1 conv with the block's stride, ``[1]`` BN."""
    return nnx.List([s.conv(_spec(b.in_ch, b.out_ch, 1, b.stride), rngs), s.bn(b.out_ch)])


def avg_down_shortcut(b: BlockSpec, s: _Settings, rngs: nnx.Rngs) -> nnx.List:
    """timm's ``downsample_avg``: ``[0]`` 2x2 avg-pool with the stride (ceil mode), ``[1]`` 1x1 conv, ``[2]`` BN."""
    return nnx.List([AvgDown(b.stride), s.conv(_spec(b.in_ch, b.out_ch, 1), rngs), s.bn(b.out_ch)])


def deep_stem(spec: ArchSpec, in_channels: int, s: _Settings, rngs: nnx.Rngs) -> nnx.List:
    """timm's deep stem (``conv1``): conv, BN, ReLU, conv, BN, ReLU, conv, as torch's Sequential."""
    c0, c3, c6 = stem_convs(spec, in_channels)
    return nnx.List([s.conv(c0, rngs), s.bn(c0.out_ch), nnx.relu, s.conv(c3, rngs), s.bn(c3.out_ch), nnx.relu, s.conv(c6, rngs)])


def conv7x7_stem(spec: ArchSpec, in_channels: int, s: _Settings, rngs: nnx.Rngs) -> nnx.Conv:
    """torchvision's ``conv1``: one 7x7/2 conv."""
    (c,) = stem_convs(spec, in_channels)
    return s.conv(c, rngs)


def conv_pool(spec: ArchSpec, s: _Settings, rngs: nnx.Rngs) -> nnx.List:
    """timm's ``replace_stem_pool`` (``maxpool``): 3x3/2 conv, BN, ReLU."""
    c = stem_pool_conv(spec)
    return nnx.List([s.conv(c, rngs), s.bn(c.out_ch), nnx.relu])


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
SHORTCUTS = {"conv": conv_shortcut, "avg_down": avg_down_shortcut}
STEMS = {"7x7": conv7x7_stem, "deep": deep_stem, "deep_tiered": deep_stem}
ATTENTION = {"se": SqueezeExciteNNX}
