"""The ResNet family as data: one row per architecture, and every layer's names.

Everything that builds or reads a ResNet derives it from here: the Flax model
(``flax_resnet.model``), the PyTorch reference (``torch_ref``), the
converter's key mapping (``flax_resnet.convert``), the BatchNorm fold
(``flax_resnet.inference``) and the parity harness. A new variant of an
existing kind is one row of ``ARCHS`` (plus its published parameter count).

This module imports neither jax nor torch: ``torch_ref`` reads it without
pulling in JAX.

Names (torch state_dict key prefix -> Flax path, ``.`` -> ``/``):

* stem ``"7x7"``: ``conv1`` (7x7/2, pad 3), ``bn1``.
* stem ``"deep"``/``"deep_tiered"`` (timm): ``conv1.0`` (3x3/2), ``conv1.1``
  (BN), ``conv1.3`` (3x3), ``conv1.4`` (BN), ``conv1.6`` (3x3), then ``bn1``;
  indices 2 and 5 are ReLUs (no parameters).
* blocks: ``layer{s}.{i}.conv{k}`` / ``bn{k}``.
* shortcut ``"conv"``: ``downsample.0`` (1x1/stride conv), ``downsample.1``
  (BN); the seed layout calls it ``identity_downsample``.
* shortcut ``"avg_down"`` (timm): ``downsample.0`` is
  ``AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)`` (an
  identity at stride 1; no parameters), ``downsample.1`` the 1x1/1 conv,
  ``downsample.2`` the BN.
* ``attn="se"`` (timm): ``layer{s}.{i}.se.fc1``/``.fc2``, 1x1 convs with bias.
* ``stem_pool="conv"`` (timm's ResNet-RS): ``maxpool.0`` (3x3/2), ``maxpool.1`` (BN).
* ``fc`` (absent when ``num_classes == 0``: a headless feature extractor).

The ``"transformers"`` layout (Hugging Face ``ResNetForImageClassification``)
names the same modules differently; ``transformers_name`` maps them
(``conv1`` -> ``resnet.embedder.embedder.convolution``,
``layer2.0.bn3`` -> ``resnet.encoder.stages.1.layers.0.layer.2.normalization``,
``layer2.0.downsample.0`` -> ``...layers.0.shortcut.convolution``, ``fc`` ->
``classifier.1``). Flax paths are the same in every layout.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Callable, Iterator

LAYOUTS = ("torchvision", "seed", "transformers")
STEMS = ("7x7", "deep", "deep_tiered")
SHORTCUTS = ("conv", "avg_down")
ATTNS = (None, "se")
STEM_POOLS = ("max", "conv")
SHORTCUT_NAME = {"seed": "identity_downsample", "torchvision": "downsample"}

# Channels entering each stage's blocks ("planes" in torchvision's naming).
STAGE_PLANES = (64, 128, 256, 512)
STEM_CHANNELS = 64  # output channels of the 7x7 stem


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    padding: int
    groups: int = 1
    bias: bool = False  # a bias in every layout (squeeze-and-excitation's fc1/fc2)


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """One ResNet variant.

    Attributes:
        name: torchvision's or timm's name of the architecture.
        block: ``"basic"`` (two 3x3 convs, expansion 1) or ``"bottleneck"``
            (1x1, 3x3, 1x1, expansion 4).
        stage_sizes: number of blocks in layer1..layer4.
        groups: groups of the 3x3 conv (ResNeXt cardinality).
        width_per_group: channels per group of the 3x3 conv at 64 planes
            (64 for ResNet, 128 for Wide ResNet-2, 4 or 8 for ResNeXt).
        stem: ``"7x7"`` (one 7x7/2 conv), ``"deep"`` (3x3/2, 3x3, 3x3 of
            widths ``w, w, 2w``) or ``"deep_tiered"`` (``3*(w//4), w, 2w``),
            ``w = stem_width``; timm's ``stem_type``.
        stem_width: timm's ``stem_width`` (deep stems only).
        shortcut: ``"conv"`` (1x1/stride conv + BN) or ``"avg_down"``
            (2x2 average pool with the stride, then 1x1 conv + BN); timm's
            ``avg_down``.
        source: the library whose published model this row is
            (``"torchvision"`` or ``"timm"``).
        attn: ``None`` or ``"se"``: timm's squeeze-and-excitation
            (``se``: global mean, 1x1 conv ``fc1`` with bias, ReLU, 1x1 conv
            ``fc2`` with bias, sigmoid gate) after each block's last BN.
        attn_ratio: the SE bottleneck's ``rd_ratio``: ``fc1`` has
            ``make_divisible(channels * attn_ratio, 8)`` outputs (timm's
            ``SEModule``: rounded to the nearest multiple of 8, at least 8).
        stem_pool: ``"max"`` (3x3/2 max-pool) or ``"conv"`` (timm's
            ``replace_stem_pool``: ``maxpool.0`` 3x3/2 conv, ``maxpool.1``
            BN, ReLU).
    """

    name: str
    block: str
    stage_sizes: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64
    stem: str = "7x7"
    stem_width: int = 32
    shortcut: str = "conv"
    source: str = "torchvision"
    attn: str | None = None
    attn_ratio: float = 1 / 16
    stem_pool: str = "max"

    def __post_init__(self):
        if self.stem not in STEMS or self.shortcut not in SHORTCUTS or self.block not in ("basic", "bottleneck"):
            raise ValueError(f"{self.name}: unknown block/stem/shortcut {self.block!r}/{self.stem!r}/{self.shortcut!r}")
        if self.attn not in ATTNS or self.stem_pool not in STEM_POOLS:
            raise ValueError(f"{self.name}: unknown attn/stem_pool {self.attn!r}/{self.stem_pool!r}")

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def num_features(self) -> int:
        """Width of the pooled features that feed ``fc``."""
        return STAGE_PLANES[-1] * self.expansion

    @property
    def stem_channels(self) -> int:
        """Channels out of the stem (into ``layer1``)."""
        return STEM_CHANNELS if self.stem == "7x7" else 2 * self.stem_width

    def width(self, planes: int) -> int:
        """Channels of a block's inner convs (torchvision's rule)."""
        if self.block == "basic":
            return planes
        return int(planes * (self.width_per_group / 64.0)) * self.groups

    @property
    def has_seed_layout(self) -> bool:
        """The seed (blog) code only defines bottleneck ResNet-50/101/152."""
        return self.name in ("resnet50", "resnet101", "resnet152")

    def attn_channels(self, channels: int) -> int:
        """``fc1``'s outputs of an SE over ``channels`` (timm's ``make_divisible(v, 8, round_limit=0)``)."""
        return max(8, int(channels * self.attn_ratio + 4) // 8 * 8)


_row = ArchSpec
_R50, _R101, _R152 = (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)
_TIMM_C = dict(stem="deep", source="timm")
_TIMM_D = dict(stem="deep", shortcut="avg_down", source="timm")
_TIMM_S = dict(stem="deep", stem_width=64, source="timm")
_TIMM_T = dict(stem="deep_tiered", shortcut="avg_down", source="timm")
_SE = dict(attn="se", source="timm")
_RS = dict(stem="deep", shortcut="avg_down", stem_pool="conv", attn="se", attn_ratio=0.25, source="timm")  # ResNet-RS

ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        _row("resnet18", "basic", (2, 2, 2, 2)),
        _row("resnet34", "basic", (3, 4, 6, 3)),
        _row("resnet50", "bottleneck", _R50),
        _row("resnet101", "bottleneck", _R101),
        _row("resnet152", "bottleneck", _R152),
        _row("wide_resnet50_2", "bottleneck", _R50, width_per_group=128),
        _row("wide_resnet101_2", "bottleneck", _R101, width_per_group=128),
        _row("resnext50_32x4d", "bottleneck", _R50, groups=32, width_per_group=4),
        _row("resnext101_32x8d", "bottleneck", _R101, groups=32, width_per_group=8),
        _row("resnext101_64x4d", "bottleneck", _R101, groups=64, width_per_group=4),
        # timm (timm/models/resnet.py): stem_type / stem_width / avg_down as data.
        _row("resnet10t", "basic", (1, 1, 1, 1), **_TIMM_T),
        _row("resnet14t", "bottleneck", (1, 1, 1, 1), **_TIMM_T),
        _row("resnet18d", "basic", (2, 2, 2, 2), **_TIMM_D),
        _row("resnet26", "bottleneck", (2, 2, 2, 2), source="timm"),
        _row("resnet26d", "bottleneck", (2, 2, 2, 2), **_TIMM_D),
        _row("resnet26t", "bottleneck", (2, 2, 2, 2), **_TIMM_T),
        _row("resnet34d", "basic", (3, 4, 6, 3), **_TIMM_D),
        _row("resnet50c", "bottleneck", _R50, **_TIMM_C),
        _row("resnet50d", "bottleneck", _R50, **_TIMM_D),
        _row("resnet50s", "bottleneck", _R50, **_TIMM_S),
        _row("resnet50t", "bottleneck", _R50, **_TIMM_T),
        _row("resnet101c", "bottleneck", _R101, **_TIMM_C),
        _row("resnet101d", "bottleneck", _R101, **_TIMM_D),
        _row("resnet101s", "bottleneck", _R101, **_TIMM_S),
        _row("resnet152c", "bottleneck", _R152, **_TIMM_C),
        _row("resnet152d", "bottleneck", _R152, **_TIMM_D),
        _row("resnet152s", "bottleneck", _R152, **_TIMM_S),
        _row("resnet200", "bottleneck", (3, 24, 36, 3), source="timm"),
        _row("resnet200d", "bottleneck", (3, 24, 36, 3), **_TIMM_D),
        # timm's squeeze-and-excitation ResNets and ResNet-RS (attn / stem_pool as data).
        _row("seresnet50", "bottleneck", _R50, **_SE),
        _row("seresnext26d_32x4d", "bottleneck", (2, 2, 2, 2), groups=32, width_per_group=4, **_TIMM_D, attn="se"),
        _row("seresnext50_32x4d", "bottleneck", _R50, groups=32, width_per_group=4, **_SE),
        _row("seresnext101_32x8d", "bottleneck", _R101, groups=32, width_per_group=8, **_SE),
        _row("resnetrs50", "bottleneck", _R50, **_RS),
        _row("resnetrs101", "bottleneck", _R101, **_RS),
    )
}

# Published parameter counts (num_classes=1000, 3 input channels).
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
TIMM_PARAM_COUNTS = {
    "resnet10t": 5_435_488,
    "resnet14t": 10_081_632,
    "resnet18d": 11_708_744,
    "resnet26": 15_995_176,
    "resnet26d": 16_014_408,
    "resnet26t": 16_011_872,
    "resnet34d": 21_816_904,
    "resnet50c": 25_576_264,
    "resnet50d": 25_576_264,
    "resnet50s": 25_680_808,
    "resnet50t": 25_573_728,
    "resnet101c": 44_568_392,
    "resnet101d": 44_568_392,
    "resnet101s": 44_672_936,
    "resnet152c": 60_212_040,
    "resnet152d": 60_212_040,
    "resnet152s": 60_316_584,
    "resnet200": 64_673_832,
    "resnet200d": 64_693_064,
    "seresnet50": 28_088_024,
    "seresnext26d_32x4d": 16_809_512,
    "seresnext50_32x4d": 27_559_896,
    "seresnext101_32x8d": 93_569_048,
    "resnetrs50": 35_691_912,
    "resnetrs101": 63_618_696,
}
PARAM_COUNTS = {**TORCHVISION_PARAM_COUNTS, **TIMM_PARAM_COUNTS}


def did_you_mean(name: str, choices) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` (case-insensitive), else ``""``."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.75)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def get_arch(name: str | ArchSpec) -> ArchSpec:
    """Looks up an architecture by name; raises ValueError naming the choices."""
    if isinstance(name, ArchSpec):
        return name
    try:
        return ARCHS[name]
    except (KeyError, TypeError):
        hint = did_you_mean(name, ARCHS) if isinstance(name, str) else ""
        raise ValueError(f"unknown architecture {name!r}{hint or '; choose one of ' + ', '.join(ARCHS)}") from None


def named_factory(make: Callable, name: str, doc: str) -> Callable:
    """``make`` as the factory of row ``name``: that name and ``doc.format(name=name, spec=its ArchSpec)`` as docstring."""
    make.__name__ = make.__qualname__ = name
    make.__doc__ = doc.format(name=name, spec=get_arch(name))
    return make


def check_layout(spec: ArchSpec, layout: str) -> None:
    """Raises ValueError unless ``spec`` exists in state_dict layout ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "seed" and not spec.has_seed_layout:
        raise ValueError(f"layout 'seed' exists only for resnet50/101/152, not {spec.name}")
    if layout == "transformers" and (spec.stem, spec.shortcut, spec.groups, spec.width_per_group, spec.attn, spec.stem_pool) != ("7x7", "conv", 1, 64, None, "max"):
        raise ValueError(f"layout 'transformers' has a 7x7 stem, conv shortcuts and no groups; {spec.name} has none of that layout")


