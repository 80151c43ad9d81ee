"""The ResNet family as data: one table of stage sizes, block kind and width.

Both frameworks build from this table (``flax_resnet.model`` and
``torch_ref``), and the converter derives every key and shape from it, so a
new variant is one row here.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

LAYOUTS = ("torchvision", "seed")

# Channels entering each stage's blocks ("planes" in torchvision's naming).
STAGE_PLANES = (64, 128, 256, 512)
STEM_CHANNELS = 64


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """One ResNet variant.

    Attributes:
        name: torchvision's name of the architecture.
        block: ``"basic"`` (two 3x3 convs, expansion 1) or ``"bottleneck"``
            (1x1, 3x3, 1x1, expansion 4).
        stage_sizes: number of blocks in layer1..layer4.
        groups: groups of the 3x3 conv (ResNeXt cardinality).
        width_per_group: channels per group of the 3x3 conv at 64 planes
            (64 for ResNet, 128 for Wide ResNet-2, 4 or 8 for ResNeXt).
    """

    name: str
    block: str
    stage_sizes: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def num_features(self) -> int:
        """Width of the pooled features that feed ``fc``."""
        return STAGE_PLANES[-1] * self.expansion

    def width(self, planes: int) -> int:
        """Channels of a block's inner convs (torchvision's rule)."""
        if self.block == "basic":
            return planes
        return int(planes * (self.width_per_group / 64.0)) * self.groups

    @property
    def has_seed_layout(self) -> bool:
        """The seed (blog) code only defines bottleneck ResNet-50/101/152."""
        return self.block == "bottleneck" and self.groups == 1 and self.width_per_group == 64


ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("resnet18", "basic", (2, 2, 2, 2)),
        ArchSpec("resnet34", "basic", (3, 4, 6, 3)),
        ArchSpec("resnet50", "bottleneck", (3, 4, 6, 3)),
        ArchSpec("resnet101", "bottleneck", (3, 4, 23, 3)),
        ArchSpec("resnet152", "bottleneck", (3, 8, 36, 3)),
        ArchSpec("wide_resnet50_2", "bottleneck", (3, 4, 6, 3), width_per_group=128),
        ArchSpec("wide_resnet101_2", "bottleneck", (3, 4, 23, 3), width_per_group=128),
        ArchSpec("resnext50_32x4d", "bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
        ArchSpec("resnext101_32x8d", "bottleneck", (3, 4, 23, 3), groups=32, width_per_group=8),
        ArchSpec("resnext101_64x4d", "bottleneck", (3, 4, 23, 3), groups=64, width_per_group=4),
    )
}

# Published torchvision parameter counts (num_classes=1000, 3 input channels).
TORCHVISION_PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
}


def get_arch(name: str | ArchSpec) -> ArchSpec:
    """Looks up an architecture by name; raises ValueError naming the choices."""
    if isinstance(name, ArchSpec):
        return name
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}") from None


def check_layout(spec: ArchSpec, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "seed" and not spec.has_seed_layout:
        raise ValueError(f"layout 'seed' exists only for resnet50/101/152, not {spec.name}")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    padding: int
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One residual block: its convs in order, and the shortcut projection."""

    stage: int  # 1..4
    index: int
    convs: tuple[ConvSpec, ...]
    downsample: ConvSpec | None

    @property
    def name(self) -> str:
        return f"layer{self.stage}.{self.index}"


def blocks(spec: ArchSpec, stride_in_1x1: bool = False) -> Iterator[BlockSpec]:
    """Yields every residual block of ``spec`` with its conv shapes.

    ``stride_in_1x1=False`` is ResNet v1.5 (torchvision's default): a
    downsampling bottleneck strides in its 3x3 conv, which loses no input
    pixels. ``True`` is the original paper's v1 (and Caffe weights), which
    strides in the first 1x1 conv and so skips 3 of every 4 positions.
    """
    in_ch = STEM_CHANNELS
    for stage, (planes, n) in enumerate(zip(STAGE_PLANES, spec.stage_sizes), start=1):
        for index in range(n):
            stride = 2 if (index == 0 and stage > 1) else 1
            out_ch = planes * spec.expansion
            width = spec.width(planes)
            if spec.block == "basic":
                convs = (
                    ConvSpec(in_ch, width, 3, stride, 1),
                    ConvSpec(width, out_ch, 3, 1, 1),
                )
            else:
                s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
                convs = (
                    ConvSpec(in_ch, width, 1, s1, 0),
                    ConvSpec(width, width, 3, s3, 1, spec.groups),
                    ConvSpec(width, out_ch, 1, 1, 0),
                )
            downsample = None
            if stride != 1 or in_ch != out_ch:
                downsample = ConvSpec(in_ch, out_ch, 1, stride, 0)
            yield BlockSpec(stage, index, convs, downsample)
            in_ch = out_ch
