"""The names this package knows: architectures, torchvision's weights, Hugging Face hub ids.

Data and look-ups only (no jax, no torch, no network): ``list_models``,
``list_pretrained``, the "did you mean" of unknown names, and ImageNet-1k's
class names (``imagenet_labels``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path

from flax_resnet.archs import ARCHS, did_you_mean  # noqa: F401 - did_you_mean is this module's look-up too

TORCHVISION_URL = "https://download.pytorch.org/models/"

# torchvision/models/resnet.py: (enum class, arch) -> {tag: (file name, resize_size)}; crop_size is 224 for all.
_TV = {
    ("ResNet18_Weights", "resnet18"): {"IMAGENET1K_V1": ("resnet18-f37072fd.pth", 256)},
    ("ResNet34_Weights", "resnet34"): {"IMAGENET1K_V1": ("resnet34-b627a593.pth", 256)},
    ("ResNet50_Weights", "resnet50"): {"IMAGENET1K_V1": ("resnet50-0676ba61.pth", 256), "IMAGENET1K_V2": ("resnet50-11ad3fa6.pth", 232)},
    ("ResNet101_Weights", "resnet101"): {"IMAGENET1K_V1": ("resnet101-63fe2227.pth", 256), "IMAGENET1K_V2": ("resnet101-cd907fc2.pth", 232)},
    ("ResNet152_Weights", "resnet152"): {"IMAGENET1K_V1": ("resnet152-394f9c45.pth", 256), "IMAGENET1K_V2": ("resnet152-f82ba261.pth", 232)},
    ("ResNeXt50_32X4D_Weights", "resnext50_32x4d"): {
        "IMAGENET1K_V1": ("resnext50_32x4d-7cdf4587.pth", 256),
        "IMAGENET1K_V2": ("resnext50_32x4d-1a0047aa.pth", 232),
    },
    ("ResNeXt101_32X8D_Weights", "resnext101_32x8d"): {
        "IMAGENET1K_V1": ("resnext101_32x8d-8ba56ff5.pth", 256),
        "IMAGENET1K_V2": ("resnext101_32x8d-110c445d.pth", 232),
    },
    ("ResNeXt101_64X4D_Weights", "resnext101_64x4d"): {"IMAGENET1K_V1": ("resnext101_64x4d-173b62eb.pth", 232)},
    ("Wide_ResNet50_2_Weights", "wide_resnet50_2"): {
        "IMAGENET1K_V1": ("wide_resnet50_2-95faca4d.pth", 256),
        "IMAGENET1K_V2": ("wide_resnet50_2-9ba9bcbe.pth", 232),
    },
    ("Wide_ResNet101_2_Weights", "wide_resnet101_2"): {
        "IMAGENET1K_V1": ("wide_resnet101_2-32ee1156.pth", 256),
        "IMAGENET1K_V2": ("wide_resnet101_2-d733dc28.pth", 232),
    },
}


@dataclasses.dataclass(frozen=True)
class TorchvisionWeights:
    """One torchvision weights entry."""

    enum: str  # "ResNet50_Weights.IMAGENET1K_V2"
    arch: str
    file: str  # "resnet50-11ad3fa6.pth"
    resize: int  # resize_size of its eval transform (crop 224)

    @property
    def url(self) -> str:
        return TORCHVISION_URL + self.file


def _torchvision_names() -> dict[str, TorchvisionWeights]:
    names: dict[str, TorchvisionWeights] = {}
    for (cls, arch), tags in _TV.items():
        for tag, (file, resize) in tags.items():
            w = TorchvisionWeights(f"{cls}.{tag}", arch, file, resize)
            timm_tag = "tv_in1k" if tag == "IMAGENET1K_V1" else "tv2_in1k"
            for key in (w.enum, f"{arch}.{timm_tag}", file):
                names[key.lower()] = w
        default = names[f"{cls}.{'IMAGENET1K_V2' if 'IMAGENET1K_V2' in tags else 'IMAGENET1K_V1'}".lower()]
        names[f"{cls}.DEFAULT".lower()] = names[arch] = default
    return names


TORCHVISION_WEIGHTS = _torchvision_names()

# Hugging Face hub ids of ResNets this package builds (their layouts are tested on caches the tests build);
# the hub has more, and any timm/transformers ResNet id of an ``ARCHS`` architecture loads the same way.
HUB_IDS = (
    "timm/resnet10t.c3_in1k", "timm/resnet14t.c3_in1k", "timm/resnet18.a1_in1k", "timm/resnet18.tv_in1k",
    "timm/resnet18d.ra2_in1k", "timm/resnet26.bt_in1k", "timm/resnet26d.bt_in1k", "timm/resnet26t.ra2_in1k",
    "timm/resnet34.a1_in1k", "timm/resnet34d.ra2_in1k", "timm/resnet50.a1_in1k", "timm/resnet50.tv2_in1k",
    "timm/resnet50c.gluon_in1k", "timm/resnet50d.ra2_in1k", "timm/resnet50s.gluon_in1k", "timm/resnet101.a1h_in1k",
    "timm/resnet101c.gluon_in1k", "timm/resnet101d.ra2_in1k", "timm/resnet101s.gluon_in1k", "timm/resnet152.a1h_in1k",
    "timm/resnet152c.gluon_in1k", "timm/resnet152d.ra2_in1k", "timm/resnet152s.gluon_in1k", "timm/resnet200d.ra2_in1k",
    "microsoft/resnet-18", "microsoft/resnet-34", "microsoft/resnet-50", "microsoft/resnet-101", "microsoft/resnet-152",
)


def list_models(pattern: str | None = None) -> list[str]:
    """The architectures this package builds (``ARCHS`` rows, in table order), as timm's ``list_models``.

    Args:
        pattern: a shell-style pattern (``"resnet50*"``, ``"*t"``), matched case-insensitively.

    Returns:
        Architecture names; ``flax_resnet.ARCHS[name]`` is the row.
    """
    return [name for name in ARCHS if pattern is None or fnmatch.fnmatch(name, pattern.lower())]


def list_pretrained(pattern: str | None = None) -> list[str]:
    """The pretrained names ``from_pretrained`` knows: torchvision weights names, then hub ids (``HUB_IDS``).

    Torchvision's are its enum names (``"ResNet50_Weights.IMAGENET1K_V2"``); the
    short forms (``"resnet50"``, ``"resnet50.tv2_in1k"``, the file names) name
    the same files.

    Args:
        pattern: a shell-style pattern, matched case-insensitively (``"*resnet50*"``).
    """
    names = [w.enum for w in dict.fromkeys(TORCHVISION_WEIGHTS.values())] + list(HUB_IDS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n.lower(), pattern.lower())]


def known_names() -> list[str]:
    return list_pretrained() + list(ARCHS) + [w.file for w in TORCHVISION_WEIGHTS.values()] + [n.removeprefix("timm/") for n in HUB_IDS if n.startswith("timm/")]


def imagenet_labels() -> tuple[str, ...] | None:
    """ImageNet-1k class names in torchvision's order (``weights.meta["categories"]``), if shipped."""
    path = Path(__file__).with_name("imagenet_classes.txt")
    if not path.is_file():
        return None
    labels = tuple(line for line in path.read_text(encoding="utf-8").splitlines() if line)
    return labels if len(labels) == 1000 else None


def says_imagenet_1k(num_classes: int | None, tags: tuple[str, ...]) -> bool:
    """1000 classes and a pretrained tag or hub id ending in ``in1k`` (timm's ``a1_in1k``, ``ig1b_ft_in1k``)."""
    return num_classes == 1000 and any(t.rstrip("/").lower().endswith("in1k") for t in tags)
