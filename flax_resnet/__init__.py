"""flax-resnet: Flax ResNets numerically interchangeable with PyTorch."""

from flax_resnet.archs import ARCHS, TORCHVISION_PARAM_COUNTS, ArchSpec, get_arch
from flax_resnet.checkpoint import CheckpointError, load, read_state_dict, save
from flax_resnet.hub import from_pretrained
from flax_resnet.convert import (
    ConversionError,
    ModelConfig,
    flax_to_torch,
    from_torch,
    infer_config,
    torch_to_flax,
)
from flax_resnet.layers import BatchNorm
from flax_resnet.model import (
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)

__version__ = "0.1.0"
