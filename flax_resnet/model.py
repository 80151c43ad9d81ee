"""Flax Linen ResNets that mirror ``torch_ref`` block for block (NHWC).

Every shape and name comes from ``flax_resnet.archs``; module names are
torch's (``conv1`` or ``conv1/0``..``conv1/6``, ``bn1``, ``layer1/0/conv2``,
``layer1/0/downsample/0``, ``fc``), so the converter is a walk over names.
Convs and norms reach the blocks as ready-made factories (``conv``,
``norm``: ``functools.partial`` of ``nn.Conv`` and ``BatchNorm``); the convs
use ``flax_resnet.kernels``, which picks the fastest form per platform.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from flax_resnet import archs, kernels
from flax_resnet.archs import ARCHS, ArchSpec, BlockSpec, ConvSpec, get_arch, stem_convs
from flax_resnet.config import ModelConfig
from flax_resnet.layers import BatchNorm, avg_pool_ceil
from flax_resnet.settings import model_kwargs

Dtype = Any
ModuleDef = Any

# torchvision's init: kaiming normal, fan_out, for every conv.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(conv: ModuleDef, c: ConvSpec, name: str) -> nn.Module:
    # Explicit symmetric padding as in torch; 'SAME' would pad (0, 1) at stride 2.
    pad = ((c.padding, c.padding), (c.padding, c.padding))
    return conv(c.out_ch, (c.kernel, c.kernel), strides=(c.stride, c.stride), padding=pad, feature_group_count=c.groups, name=name)


class DeepStem(nn.Module):
    """timm's deep stem (``conv1``): conv ``0``, BN ``1``, conv ``3``, BN ``4``, conv ``6`` (ReLUs at 2, 5)."""

    convs: tuple[ConvSpec, ...]
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, c in enumerate(self.convs):
            x = _conv(self.conv, c, str(3 * i))(x)
            if i < len(self.convs) - 1:
                x = nn.relu(self.norm(name=str(3 * i + 1))(x, train))
        return x


class Shortcut(nn.Module):
    """The projection shortcut (``downsample``): conv ``0`` + BN ``1``; or avg-pool ``0``, conv ``1``, BN ``2``."""

    spec: BlockSpec
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        ci, bi = self.spec.shortcut_indices
        if self.spec.shortcut == "avg_down" and self.spec.stride > 1:
            x = avg_pool_ceil(x, self.spec.stride)
        x = _conv(self.conv, self.spec.downsample, str(ci))(x)
        return self.norm(name=str(bi))(x, train)


class Block(nn.Module):
    """A basic (2 convs) or bottleneck (3 convs) residual block."""

    spec: BlockSpec
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self._forward(x, train)

    def _forward(self, x, train: bool):
        residual = x
        n = len(self.spec.convs)
        for i, c in enumerate(self.spec.convs, start=1):
            x = _conv(self.conv, c, f"conv{i}")(x)
            zero = self.zero_init_residual and i == n
            x = self.norm(name=f"bn{i}", scale_init=nn.initializers.zeros if zero else nn.initializers.ones)(x, train)
            if i < n:
                x = nn.relu(x)
        if self.spec.downsample is not None:
            residual = Shortcut(self.spec, self.conv, self.norm, name="downsample")(residual, train)
        return nn.relu(x + residual)


class _ScanBody(Block):
    """A block as the body of ``nn.scan``: ``x -> (x, per-block output or None)``.

    ``train`` is an attribute so that the scan broadcasts no Python values;
    ``emit`` stacks each block's output (for ``intermediates(blocks=True)``).
    """

    train: bool = False
    emit: bool = False

    @nn.compact
    def __call__(self, x):  # type: ignore[override]
        y = self._forward(x, self.train)
        return y, (y if self.emit else None)


