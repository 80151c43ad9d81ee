"""Hugging Face transformers' ResNet, seen through ``torch_ref``'s interface.

The parity harness drives ``torch_ref.ResNet`` through ``state_dict()``,
``forward()`` and ``forward_intermediates()``. ``TransformersResNet`` gives
``transformers.ResNetForImageClassification`` the same three, running
transformers' own modules (embedder, stages, layers, pooler, classifier), so
``parity.harness.run_parity`` compares the Flax conversion against
transformers itself, key for key in the transformers layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flax_resnet.archs import from_transformers_name, get_arch
from parity.fixtures import randomize_and_calibrate


class TransformersResNet(nn.Module):
    """Wraps a ``ResNetForImageClassification`` without copying its modules.

    Its ``state_dict()`` keys are the wrapped model's (``resnet.embedder...``,
    ``classifier.1.weight``), so a strict load into the wrapped model and into
    this wrapper are the same thing.

    Args:
        hf_model: a ``transformers.ResNetForImageClassification``.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.resnet = hf_model.resnet
        self.classifier = hf_model.classifier
        config = hf_model.config
        if config.downsample_in_first_stage:
            raise ValueError("downsample_in_first_stage=True has no torchvision counterpart")
        # transformers' downsample_in_bottleneck is ResNet v1 (stride in the first 1x1 conv).
        self.stride_in_1x1 = bool(config.downsample_in_bottleneck) and config.layer_type == "bottleneck"

    def forward_intermediates(self, x: torch.Tensor, blocks: bool = False) -> dict[str, torch.Tensor]:
        """The parity points of ``torch_ref.ResNet.forward_intermediates``, from transformers' modules."""
        out: dict[str, torch.Tensor] = {}
        x = self.resnet.embedder(x)  # conv, BN, ReLU, max-pool
        out["stem"] = x
        for s, stage in enumerate(self.resnet.encoder.stages, start=1):
            for j, layer in enumerate(stage.layers):
                x = layer(x)
                if blocks:
                    out[f"layer{s}.{j}"] = x
            out[f"layer{s}"] = x
        x = torch.flatten(self.resnet.pooler(x), 1)
        out["pre_logits"] = x
        out["logits"] = self.classifier(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)["logits"]

    @staticmethod
    def relu_owner(name: str) -> str:
        """The torch_ref module whose ReLU ``name`` is (``""``, ``"layer1.0"``), where the Flax forward records its sign.

        transformers gives each conv layer its own ReLU
        (``...layers.0.layer.1.activation``) and each block one after the sum
        (``...layers.0.activation``); torch_ref calls its block's one
        ``relu`` for all of them, in the same order.
        """
        parent = name.rpartition(".")[0]
        conv = from_transformers_name(f"{parent}.convolution") or from_transformers_name(f"{parent}.layer.0.convolution")
        if conv is None:
            raise ValueError(f"kink matching: the ReLU {name!r} has no torch_ref counterpart")
        return conv.rpartition(".")[0]


def config_of(arch: str) -> dict[str, Any]:
    """``transformers.ResNetConfig`` arguments for a row of ``flax_resnet.ARCHS`` (7x7 stem, conv shortcut, no groups).

    Raises:
        ValueError: the row has no transformers counterpart.
    """
    spec = get_arch(arch)
    if (spec.stem, spec.shortcut, spec.groups, spec.width_per_group) != ("7x7", "conv", 1, 64):
        raise ValueError(f"{arch} has no transformers counterpart (transformers' ResNet: 7x7 stem, conv shortcut, no groups, width 64)")
    hidden = [64 * 2**i * spec.expansion for i in range(4)]
    return dict(layer_type=spec.block, depths=list(spec.stage_sizes), hidden_sizes=hidden)


def from_state_dict(config, state_dict: dict[str, torch.Tensor], directory: str | None = None) -> "TransformersResNet":
    """transformers' own model holding a transformers-layout state_dict, wrapped for the harness (float32, eval mode).

    Args:
        config: the ``flax_resnet.ModelConfig`` the weights hold.
        state_dict: its tensors, in the transformers layout.
        directory: a model directory whose ``config.json`` to use (read
            locally); else the ``ResNetConfig`` of ``config_of(config.arch)``.

    Raises:
        ImportError: transformers is not installed.
    """
    import os

    from transformers import ResNetConfig, ResNetForImageClassification

    if directory is not None and os.path.isdir(directory):
        cfg = ResNetConfig.from_pretrained(directory, local_files_only=True)
    else:
        v1 = dict(downsample_in_bottleneck=True) if config.stride_in_1x1 else {}
        cfg = ResNetConfig(num_labels=config.num_classes, num_channels=config.in_channels, **config_of(config.spec.name), **v1)
    m = ResNetForImageClassification(cfg)
    missing, unexpected = m.load_state_dict(state_dict, strict=False)
    if [k for k in missing if not k.endswith("num_batches_tracked")] or unexpected:
        raise ValueError(f"transformers' ResNet does not hold these weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return TransformersResNet(m.float().eval())


@torch.no_grad()
def reference_model(config: str | dict[str, Any] = "resnet50", num_labels: int = 1000, seed: int = 0) -> nn.Module:
    """A seeded ``ResNetForImageClassification`` with ``parity.fixtures``' BN treatment (random affine, calibrated stats), in eval mode.

    Wrap it in ``TransformersResNet`` for the parity harness.

    Args:
        config: an ``ARCHS`` name (``config_of``) or ``ResNetConfig`` arguments.
        num_labels: classifier outputs.
        seed: seeds the weights, the BN params and the calibration batches.
    """
    from transformers import ResNetConfig, ResNetForImageClassification

    kwargs = config_of(config) if isinstance(config, str) else config
    torch.manual_seed(seed)
    cfg = ResNetConfig(num_labels=num_labels, id2label={i: f"class {i}" for i in range(num_labels)}, **kwargs)
    m = ResNetForImageClassification(cfg)
    last = {layer.layer[-1].normalization for stage in m.resnet.encoder.stages for layer in stage.layers}
    return randomize_and_calibrate(m, seed=seed, last_bns=last)
