"""timm's channel attention, as ``timm/layers/squeeze_excite.py`` writes it (torch keys ``se.fc1``, ``se.fc2``)."""

from __future__ import annotations

import torch
from torch import nn

from flax_resnet.archs import ConvSpec


class SEModule(nn.Module):
    """timm's ``SEModule`` with its defaults (ReLU, sigmoid gate, no BatchNorm): ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``."""

    def __init__(self, convs: tuple[ConvSpec, ConvSpec]):
        super().__init__()
        fc1, fc2 = convs
        self.fc1 = nn.Conv2d(fc1.in_ch, fc1.out_ch, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU()  # not in place: the parity harness hooks read its input
        self.fc2 = nn.Conv2d(fc2.in_ch, fc2.out_ch, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
        return x * self.gate(x_se)


ATTENTION = {"se": SEModule}
