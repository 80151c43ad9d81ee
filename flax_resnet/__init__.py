"""flax-resnet: Flax ResNets numerically interchangeable with PyTorch.

``flax_resnet.archs`` (the family as data) is imported eagerly and needs
neither jax nor torch; everything else loads on first use (PEP 562), so
``torch_ref`` can read the architecture table without importing JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

from flax_resnet.archs import ARCHS, PARAM_COUNTS, TIMM_PARAM_COUNTS, TORCHVISION_PARAM_COUNTS, ArchSpec, get_arch
from flax_resnet.config import ModelConfig

__version__ = "0.1.0"

# public name -> defining module; one factory per architecture comes from flax_resnet.factories.
_LAZY = {
    "CheckpointError": "flax_resnet.io",
    "load": "flax_resnet.io",
    "read_state_dict": "flax_resnet.io",
    "save": "flax_resnet.io",
    "from_pretrained": "flax_resnet.hub",
    "list_models": "flax_resnet.catalog",
    "list_pretrained": "flax_resnet.catalog",
    "build": "flax_resnet.builder",
    "model_config": "flax_resnet.builder",
    "ConversionError": "flax_resnet.convert",
    "check_variables": "flax_resnet.convert",
    "flax_to_torch": "flax_resnet.convert",
    "from_torch": "flax_resnet.convert",
    "infer_config": "flax_resnet.convert",
    "torch_to_flax": "flax_resnet.convert",
    "BatchNorm": "flax_resnet.layers",
    "ResNet": "flax_resnet.model",
    **{name: "flax_resnet.factories" for name in ARCHS},
}

__all__ = ["ARCHS", "PARAM_COUNTS", "TIMM_PARAM_COUNTS", "TORCHVISION_PARAM_COUNTS", "ArchSpec", "ModelConfig", "get_arch", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        try:  # submodules: flax_resnet.convert, flax_resnet.inference, ...
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
