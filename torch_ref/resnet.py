"""PyTorch reference ResNets, built from ``flax_resnet.archs``.

Two state_dict layouts of the same network:

* ``"seed"``: the bottleneck ResNet-50/101/152 of the seed blog code. Every
  conv has a bias (``nn.Conv2d``'s default) and the shortcut projection is
  called ``identity_downsample``.
* ``"torchvision"``: bias-free convs and ``downsample``, key for key
  torchvision's (and timm's) ResNets, so their checkpoints load strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from flax_resnet.archs import STEM_CHANNELS, BlockSpec, ConvSpec, blocks, check_layout, get_arch

SHORTCUT_NAME = {"seed": "identity_downsample", "torchvision": "downsample"}


def _conv(c: ConvSpec, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c.in_ch, c.out_ch, c.kernel, stride=c.stride, padding=c.padding, groups=c.groups, bias=bias)


class Block(nn.Module):
    """Basic or bottleneck block: ``conv{i}``/``bn{i}`` and an optional shortcut."""

    def __init__(self, spec: BlockSpec, layout: str):
        super().__init__()
        bias = layout == "seed"
        self.n = len(spec.convs)
        for i, c in enumerate(spec.convs, start=1):
            self.add_module(f"conv{i}", _conv(c, bias))
            self.add_module(f"bn{i}", nn.BatchNorm2d(c.out_ch))
        self.relu = nn.ReLU()
        self.shortcut_name = SHORTCUT_NAME[layout]
        shortcut = None
        if spec.downsample is not None:
            shortcut = nn.Sequential(_conv(spec.downsample, bias), nn.BatchNorm2d(spec.downsample.out_ch))
        self.add_module(self.shortcut_name, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for i in range(1, self.n + 1):
            x = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x))
            if i < self.n:
                x = self.relu(x)
        shortcut = getattr(self, self.shortcut_name)
        if shortcut is not None:
            residual = shortcut(residual)
        return self.relu(x + residual)


class ResNet(nn.Module):
    """A ResNet of ``flax_resnet.ARCHS`` in either state_dict layout.

    Args:
        arch: architecture name, e.g. ``"resnet50"``.
        img_channels: input channels.
        num_classes: outputs of ``fc``.
        layout: ``"torchvision"`` or ``"seed"`` (ResNet-50/101/152 only).
        stride_in_1x1: ResNet v1 (stride in the first 1x1 conv) instead of v1.5.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        img_channels: int = 3,
        num_classes: int = 1000,
        layout: str = "torchvision",
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        spec = get_arch(arch)
        check_layout(spec, layout)
        self.arch, self.layout, self.stride_in_1x1 = spec.name, layout, stride_in_1x1
        self.conv1 = _conv(ConvSpec(img_channels, STEM_CHANNELS, 7, 2, 3), bias=layout == "seed")
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        all_blocks = list(blocks(spec, stride_in_1x1))
        for s in (1, 2, 3, 4):
            stage = [Block(b, layout) for b in all_blocks if b.stage == s]
            self.add_module(f"layer{s}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(spec.num_features, num_classes)
        if layout == "torchvision":
            # torchvision's init; the seed keeps PyTorch's defaults.
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_intermediates(self, x: torch.Tensor, blocks: bool = False) -> dict[str, torch.Tensor]:
        """Every parity point in order, the same as Flax's ``ResNet.intermediates``."""
        out: dict[str, torch.Tensor] = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out["stem"] = x
        for s in (1, 2, 3, 4):
            for j, block in enumerate(getattr(self, f"layer{s}")):
                x = block(x)
                if blocks:
                    out[f"layer{s}.{j}"] = x
            out[f"layer{s}"] = x
        x = torch.flatten(self.avgpool(x), 1)
        out["pre_logits"] = x
        out["logits"] = self.fc(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)["logits"]


def _factory(name: str):
    def make(img_channels: int = 3, num_classes: int = 1000, layout: str = "seed" if get_arch(name).has_seed_layout else "torchvision", **kwargs) -> ResNet:
        return ResNet(name, img_channels=img_channels, num_classes=num_classes, layout=layout, **kwargs)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"PyTorch reference {name}; see ``ResNet`` for the arguments."
    return make


resnet18 = _factory("resnet18")
resnet34 = _factory("resnet34")
resnet50 = _factory("resnet50")
resnet101 = _factory("resnet101")
resnet152 = _factory("resnet152")
wide_resnet50_2 = _factory("wide_resnet50_2")
wide_resnet101_2 = _factory("wide_resnet101_2")
resnext50_32x4d = _factory("resnext50_32x4d")
resnext101_32x8d = _factory("resnext101_32x8d")
resnext101_64x4d = _factory("resnext101_64x4d")