class Stage(nn.Module):
    """``layerN``: its blocks, named ``0``, ``1``, ... as in torch.

    With ``scan_blocks``, blocks ``1..n-1`` (identical in shape: stride 1,
    no projection) run as one ``nn.scan`` named ``rest`` whose variables
    carry a leading axis of length ``n - 1``: XLA compiles one block body
    per stage. ``remat`` recomputes each block in the backward pass.
    """

    specs: tuple[BlockSpec, ...]
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool = False
    scan_blocks: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, emit: bool = True):
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        specs = self.specs if not self.scan_blocks else self.specs[:1]
        outs = []
        for b in specs:
            x = block(b, self.conv, self.norm, self.zero_init_residual, name=str(b.index))(x, train)
            outs.append(x)
        rest = self.specs[len(specs) :]
        if rest:
            body = nn.remat(_ScanBody, prevent_cse=False) if self.remat else _ScanBody
            scan = nn.scan(body, variable_axes={"params": 0, "batch_stats": 0, "intermediates": 0}, split_rngs={"params": True}, length=len(rest))
            loop_conv = functools.partial(self.conv, conv_general_dilated=kernels.loop_conv_general_dilated)
            body_kw = dict(conv=loop_conv, norm=self.norm, zero_init_residual=self.zero_init_residual, train=train, emit=emit)
            x, ys = scan(rest[0], name="rest", **body_kw)(x)
            outs += [ys[i] for i in range(len(rest))] if emit else []
        return x, outs


