"""PyTorch reference ResNets, built from ``flax_resnet.archs``.

Two state_dict layouts of the same network:

* ``"torchvision"`` (the default): bias-free convs and ``downsample``, key
  for key torchvision's and timm's ResNets (timm's deep stems ``conv1.0`` ..
  ``conv1.6`` and avg-pool shortcuts ``downsample.1``/``.2`` included), so
  their checkpoints load strictly.
* ``"seed"``: the bottleneck ResNet-50/101/152 of the seed blog code. Every
  conv has a bias (``nn.Conv2d``'s default) and the shortcut projection is
  called ``identity_downsample``.

Only ``flax_resnet.archs`` is imported from the Flax side (no jax).
"""

from __future__ import annotations

import torch
from torch import nn

from flax_resnet.archs import SHORTCUT_NAME, BlockSpec, ConvSpec, blocks, check_layout, get_arch, stem_convs, stem_pool_conv
from torch_ref.attention import ATTENTION


def _conv(c: ConvSpec, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c.in_ch, c.out_ch, c.kernel, stride=c.stride, padding=c.padding, groups=c.groups, bias=bias)


def _shortcut(spec: BlockSpec, bias: bool) -> nn.Sequential:
    conv, bn = _conv(spec.downsample, bias), nn.BatchNorm2d(spec.downsample.out_ch)
    if spec.shortcut == "conv":
        return nn.Sequential(conv, bn)
    # timm's downsample_avg: pool (identity at stride 1), then the 1x1 conv and BN.
    pool = nn.AvgPool2d(2, spec.stride, ceil_mode=True, count_include_pad=False) if spec.stride > 1 else nn.Identity()
    return nn.Sequential(pool, conv, bn)


class Block(nn.Module):
    """Basic or bottleneck block: ``conv{i}``/``bn{i}`` and an optional shortcut."""

    def __init__(self, spec: BlockSpec, layout: str):
        super().__init__()
        bias = layout == "seed"
        self.n = len(spec.convs)
        for i, c in enumerate(spec.convs, start=1):
            self.add_module(f"conv{i}", _conv(c, bias))
            self.add_module(f"bn{i}", nn.BatchNorm2d(c.out_ch))
        if spec.attn is not None:  # timm registers it after the last BN
            self.add_module(spec.attn, ATTENTION[spec.attn](spec.attn_convs))
        self.attn = spec.attn
        self.relu = nn.ReLU()
        self.shortcut_name = SHORTCUT_NAME[layout]
        self.add_module(self.shortcut_name, _shortcut(spec, bias) if spec.downsample is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for i in range(1, self.n + 1):
            x = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x))
            if i < self.n:
                x = self.relu(x)
        if self.attn is not None:
            x = getattr(self, self.attn)(x)
        shortcut = getattr(self, self.shortcut_name)
        if shortcut is not None:
            residual = shortcut(residual)
        return self.relu(x + residual)


class ResNet(nn.Module):
    """A ResNet of ``flax_resnet.ARCHS`` in either state_dict layout.

    Args:
        arch: architecture name, e.g. ``"resnet50"`` or ``"resnet50d"``.
        img_channels: input channels.
        num_classes: outputs of ``fc``; 0 makes ``fc`` an identity (headless).
        layout: ``"torchvision"`` or ``"seed"`` (ResNet-50/101/152 only); the
            transformers layout is transformers' own model
            (``parity.hf.TransformersResNet`` gives it this interface).
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
        if layout == "transformers":
            raise ValueError("torch_ref builds the seed and torchvision layouts; for 'transformers' use transformers' ResNetForImageClassification")
        self.arch, self.layout, self.stride_in_1x1 = spec.name, layout, stride_in_1x1
        bias = layout == "seed"
        stem = stem_convs(spec, img_channels)
        if spec.stem == "7x7":
            self.conv1 = _conv(stem[0], bias)
        else:  # timm's deep stem: conv, bn, relu, conv, bn, relu, conv (then bn1)
            mods = []
            for i, c in enumerate(stem):
                mods.append(_conv(c, bias))
                if i < len(stem) - 1:
                    mods += [nn.BatchNorm2d(c.out_ch), nn.ReLU()]
            self.conv1 = nn.Sequential(*mods)
        self.bn1 = nn.BatchNorm2d(spec.stem_channels)
        self.relu = nn.ReLU()
        pool = stem_pool_conv(spec)
        if pool is None:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:  # timm's replace_stem_pool: conv, bn, relu
            self.maxpool = nn.Sequential(_conv(pool, bias), nn.BatchNorm2d(pool.out_ch), nn.ReLU())
        all_blocks = list(blocks(spec, stride_in_1x1))
        for s in (1, 2, 3, 4):
            stage = [Block(b, layout) for b in all_blocks if b.stage == s]
            self.add_module(f"layer{s}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(spec.num_features, num_classes) if num_classes else nn.Identity()  # 0: headless, as timm
        if layout == "torchvision":
            # torchvision's (and timm's) init; the seed keeps PyTorch's defaults.
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


def build(config) -> ResNet:
    """The torch reference of a ``flax_resnet.ModelConfig``: the model the Flax side builds from the same description.

    Every setting that changes numbers is applied: architecture, input
    channels, classes, layout (conv biases), ``stride_in_1x1``, BatchNorm
    momentum (Flax's convention: torch's is ``1 - bn_momentum``) and eps,
    ``zero_init_residual`` (each block's last BN scale 0). Dtype, precision,
    ``scan_blocks`` and ``remat`` are the Flax side's execution; the model is
    float32, in eval mode.

    Raises:
        ValueError: the transformers layout (transformers' own
            ``ResNetForImageClassification`` is its reference:
            ``parity.hf``), or conv biases outside the seed layout.
    """
    if config.layout == "transformers":
        raise ValueError("torch_ref builds the seed and torchvision layouts; the transformers layout's reference is transformers' ResNetForImageClassification (parity.hf)")
    if bool(config.conv_bias) != (config.layout == "seed"):
        raise ValueError(f"torch_ref: conv_bias={config.conv_bias} has no {config.layout} layout (conv biases are the seed layout's)")
    model = ResNet(config.spec, img_channels=config.in_channels, num_classes=config.num_classes, layout=config.layout, stride_in_1x1=config.stride_in_1x1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum, m.eps = 1.0 - config.bn_momentum, config.bn_eps
        if config.zero_init_residual and isinstance(m, Block):
            nn.init.zeros_(getattr(m, f"bn{m.n}").weight)
    return model.float().eval()


def _factory(name: str):
    def make(img_channels: int = 3, num_classes: int = 1000, layout: str = "torchvision", **kwargs) -> ResNet:
        return ResNet(name, img_channels=img_channels, num_classes=num_classes, layout=layout, **kwargs)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = (
        f"PyTorch reference {name} (layout ``\"torchvision\"`` by default; ``layout=\"seed\"`` for the seed code's keys); "
        "see ``ResNet`` for the arguments."
    )
    return make


def _export_factories() -> list[str]:
    from flax_resnet.archs import ARCHS

    for name in ARCHS:
        globals()[name] = _factory(name)
    return list(ARCHS)


FACTORIES = _export_factories()
