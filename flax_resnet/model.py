"""Flax Linen ResNets that mirror torchvision and timm block for block (NHWC).

The blocks, stems and shortcuts are written out in ``flax_resnet.blocks``
(``BasicBlock``, ``Bottleneck``, ``DeepStem``, ``ConvShortcut``,
``AvgDownShortcut``, ``ConvPool``); a row of ``flax_resnet.ARCHS`` selects
them. How a stage's blocks run (unrolled, ``nn.scan``, remat) is
``flax_resnet.scan``; the factories (``resnet50()``, ...) are
``flax_resnet.factories``. Module names are torch's (``conv1`` or
``conv1/0``..``conv1/6``, ``bn1``, ``maxpool/0``, ``layer1/0/conv2``,
``layer1/0/downsample/0``, ``layer1/0/se/fc1``, ``fc``), so the converter is
a walk over names. Convs and norms reach the blocks as ready-made factories
(``conv``, ``norm``: ``functools.partial`` of ``nn.Conv`` and ``BatchNorm``);
the convs use ``flax_resnet.kernels``, which picks the fastest form per
platform.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from flax_resnet import archs, kernels
from flax_resnet.archs import ArchSpec, get_arch, stem_convs, stem_pool_conv
from flax_resnet.blocks import ConvPool, DeepStem
from flax_resnet.layers import BatchNorm, check_nhwc, conv, max_pool, relu
from flax_resnet.scan import Stage
from flax_resnet.config import ModelConfig
from flax_resnet.settings import model_kwargs

Dtype = Any
ModuleDef = Any

# torchvision's init: kaiming normal, fan_out, for every conv.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# timm's feature_info of a ResNet: act1 (stem after its ReLU, stride 2), layer1..layer4 (4..32).
FEATURE_NAMES = ("act1", "layer1", "layer2", "layer3", "layer4")


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
        in_channels: input channels (default 3); ``init`` refuses other inputs
            (an NCHW batch, a missing batch axis) with one line, as ``apply``
            does. ``None`` takes them from the input at ``init``.
        features_only: timm's ``features_only=True``: calling the model
            returns the list of feature maps ``out_indices`` selects from
            ``FEATURE_NAMES`` (``act1``: the stem after its ReLU, before the
            pool, stride 2; ``layer1``..``layer4``: strides 4..32), NHWC;
            there is no ``fc`` and nothing past the last selected stage runs.
        out_indices: indices into ``FEATURE_NAMES`` (timm's default: all five).
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
    in_channels: int | None = 3
    layout: str | None = None
    features_only: bool = False
    out_indices: Sequence[int] = (0, 1, 2, 3, 4)

    @property
    def spec(self) -> ArchSpec:
        return get_arch(self.arch)

    @classmethod
    def from_config(cls, config: ModelConfig, *, axis_name: str | None = None, **backbone: Any) -> "ResNet":
        """The model ``config`` describes (``flax_resnet.build(config)``); ``backbone``: ``features_only``, ``out_indices``."""
        return cls(**model_kwargs(config), axis_name=axis_name, **backbone)

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
        # Applying: the stem kernel's input channels are the truth; initializing: ``in_channels``.
        stem = self.variables.get("params", {}).get("conv1", {})
        kernel = stem["kernel"] if "kernel" in stem else stem.get("0", {}).get("kernel")
        check_nhwc(x, self.in_channels if kernel is None else kernel.shape[2])

    @nn.compact
    def _forward(self, x: jax.Array, train: bool, blocks: bool, last_stage: int = 4) -> dict[str, jax.Array]:
        """Every point in order: ``act1``, ``stem``, [blocks], ``layer1``..``layer{last_stage}``, and (all 4 stages) ``pre_logits``, ``logits``."""
        self._check_input(x)
        spec, conv_def, norm = self.spec, self.conv_def(), self.norm_def()
        stem = stem_convs(spec, x.shape[-1])
        x = conv(conv_def, stem[0], "conv1")(x) if spec.stem == "7x7" else DeepStem(stem, conv_def, norm, name="conv1")(x, train)
        x = relu(self, norm(name="bn1")(x, train))
        out: dict[str, jax.Array] = {"act1": x}
        if spec.stem_pool == "conv":
            x = ConvPool(stem_pool_conv(spec), conv_def, norm, name="maxpool")(x, train)
        else:
            x = max_pool(self, x)
        out["stem"] = x
        all_blocks = list(archs.blocks(spec, self.stride_in_1x1))
        for s in range(1, last_stage + 1):
            specs = tuple(b for b in all_blocks if b.stage == s)
            stage = Stage(specs, conv_def, norm, self.zero_init_residual, self.scan_blocks, self.remat, name=f"layer{s}")
            x, block_outs = stage(x, train, blocks)
            if blocks:
                out.update({f"layer{s}.{j}": y for j, y in enumerate(block_outs)})
            out[f"layer{s}"] = x
        if last_stage < 4:
            return out
        x = jnp.mean(x, axis=(1, 2))
        out["pre_logits"] = x
        if self.num_classes and not self.features_only:
            init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
            x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, kernel_init=init, name="fc")(x)
        out["logits"] = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # num_classes=0: the pooled features
        return out

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
        out = self._forward(x, train, blocks)
        del out["act1"]
        return out

    def features(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Backbone features for detection/segmentation: stem, layer1..4, pre_logits."""
        out = self.intermediates(x, train)
        return {k: out[k] for k in ("stem", "layer1", "layer2", "layer3", "layer4", "pre_logits")}

    def feature_maps(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """timm's ``features_only`` output: the maps ``out_indices`` selects from ``FEATURE_NAMES``."""
        check_out_indices(tuple(self.out_indices))
        names = [FEATURE_NAMES[i] for i in self.out_indices]
        out = self._forward(x, train, False, last_stage=max(int(n[-1]) if n != "act1" else 0 for n in names))
        return [out[n] for n in names]

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits of NHWC images ``x`` (``features_only``: the list of feature maps); ``train=True`` uses and updates batch statistics."""
        if self.features_only:
            return self.feature_maps(x, train)
        return self.intermediates(x, train)["logits"]


def check_out_indices(out_indices: tuple) -> None:
    """Raises a one-line ValueError unless ``out_indices`` are distinct indices into ``FEATURE_NAMES``."""
    ok = out_indices and len(set(out_indices)) == len(out_indices)
    if not ok or any(not isinstance(i, int) or not 0 <= i < len(FEATURE_NAMES) for i in out_indices):
        raise ValueError(f"out_indices {out_indices!r}: choose distinct indices from 0..{len(FEATURE_NAMES) - 1} ({', '.join(FEATURE_NAMES)})")