class ResNet(nn.Module):
    """Any row of ``flax_resnet.ARCHS`` (torchvision and timm ResNets), NHWC in, logits out.

    Attributes:
        arch: architecture name (``"resnet50"``, ``"resnet50d"``) or an ``ArchSpec``.
        num_classes: outputs of ``fc``; 0 builds no ``fc`` (a headless
            backbone whose output is the pooled features, as timm's).
        conv_bias: convs carry a bias (the seed layout) or not (torchvision).
        stride_in_1x1: ResNet v1 (stride in the first 1x1 conv of a
            bottleneck) instead of v1.5 (stride in the 3x3 conv).
        zero_init_residual: initialize each block's last BN scale to zero.
        dtype: compute dtype (e.g. ``jnp.bfloat16``); ``None`` follows the
            inputs and params, so float64 variables compute in float64.
            Logits come back in at least float32.
        param_dtype: dtype of freshly initialized params and BN stats.
        precision: ``jax.lax.Precision`` for convs and ``fc`` (``"highest"``
            disables TF32 on GPUs).
        axis_name: mapped/sharded batch axis for global BN statistics.
        bn_momentum: Flax convention; 0.9 equals torch's momentum 0.1.
        bn_eps: BatchNorm epsilon, torch's 1e-5.
        scan_blocks: compile each stage's repeated blocks once (``nn.scan``):
            blocks ``1..n-1`` of ``layerN`` live under ``layerN/rest/block``
            with a leading axis of length ``n - 1`` (``convert.stack_blocks``
            / ``unstack_blocks`` convert between the two trees).
        remat: rematerialize each block in the backward pass (``nn.remat``).
        in_channels: input channels; ``None`` takes them from the input at
            ``init`` (a set value refuses other inputs).
        layout: the torch key layout the weights came from and export to by
            default (``"torchvision"``, ``"seed"``, ``"transformers"``);
            ``None``: seed for a seed-layout row with ``conv_bias``, else torchvision.

    ``flax_resnet.build(config)`` makes one from a ``ModelConfig``;
    ``flax_resnet.model_config(model)`` gives it back.
    """

    arch: str | ArchSpec = "resnet50"
    num_classes: int = 1000
    conv_bias: bool = False
    stride_in_1x1: bool = False
    zero_init_residual: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    scan_blocks: bool = False
    remat: bool = False
    in_channels: int | None = None
    layout: str | None = None

    @property
    def spec(self) -> ArchSpec:
        return get_arch(self.arch)

    @classmethod
    def from_config(cls, config: ModelConfig, *, axis_name: str | None = None) -> "ResNet":
        """The model ``config`` describes (``flax_resnet.build(config)``)."""
        return cls(**model_kwargs(config), axis_name=axis_name)

    def conv_def(self) -> ModuleDef:
        """The conv factory every layer uses."""
        return functools.partial(
            nn.Conv, use_bias=self.conv_bias, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            kernel_init=_conv_init, conv_general_dilated=kernels.conv_general_dilated,
        )

    def norm_def(self) -> ModuleDef:
        """The BatchNorm factory every layer uses."""
        return functools.partial(
            BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name
        )

    def _check_input(self, x: jax.Array) -> None:
        stem = self.variables.get("params", {}).get("conv1", {})
        kernel = stem["kernel"] if "kernel" in stem else stem.get("0", {}).get("kernel")
        want = self.in_channels if kernel is None else kernel.shape[2]
        if x.ndim != 4 or (want is not None and x.shape[-1] != want):
            hint = " (an NCHW batch? use x.transpose(0, 2, 3, 1))" if x.ndim == 4 and x.shape[1] == want else ""
            raise ValueError(f"inputs are NHWC: expected {want or 'C'} channels in the last axis, got shape {tuple(x.shape)}{hint}")

    @nn.compact
    def intermediates(self, x: jax.Array, train: bool = False, blocks: bool = False) -> dict[str, jax.Array]:
        """Runs the network and returns every parity point in order.

        Args:
            x: NHWC images.
            train: BatchNorm uses batch statistics and updates ``batch_stats``
                (apply with ``mutable=["batch_stats"]``).
            blocks: also return each block's output (``"layer1.0"``, ...).

        Returns:
            An ordered dict: ``stem`` (after the max-pool), [each block],
            ``layer1``..``layer4``, ``pre_logits`` (pooled features) and
            ``logits``, the same points as ``torch_ref``'s
            ``forward_intermediates``.

        Raises:
            ValueError: ``x`` is not a 4-d NHWC batch with the stem's channels.
        """
        self._check_input(x)
        spec, conv, norm = self.spec, self.conv_def(), self.norm_def()
        stem = stem_convs(spec, x.shape[-1])
        if spec.stem == "7x7":
            x = _conv(conv, stem[0], "conv1")(x)
        else:
            x = DeepStem(stem, conv, norm, name="conv1")(x, train)
        x = nn.relu(norm(name="bn1")(x, train))
        # torch pads max-pool with -inf; so does reduce_window here.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        out: dict[str, jax.Array] = {"stem": x}
        all_blocks = list(archs.blocks(spec, self.stride_in_1x1))
        for s in (1, 2, 3, 4):
            specs = tuple(b for b in all_blocks if b.stage == s)
            stage = Stage(specs, conv, norm, self.zero_init_residual, self.scan_blocks, self.remat, name=f"layer{s}")
            x, block_outs = stage(x, train, blocks)
            if blocks:
                out.update({f"layer{s}.{j}": y for j, y in enumerate(block_outs)})
            out[f"layer{s}"] = x
        x = jnp.mean(x, axis=(1, 2))
        out["pre_logits"] = x
        if self.num_classes:
            init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
            x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, kernel_init=init, name="fc")(x)
        out["logits"] = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # num_classes=0: the pooled features
        return out

    def features(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Backbone features for detection/segmentation: stem, layer1..4, pre_logits."""
        out = self.intermediates(x, train)
        return {k: out[k] for k in ("stem", "layer1", "layer2", "layer3", "layer4", "pre_logits")}

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits of NHWC images ``x``; ``train=True`` uses and updates batch statistics."""
        return self.intermediates(x, train)["logits"]


_FACTORY_DOC = (
    "Flax {name} ({spec.source}: stem {spec.stem}, shortcut {spec.shortcut}): ``ResNet(arch={name!r}, ...)``.\n\n"
    "Args:\n    num_classes: outputs of ``fc``.\n    conv_bias: convs with bias (the seed layout).\n"
    "    dtype: compute dtype (``None`` follows the inputs).\n    param_dtype: dtype of params and BN statistics.\n"
    "    **kwargs: any other ``ResNet`` attribute.\n"
)


def _factory(name: str) -> Callable[..., ResNet]:
    def make(
        num_classes: int = 1000, conv_bias: bool = False, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, **kwargs: Any
    ) -> ResNet:
        return ResNet(arch=name, num_classes=num_classes, conv_bias=conv_bias, dtype=dtype, param_dtype=param_dtype, **kwargs)

    return archs.named_factory(make, name, _FACTORY_DOC)


# One factory per architecture: flax_resnet.resnet50(), flax_resnet.resnet50d(), ...
globals().update({name: _factory(name) for name in ARCHS})
