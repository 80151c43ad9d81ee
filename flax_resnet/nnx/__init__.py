"""Flax NNX front end: the same ResNets, converter and numerics for ``nnx.Module`` users.

::

    from flax import nnx
    import flax_resnet.nnx as frn

    model = frn.from_torch(torch_model.state_dict())      # an nnx.Module, train mode
    model.eval()
    logits = nnx.jit(lambda m, x: m(x))(model, images_nhwc)
    state_dict = frn.to_torch(model, layout="torchvision")

    model = frn.resnet50(num_classes=10, rngs=nnx.Rngs(0))  # fresh, any row of ARCHS
"""

from flax_resnet.archs import ARCHS
from flax_resnet.nnx.convert import LinenApply, from_linen, from_torch, to_linen, to_torch
from flax_resnet.nnx.blocks import BasicBlock, Bottleneck
from flax_resnet.nnx.factories import *  # noqa: F403  one factory per row of ARCHS (resnet18, resnet50, ...)
from flax_resnet.nnx.model import BatchNorm, ResNet
from flax_resnet.nnx.scan import ScannedStage

__all__ = [
    "ARCHS", "BasicBlock", "BatchNorm", "Bottleneck", "LinenApply", "ResNet", "ScannedStage",
    "from_linen", "from_torch", "to_linen", "to_torch", *ARCHS,
]  # fmt: skip
