"""Flax NNX ResNets with torch's attribute names, built from ``flax_resnet.archs``.

``model.conv1``, ``model.bn1``, ``model.layer1[0].conv2``,
``model.layer1[0].downsample[0]``, ``model.fc`` (timm's deep stems:
``model.conv1[0]``..``[6]``; ``avg_down`` shortcuts: ``downsample[0]`` is the
pooling). The state paths are the Linen variable paths (``nnx.state(model)``
is the Linen tree with the ``params``/``batch_stats`` split moved to the
leaves), so conversion is a relabeling. Convolutions run
``flax_resnet.kernels``, as the Linen model does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet import archs, kernels
from flax_resnet.archs import ArchSpec, BlockSpec, ConvSpec, get_arch, stem_convs
from flax_resnet.config import ModelConfig
from flax_resnet.layers import avg_pool_ceil
from flax_resnet.layers import batch_norm
from flax_resnet.settings import model_kwargs

Dtype = Any

# The Linen model's initializers (torchvision's kaiming normal, fan_out, for convs).
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_fc_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


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

    def conv(self, c: ConvSpec, rngs: nnx.Rngs) -> nnx.Conv:
        # Explicit symmetric padding as in torch (and the Linen model).
        return nnx.Conv(
            c.in_ch,
            c.out_ch,
            (c.kernel, c.kernel),
            strides=(c.stride, c.stride),
            padding=((c.padding, c.padding), (c.padding, c.padding)),
            feature_group_count=c.groups,
            use_bias=self.conv_bias,
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


def _shortcut(b: BlockSpec, s: _Settings, rngs: nnx.Rngs) -> nnx.List | None:
    """torch's ``downsample`` Sequential: [conv, bn], or [pool, conv, bn] for ``avg_down``."""
    if b.downsample is None:
        return None
    layers = [s.conv(b.downsample, rngs), s.bn(b.downsample.out_ch)]
    return nnx.List(([AvgDown(b.stride)] if b.shortcut == "avg_down" else []) + layers)


def _stem(spec: ArchSpec, in_channels: int, s: _Settings, rngs: nnx.Rngs) -> nnx.Conv | nnx.List:
    """``conv1``: the 7x7 conv, or timm's deep stem as torch's Sequential (ReLUs at 2 and 5)."""
    convs = stem_convs(spec, in_channels)
    if len(convs) == 1:
        return s.conv(convs[0], rngs)
    layers: list[Any] = []
    for i, c in enumerate(convs):
        layers.append(s.conv(c, rngs))
        if i < len(convs) - 1:
            layers += [s.bn(c.out_ch), nnx.relu]
    return nnx.List(layers)


class Block(nnx.Module):
    """A basic (2 convs) or bottleneck (3 convs) residual block: ``conv{i}``, ``bn{i}``, ``downsample``."""

    def __init__(self, spec: BlockSpec, settings: _Settings, *, zero_init_residual: bool = False, rngs: nnx.Rngs):
        self.n = len(spec.convs)
        for i, c in enumerate(spec.convs, start=1):
            setattr(self, f"conv{i}", settings.conv(c, rngs))
            setattr(self, f"bn{i}", settings.bn(c.out_ch, zero_scale=zero_init_residual and i == self.n))
        self.downsample = _shortcut(spec, settings, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        for i in range(1, self.n + 1):
            x = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x))
            if i < self.n:
                x = nnx.relu(x)
        if self.downsample is not None:
            for layer in self.downsample:
                residual = layer(residual)
        return nnx.relu(x + residual)


def _call_block(block: Block, x: jax.Array) -> jax.Array:
    return block(x)