# torchvision module name <-> transformers' (ResNetForImageClassification), in order. Stages
# and convs count from 1 in torchvision's names (layer1, conv1), from 0 in transformers' (stages.0, layer.0).
_TRANSFORMERS_NAMES = (
    ("conv1", "resnet.embedder.embedder.convolution"),
    ("bn1", "resnet.embedder.embedder.normalization"),
    ("layer{stage}.{block}.conv{conv}", "resnet.encoder.stages.{stage}.layers.{block}.layer.{conv}.convolution"),
    ("layer{stage}.{block}.bn{conv}", "resnet.encoder.stages.{stage}.layers.{block}.layer.{conv}.normalization"),
    ("layer{stage}.{block}.downsample.0", "resnet.encoder.stages.{stage}.layers.{block}.shortcut.convolution"),
    ("layer{stage}.{block}.downsample.1", "resnet.encoder.stages.{stage}.layers.{block}.shortcut.normalization"),
    ("fc", "classifier.1"),
)
_NAME_FIELDS = {"stage": r"\d", "block": r"\d+", "conv": r"\d"}


def _name_pattern(template: str) -> str:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, ...
    return "^" + "".join(f"(?P<{p}>{_NAME_FIELDS[p]})" if i % 2 else re.escape(p) for i, p in enumerate(parts)) + "$"


