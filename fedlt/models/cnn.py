"""A small CNN for 28x28 (Fashion-MNIST) or 32x32 images: two conv blocks, global pooling to a fixed grid,
one hidden layer. Fast on one CPU thread, which is what the default experiment needs. ``norm``: ``batch``
(BatchNorm, the default) or ``group`` (GroupNorm, :mod:`fedlt.models.norm`)."""

from __future__ import annotations

import torch
from torch import nn

from fedlt.models.norm import norm2d


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, width: int = 32, feature_dim: int = 128, norm: str = "batch"):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), norm2d(norm, width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), norm2d(norm, 2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