class ScannedStage(nnx.Module):
    """``layerN`` with blocks ``1..n-1`` stacked and run by one ``nnx.scan``.

    Block ``0`` (which may stride and project) is the attribute ``"0"``;
    the stacked blocks are ``rest`` (every leaf with a leading axis of
    ``n - 1``): the paths of Linen's ``ResNet(scan_blocks=True)``.
    ``stage[0]`` is block 0, ``stage[i]`` for ``i >= 1`` the stacked module.
    """

    def __init__(self, specs: tuple[BlockSpec, ...], settings: _Settings, *, zero_init_residual: bool, remat: bool, rngs: nnx.Rngs):
        setattr(self, "0", Block(specs[0], settings, zero_init_residual=zero_init_residual, rngs=rngs))
        inner = dataclasses.replace(settings, in_loop=True)
        spec = specs[1]

        @nnx.split_rngs(splits=len(specs) - 1)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> Block:
            return Block(spec, inner, zero_init_residual=zero_init_residual, rngs=rngs)

        self.rest = make(rngs)
        self.size = len(specs)
        self.remat = remat

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Block:
        if not -self.size <= i < self.size:
            raise IndexError(f"block {i} of a stage of {self.size}")
        return getattr(self, "0") if i in (0, -self.size) else self.rest

    def run(self, x: jax.Array, emit: bool) -> tuple[jax.Array, list[jax.Array]]:
        first = getattr(self, "0")
        y0 = nnx.remat(_call_block)(first, x) if self.remat else first(x)

        def body(block: Block, carry: jax.Array):
            y = block(carry)
            return y, (y if emit else None)

        if self.remat:
            body = nnx.remat(body, prevent_cse=False)
        x, ys = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))(self.rest, y0)
        return x, [y0] + ([ys[i] for i in range(self.size - 1)] if emit else [])


def _run_stage(stage: nnx.List | ScannedStage, x: jax.Array, emit: bool, remat: bool) -> tuple[jax.Array, list[jax.Array]]:
    if isinstance(stage, ScannedStage):
        return stage.run(x, emit)
    outs = []
    call = nnx.remat(_call_block) if remat else _call_block
    for block in stage:
        x = call(block, x)
        outs.append(x)
    return x, outs