_TO_TRANSFORMERS = tuple((_name_pattern(tv), tf, -1) for tv, tf in _TRANSFORMERS_NAMES)
_FROM_TRANSFORMERS = tuple((_name_pattern(tf), tv, 1) for tv, tf in _TRANSFORMERS_NAMES)


def _rename(rules, name: str) -> str | None:
    """The first rule's template filled from ``name`` (stage and conv numbers shifted by the rule's ``shift``), or ``None``."""
    for pattern, template, shift in rules:
        if re.match(pattern, name):
            fields = lambda m: {k: v if k == "block" else int(v) + shift for k, v in m.groupdict().items()}  # noqa: E731
            return re.sub(pattern, lambda m: template.format(**fields(m)), name)
    return None


def transformers_name(name: str) -> str:
    """transformers' module name for a torchvision module name (``"layer1.0.conv2"``)."""
    out = _rename(_TO_TRANSFORMERS, name)
    if out is None:
        raise ValueError(f"{name!r} has no counterpart in the transformers layout")
    return out


def from_transformers_name(name: str) -> str | None:
    """The torchvision module name of a transformers module name, or ``None``."""
    return _rename(_FROM_TRANSFORMERS, name)


# ---------------------------------------------------------------------------
# Layers


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One residual block: what its module reads, and its convs' shapes.

    Attributes:
        stage: 1..4.
        index: position in the stage.
        kind: ``"basic"`` or ``"bottleneck"``.
        in_ch, width, out_ch: channels in, of the inner convs, out (``4 * planes`` for bottlenecks).
        stride: the block's stride (2 in the first block of layer2..4).
        groups: groups of the 3x3 conv (bottlenecks).
        stride_in_1x1: ResNet v1: a bottleneck strides in ``conv1`` instead of ``conv2``.
        shortcut: ``"conv"`` or ``"avg_down"`` (``project``: a ``downsample``, not the identity).
        attn: ``None`` or ``"se"`` (``attn_ch``: its ``fc1`` outputs).
        convs, downsample, attn_convs: the convs' shapes (the converter's and the blocks').
    """

    stage: int
    index: int
    kind: str
    in_ch: int
    width: int
    out_ch: int
    stride: int = 1
    groups: int = 1
    stride_in_1x1: bool = False
    shortcut: str = "conv"
    attn: str | None = None
    attn_ch: int = 0

    @property
    def name(self) -> str:
        return f"layer{self.stage}.{self.index}"

    @property
    def project(self) -> bool:
        return self.stride != 1 or self.in_ch != self.out_ch

    @property
    def convs(self) -> tuple[ConvSpec, ...]:
        if self.kind == "basic":
            return (ConvSpec(self.in_ch, self.width, 3, self.stride, 1), ConvSpec(self.width, self.out_ch, 3, 1, 1))
        s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        return (
            ConvSpec(self.in_ch, self.width, 1, s1, 0),
            ConvSpec(self.width, self.width, 3, s3, 1, self.groups),
            ConvSpec(self.width, self.out_ch, 1, 1, 0),
        )

    @property
    def downsample(self) -> ConvSpec | None:
        if not self.project:
            return None
        return ConvSpec(self.in_ch, self.out_ch, 1, 1 if self.shortcut == "avg_down" else self.stride, 0)

    @property
    def attn_convs(self) -> tuple[ConvSpec, ...]:
        """SE's ``fc1``, ``fc2`` (1x1 convs with bias), or none."""
        if self.attn is None:
            return ()
        return (ConvSpec(self.out_ch, self.attn_ch, 1, 1, 0, bias=True), ConvSpec(self.attn_ch, self.out_ch, 1, 1, 0, bias=True))

    @property
    def shortcut_indices(self) -> tuple[int, int]:
        """Positions of the shortcut's conv and BN in torch's ``downsample`` Sequential."""
        return (1, 2) if self.shortcut == "avg_down" else (0, 1)


