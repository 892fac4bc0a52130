"""Models: every model is ``backbone`` (images -> features, ``feature_dim`` wide) followed by ``head``
(a Linear layer). Strategies that need more heads (FedLoGe, FedRoD, ...) wrap the backbone themselves."""

from __future__ import annotations

import torch
from torch import nn

from fedlt.models.cnn import SmallCNN
from fedlt.models.resnet import CifarResNet

MODELS = ("cnn", "resnet8", "resnet18", "resnet34")


class Classifier(nn.Module):
    """backbone + linear head; ``features(x)`` exposes the penultimate representation."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_backbone(cfg: dict, in_channels: int) -> tuple[nn.Module, int]:
    """Backbone and its feature width from the ``model`` config group."""
    name = cfg["name"]
    if name == "cnn":
        net = SmallCNN(in_channels, width=int(cfg.get("width", 32)), feature_dim=int(cfg.get("feature_dim", 128)))
        return net, net.feature_dim
    if name in ("resnet8", "resnet18", "resnet34"):
        net = CifarResNet(name, in_channels, widths=cfg.get("widths"))
        return net, net.feature_dim
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")


def build_model(cfg: dict, in_channels: int, num_classes: int) -> Classifier:
    backbone, dim = build_backbone(cfg, in_channels)
    return Classifier(backbone, dim, num_classes)
