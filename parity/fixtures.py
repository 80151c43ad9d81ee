"""Seeded reference models with realistic BatchNorm state.

Default BN state (mean 0, var 1, scale 1, bias 0) hides layout bugs (a
transposed or swapped stat goes unnoticed) and lets activations grow through
the residual stack. These fixtures randomize every affine parameter and then
calibrate the running statistics with a few train-mode passes, so every BN
layer carries distinct, data-consistent values.
"""

from __future__ import annotations

import torch
from torch import nn

import torch_ref


@torch.no_grad()
def randomize_and_calibrate(
    model: nn.Module, seed: int = 0, in_channels: int = 3, size: int = 64, batches: int = 3, batch_size: int = 8, last_bns: set | None = None
) -> nn.Module:
    """Randomizes BN affine params and calibrates running stats in place.

    Each BN gets scale ~ U(0.5, 1.5) and bias ~ N(0, 0.2); the last BN of each
    residual branch gets a smaller scale U(0.1, 0.5) so the residual sum stays
    O(1) through 50+ blocks. Running stats become the exact average of the
    batch statistics of ``batches`` passes of N(0, 1) images
    (``momentum=None`` is torch's cumulative average); ``num_batches_tracked``
    then counts those passes, as in a real checkpoint.

    Args:
        last_bns: the last BN of each residual branch (default: those of
            ``torch_ref``'s blocks).

    Returns:
        ``model``, in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    if last_bns is None:
        last_bns = {getattr(m, f"bn{m.n}") for m in model.modules() if isinstance(m, torch_ref.resnet.Block)}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            lo, hi = (0.1, 0.5) if m in last_bns else (0.5, 1.5)
            m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) * (hi - lo) + lo)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.2)
            m.reset_running_stats()
            m.momentum = None
    model.train()
    dtype = next(model.parameters()).dtype
    for _ in range(batches):
        model(torch.randn(batch_size, in_channels, size, size, generator=g, dtype=dtype))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


def reference_model(
    arch: str = "resnet50",
    layout: str = "torchvision",
    seed: int = 0,
    num_classes: int = 1000,
    img_channels: int = 3,
    stride_in_1x1: bool = False,
    calibrate_size: int = 64,
) -> torch_ref.ResNet:
    """A seeded ``torch_ref.ResNet`` with random weights and calibrated BN, in eval mode (float32)."""
    from flax_resnet.config import ModelConfig

    config = ModelConfig(arch, layout, num_classes=num_classes, in_channels=img_channels, stride_in_1x1=stride_in_1x1)
    return calibrated(config, seed=seed, calibrate_size=calibrate_size)


def calibrated(config, seed: int = 0, calibrate_size: int = 64) -> nn.Module:
    """``torch_ref.build(config)`` with seeded random weights and calibrated BN, in eval mode (float32).

    Calibration uses torch's cumulative average; the model's own BatchNorm
    momentum (``config.bn_momentum``) is restored afterwards.
    """
    torch.manual_seed(seed)
    model = torch_ref.build(config)
    momenta = {m: m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    randomize_and_calibrate(model, seed=seed, in_channels=config.in_channels, size=calibrate_size)
    for m, momentum in momenta.items():
        m.momentum = momentum
    return model


def images(batch: int, channels: int, height: int, width: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Seeded N(0, 1) NCHW images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=g).to(dtype)
