"""Flax NNX ResNets with torch's attribute names, built from ``flax_resnet.archs``.

``model.conv1``, ``model.bn1``, ``model.layer1[0].conv2``,
``model.layer1[0].downsample[0]``, ``model.fc`` (timm's deep stems:
``model.conv1[0]``..``[6]``; ``avg_down`` shortcuts: ``downsample[0]`` is the
pooling; SE: ``layer1[0].se.fc1``; ResNet-RS: ``model.maxpool[0]``). The
blocks, stems and shortcuts are written out in ``flax_resnet.nnx.blocks``,
scanning in ``flax_resnet.nnx.scan``. The state paths are the Linen variable
paths (``nnx.state(model)`` is the Linen tree with the
``params``/``batch_stats`` split moved to the leaves), so conversion is a
relabeling.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet import archs
from flax_resnet.archs import ArchSpec, get_arch
from flax_resnet.layers import check_nhwc
from flax_resnet.model import FEATURE_NAMES, check_out_indices
from flax_resnet.nnx.blocks import BLOCKS, STEMS, BatchNorm, _Settings, conv_pool
from flax_resnet.nnx.scan import ScannedStage, run_stage
from flax_resnet.config import ModelConfig
from flax_resnet.settings import model_kwargs

Dtype = Any
_fc_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
__all__ = ["BatchNorm", "ResNet", "ScannedStage", "_Settings"]


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
        features_only: timm's ``features_only=True``: calling the model
            returns the feature maps ``out_indices`` selects from
            ``FEATURE_NAMES`` (``act1``, ``layer1``..``layer4``); no ``fc``,
            and no stage past the last selected one.
        out_indices: indices into ``FEATURE_NAMES`` (default: all five).
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
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
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
        self.features_only = features_only
        self.out_indices = tuple(out_indices)
        check_out_indices(self.out_indices)
        last = _last_stage(self.out_indices) if features_only else 4
        self.conv1 = STEMS[spec.stem](spec, in_channels, s, rngs)
        self.bn1 = s.bn(spec.stem_channels)
        self.maxpool = conv_pool(spec, s, rngs) if spec.stem_pool == "conv" else None
        all_blocks = list(archs.blocks(spec, stride_in_1x1))
        for stage in range(1, last + 1):
            specs = tuple(b for b in all_blocks if b.stage == stage)
            block = BLOCKS[spec.block]
            if scan_blocks and len(specs) > 1:
                layer = ScannedStage(specs, s, zero_init_residual=zero_init_residual, remat=remat, rngs=rngs)
            else:
                layer = nnx.List([block(b, s, zero_init_residual=zero_init_residual, rngs=rngs) for b in specs])
            setattr(self, f"layer{stage}", layer)
        self.fc = (
            nnx.Linear(spec.num_features, num_classes, dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=_fc_init, rngs=rngs)
            if num_classes and not features_only
            else None
        )

    @classmethod
    def from_config(cls, config: ModelConfig, *, rngs: nnx.Rngs | None = None, axis_name: str | None = None, **backbone: Any) -> "ResNet":
        """The model ``config`` describes (``flax_resnet.build(config, api="nnx")``); ``rngs`` default ``nnx.Rngs(0)``; ``backbone``: ``features_only``, ``out_indices``."""
        return cls(**model_kwargs(config), axis_name=axis_name, rngs=nnx.Rngs(0) if rngs is None else rngs, **backbone)

    def _forward(self, x: jax.Array, blocks: bool, last_stage: int = 4) -> dict[str, jax.Array]:
        """Every point in order: ``act1``, ``stem``, [blocks], ``layer1``..``layer{last_stage}``, then (all 4 stages) ``pre_logits``, ``logits``."""
        check_nhwc(x, self.in_channels)
        x = self.conv1(x) if isinstance(self.conv1, nnx.Conv) else _run(self.conv1, x)
        x = nnx.relu(self.bn1(x))
        out: dict[str, jax.Array] = {"act1": x}
        if self.maxpool is not None:
            x = _run(self.maxpool, x)
        else:  # torch pads max-pool with -inf; so does reduce_window here.
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        out["stem"] = x
        for i in range(1, last_stage + 1):
            x, outs = run_stage(getattr(self, f"layer{i}"), x, blocks, self.remat)
            if blocks:
                out.update({f"layer{i}.{j}": y for j, y in enumerate(outs)})
            out[f"layer{i}"] = x
        if last_stage < 4:
            return out
        x = jnp.mean(x, axis=(1, 2))
        out["pre_logits"] = x
        if self.fc is not None:
            x = self.fc(x)
        out["logits"] = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # num_classes=0: the pooled features
        return out

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
        out = self._forward(x, blocks)
        del out["act1"]
        return out

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Backbone features: stem, layer1..4, pre_logits."""
        out = self.intermediates(x)
        return {k: out[k] for k in ("stem", "layer1", "layer2", "layer3", "layer4", "pre_logits")}

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of NHWC images ``x`` (``features_only``: the list of feature maps; BatchNorm mode from ``train()``/``eval()``)."""
        if self.features_only:
            return self.feature_maps(x)
        return self.intermediates(x)["logits"]

    def feature_maps(self, x: jax.Array) -> list[jax.Array]:
        """timm's ``features_only`` output: the maps ``out_indices`` selects from ``FEATURE_NAMES``."""
        out = self._forward(x, False, last_stage=_last_stage(self.out_indices))
        return [out[FEATURE_NAMES[i]] for i in self.out_indices]


def _run(layers, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


def _last_stage(out_indices: tuple) -> int:
    """The last stage a ``features_only`` model runs (0: only the stem)."""
    return max(out_indices)
