"""CIFAR-style ResNets (3x3 stride-1 stem, no max-pool, global average pooling), as in the official FedLoGe
code: ResNet-18 / ResNet-34 with 64/128/256/512 channels (512-d features). ResNet-8 is the three-stage
variant used by CReFF (one BasicBlock per stage, 64/128/256 channels, 256-d features); it is the backbone of
the reduced CPU presets. Features are post-ReLU and not normalised. ``norm``: ``batch`` (BatchNorm, the
default) or ``group`` (GroupNorm in place of every BatchNorm, shortcuts included, under the same state-dict
names ``bn1`` / ``bn2`` / ``shortcut.1``; :mod:`fedlt.models.norm`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.models.norm import norm2d

LAYOUTS = {
    "resnet8": ([1, 1, 1], [64, 128, 256]),
    "resnet18": ([2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": ([3, 4, 6, 3], [64, 128, 256, 512]),
}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm2d(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          norm2d(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, name: str = "resnet18", in_channels: int = 3, widths: list[int] | None = None,
                 norm: str = "batch"):
        super().__init__()
        blocks, default_widths = LAYOUTS[name]
        widths = list(widths) if widths else default_widths
        if len(widths) != len(blocks):
            raise ValueError(f"{name} needs {len(blocks)} stage widths, got {widths}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = norm2d(norm, widths[0])
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            for j in range(n):
                layers.append(BasicBlock(cin, w, stride if j == 0 else 1, norm))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.feature_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