def stem_convs(spec: ArchSpec, in_channels: int = 3) -> tuple[ConvSpec, ...]:
    """The stem's convs in order (one for ``7x7``, three for the deep stems)."""
    if spec.stem == "7x7":
        return (ConvSpec(in_channels, STEM_CHANNELS, 7, 2, 3),)
    w = spec.stem_width
    first = 3 * (w // 4) if spec.stem == "deep_tiered" else w
    return (ConvSpec(in_channels, first, 3, 2, 1), ConvSpec(first, w, 3, 1, 1), ConvSpec(w, 2 * w, 3, 1, 1))


def stem_names(spec: ArchSpec) -> tuple[tuple[str, str | None], ...]:
    """``(conv, bn)`` torch names of each stem conv; the last BN is ``bn1``."""
    if spec.stem == "7x7":
        return (("conv1", "bn1"),)
    return (("conv1.0", "conv1.1"), ("conv1.3", "conv1.4"), ("conv1.6", "bn1"))


def stem_pool_conv(spec: ArchSpec) -> ConvSpec | None:
    """``maxpool.0`` of timm's ``replace_stem_pool`` (3x3/2 conv), or ``None`` for the max-pool."""
    c = spec.stem_channels
    return ConvSpec(c, c, 3, 2, 1) if spec.stem_pool == "conv" else None


def blocks(spec: ArchSpec, stride_in_1x1: bool = False) -> Iterator[BlockSpec]:
    """Yields every residual block of ``spec``.

    ``stride_in_1x1=False`` is ResNet v1.5 (torchvision's and timm's default):
    a downsampling bottleneck strides in its 3x3 conv, which loses no input
    pixels. ``True`` is the original paper's v1 (and Caffe weights), which
    strides in the first 1x1 conv and so skips 3 of every 4 positions.
    """
    in_ch = spec.stem_channels
    for stage, (planes, n) in enumerate(zip(STAGE_PLANES, spec.stage_sizes), start=1):
        out_ch = planes * spec.expansion
        for index in range(n):
            stride = 2 if (index == 0 and stage > 1) else 1
            groups = spec.groups if spec.block == "bottleneck" else 1
            attn_ch = spec.attn_channels(out_ch) if spec.attn else 0
            yield BlockSpec(stage, index, spec.block, in_ch, spec.width(planes), out_ch, stride, groups, stride_in_1x1, spec.shortcut, spec.attn, attn_ch)
            in_ch = out_ch


@dataclasses.dataclass(frozen=True)
class Layer:
    """One module with parameters, named in both frameworks.

    Attributes:
        torch: the torch module name (state_dict key prefix), e.g.
            ``"layer1.0.downsample.1"``.
        flax: the Flax module path, e.g. ``("layer1", "0", "downsample", "1")``.
        kind: ``"conv"``, ``"bn"`` or ``"linear"``.
        conv: the conv's shape (``kind == "conv"``).
        features: output channels (conv, bn) or classes (linear).
        in_features: input features of ``fc`` (``kind == "linear"``).
    """

    torch: str
    flax: tuple[str, ...]
    kind: str
    conv: ConvSpec | None = None
    features: int = 0
    in_features: int = 0


def layers(spec: ArchSpec, layout: str = "torchvision", num_classes: int = 1000, in_channels: int = 3) -> Iterator[Layer]:
    """Every module with parameters in forward order; a conv's BN follows it.

    Flax paths mirror torchvision's names in every layout: the seed layout's
    ``identity_downsample`` is ``downsample`` in Flax too, and the
    transformers layout's names map through ``transformers_name``. With
    ``num_classes == 0`` there is no ``fc``.
    """

    def named(name: str, kind: str, c: ConvSpec | None, features: int, in_features: int = 0) -> Layer:
        torch_name = name
        if layout == "seed":
            torch_name = name.replace(".downsample.", f".{SHORTCUT_NAME['seed']}.")
        elif layout == "transformers":
            torch_name = transformers_name(name)
        return Layer(torch_name, tuple(name.split(".")), kind, c, features, in_features)

    for c, (cn, bnn) in zip(stem_convs(spec, in_channels), stem_names(spec)):
        yield named(cn, "conv", c, c.out_ch)
        yield named(bnn, "bn", None, c.out_ch)
    pool = stem_pool_conv(spec)
    if pool is not None:
        yield from (named("maxpool.0", "conv", pool, pool.out_ch), named("maxpool.1", "bn", None, pool.out_ch))
    for b in blocks(spec):
        branch = []
        for i, c in enumerate(b.convs, start=1):
            branch += [named(f"{b.name}.conv{i}", "conv", c, c.out_ch), named(f"{b.name}.bn{i}", "bn", None, c.out_ch)]
        branch += [named(f"{b.name}.{b.attn}.fc{i}", "conv", c, c.out_ch) for i, c in enumerate(b.attn_convs, start=1)]
        shortcut = []
        if b.downsample is not None:
            ci, bi = b.shortcut_indices
            shortcut = [named(f"{b.name}.downsample.{ci}", "conv", b.downsample, b.downsample.out_ch), named(f"{b.name}.downsample.{bi}", "bn", None, b.downsample.out_ch)]
        # transformers registers a layer's shortcut before its branch; state_dicts keep that order.
        yield from (shortcut + branch if layout == "transformers" else branch + shortcut)
    if num_classes:
        yield named("fc", "linear", None, num_classes, spec.num_features)


def conv_bn_pairs(spec: ArchSpec, layout: str = "torchvision") -> list[tuple[Layer, Layer]]:
    """Every conv with the BatchNorm that follows it (the pairs a BN fold merges)."""
    seq = list(layers(spec, layout))
    return [(a, b) for a, b in zip(seq, seq[1:]) if a.kind == "conv" and b.kind == "bn"]