class ResNet(nnx.Module):
    """Any row of ``flax_resnet.ARCHS`` (torchvision and timm ResNets) as a Flax NNX module.

    Input is NHWC; logits come back in at least float32. Like torch (and
    ``nnx.BatchNorm``) a new model is in train mode: ``model.eval()`` uses
    the running statistics, ``model.train()`` batch statistics, updating
    the running ones in place; ``nnx.view(model, use_running_average=True)``
    is an eval-mode view sharing the variables.

    Args:
        arch: architecture name (``"resnet50"``, ``"resnet50d"``) or an ``ArchSpec``.
        num_classes: outputs of ``fc``; 0 builds no ``fc`` (a headless
            backbone whose "logits" are the pooled features).
        in_channels: input channels (NNX layers need them up front).
        conv_bias: convs carry a bias (the seed layout).
        stride_in_1x1: ResNet v1 (stride in the first 1x1 conv of a bottleneck).
        zero_init_residual: each block's last BatchNorm scale starts at zero.
        dtype: compute dtype; ``None`` follows inputs and params (float64
            params compute in float64).
        param_dtype: dtype of params and BatchNorm statistics.
        precision: ``jax.lax.Precision`` of convs and ``fc``.
        axis_name: mapped batch axis for global BatchNorm statistics (under
            ``shard_map``/``vmap``; a batch sharded under ``jit`` needs none).
        bn_momentum: Flax convention; 0.9 is torch's momentum 0.1.
        bn_eps: BatchNorm epsilon.
        scan_blocks: each stage's blocks ``1..n-1`` are stacked under
            ``layerN.rest`` and run by one ``nnx.scan`` (compiled once).
        remat: recompute each block's activations in the backward pass
            (``nnx.remat``).
        rngs: ``nnx.Rngs`` for the initializers (``params`` stream).
        layout: the torch key layout the weights came from (see the Linen
            ``ResNet.layout``).

    ``flax_resnet.build(config, api="nnx")`` makes one from a
    ``ModelConfig``; ``flax_resnet.model_config(model)`` gives it back.
    """

    def __init__(
        self,
        arch: str | ArchSpec = "resnet50",
        num_classes: int = 1000,
        in_channels: int = 3,
        *,
        conv_bias: bool = False,
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        axis_name: str | None = None,
        bn_momentum: float = 0.9,
        bn_eps: float = 1e-5,
        scan_blocks: bool = False,
        remat: bool = False,
        rngs: nnx.Rngs,
        layout: str | None = None,
    ):
        spec = get_arch(arch)
        self.arch = spec.name
        self.spec = spec
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.conv_bias = conv_bias
        self.stride_in_1x1 = stride_in_1x1
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.scan_blocks = scan_blocks
        self.remat = remat
        self.zero_init_residual = zero_init_residual
        self.precision = precision
        self.bn_momentum = bn_momentum
        self.bn_eps = bn_eps
        self.layout = layout
        s = _Settings(conv_bias, dtype, param_dtype, precision, axis_name, bn_momentum, bn_eps)
        self.conv1 = _stem(spec, in_channels, s, rngs)
        self.bn1 = s.bn(spec.stem_channels)
        all_blocks = list(archs.blocks(spec, stride_in_1x1))
        for stage in (1, 2, 3, 4):
            specs = tuple(b for b in all_blocks if b.stage == stage)
            if scan_blocks and len(specs) > 1:
                layer = ScannedStage(specs, s, zero_init_residual=zero_init_residual, remat=remat, rngs=rngs)
            else:
                layer = nnx.List([Block(b, s, zero_init_residual=zero_init_residual, rngs=rngs) for b in specs])
            setattr(self, f"layer{stage}", layer)
        self.fc = (
            nnx.Linear(spec.num_features, num_classes, dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=_fc_init, rngs=rngs)
            if num_classes
            else None
        )

    @classmethod
    def from_config(cls, config: ModelConfig, *, rngs: nnx.Rngs | None = None, axis_name: str | None = None) -> "ResNet":
        """The model ``config`` describes (``flax_resnet.build(config, api="nnx")``); ``rngs`` default ``nnx.Rngs(0)``."""
        return cls(**model_kwargs(config), axis_name=axis_name, rngs=nnx.Rngs(0) if rngs is None else rngs)

    def intermediates(self, x: jax.Array, blocks: bool = False) -> dict[str, jax.Array]:
        """Runs the network and returns every parity point in order.

        Args:
            x: NHWC images.
            blocks: also return each block's output (``"layer1.0"``, ...).

        Returns:
            An ordered dict: ``stem`` (after the max-pool), [each block],
            ``layer1``..``layer4``, ``pre_logits`` and ``logits``: the points
            of the Linen ``ResNet.intermediates`` and ``torch_ref``.
        """
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            hint = " (an NCHW batch? use x.transpose(0, 2, 3, 1))" if x.ndim == 4 and x.shape[1] == self.in_channels else ""
            raise ValueError(f"inputs are NHWC: expected {self.in_channels} channels in the last axis, got shape {tuple(x.shape)}{hint}")
        out: dict[str, jax.Array] = {}
        if isinstance(self.conv1, nnx.List):
            for layer in self.conv1:
                x = layer(x)
        else:
            x = self.conv1(x)
        x = nnx.relu(self.bn1(x))
        # torch pads max-pool with -inf; so does reduce_window here.
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        out["stem"] = x
        for i in (1, 2, 3, 4):
            x, outs = _run_stage(getattr(self, f"layer{i}"), x, blocks, self.remat)
            if blocks:
                out.update({f"layer{i}.{j}": y for j, y in enumerate(outs)})
            out[f"layer{i}"] = x
        x = jnp.mean(x, axis=(1, 2))
        out["pre_logits"] = x
        if self.fc is not None:
            x = self.fc(x)
        out["logits"] = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # num_classes=0: the pooled features
        return out

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Backbone features: stem, layer1..4, pre_logits."""
        out = self.intermediates(x)
        return {k: out[k] for k in ("stem", "layer1", "layer2", "layer3", "layer4", "pre_logits")}

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of NHWC images ``x`` (BatchNorm mode from ``train()``/``eval()``)."""
        return self.intermediates(x)["logits"]


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
