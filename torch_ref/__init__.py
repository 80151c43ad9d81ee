"""PyTorch reference ResNets (torchvision/timm and seed state_dict layouts).

One factory per row of ``flax_resnet.ARCHS`` (``torch_ref.resnet50()``,
``torch_ref.resnet50d()``, ...); every factory defaults to the torchvision
key layout, the seed layout is ``layout="seed"``. ``build(config)`` is the
reference of a ``flax_resnet.ModelConfig``. Imports torch and
``flax_resnet.archs`` only (no jax).
"""

from torch_ref import resnet as _resnet
from torch_ref.resnet import FACTORIES, Block, ResNet, build

globals().update({name: getattr(_resnet, name) for name in FACTORIES})

__all__ = ["Block", "ResNet", "build", *FACTORIES]
