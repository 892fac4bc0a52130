"""Models: every model is ``backbone`` (images -> features, ``feature_dim`` wide) followed by ``head``.
Strategies that need more heads (FedLoGe, FedRoD, ...) wrap the backbone themselves.

The head is chosen with ``model.head`` (any model, any strategy whose classifier is the configured head):

* ``linear`` (default) -- ``nn.Linear(feature_dim, num_classes)``: logits W f + b.
* ``cosine`` -- :class:`NormedLinear`, the cosine classifier of LDAM-DRW (Cao et al., 2019; official code
  kaidic/LDAM-DRW at commit 2536330f2afdaa65618323cb5a5850efccce762a, ``models/resnet_cifar.py`` class
  ``NormedLinear``, selected in ``cifar_train.py`` whenever ``--loss_type LDAM``): logits are the cosines
  <f / |f|, w_c / |w_c|> in [-1, 1], no bias. LDAM's scale s = 30 is meant for these logits, so
  ``loss=ldam_drw`` requires this head (fedlt.train.losses.validate_loss).

The normalisation layer is chosen with ``model.norm``: ``batch`` (default) or ``group`` (GroupNorm, needed by
``privacy=dp_sgd``; :mod:`fedlt.models.norm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.models.cnn import SmallCNN
from fedlt.models.norm import NORMS, norm_name  # noqa: F401 -- model.norm's values (validate)
from fedlt.models.resnet import CifarResNet

MODELS = ("cnn", "resnet8", "resnet18", "resnet34")
HEADS = ("linear", "cosine")


def head_name(model_cfg: dict | None) -> str:
    """The configured head (``model.head``; ``linear`` when absent)."""
    return (model_cfg or {}).get("head") or "linear"


class NormedLinear(nn.Module):
    """Cosine classifier: ``logits[:, c] = <x / |x|, w_c / |w_c|>`` (no bias), as LDAM-DRW's ``NormedLinear``.

    The official layer stores its weight as ``in_features x out_features`` and normalises the columns; here the
    weight is stored as ``nn.Linear`` stores it (``out_features x in_features``, row c = class c) so that code
    reading ``head.weight`` sees one row per class. The initialisation is the official one on that layout: each
    class vector drawn uniform in [-1, 1] and rescaled to unit norm (``renorm_(2, ., 1e-5).mul_(1e5)``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False (cosine)"


def build_head(kind: str, feature_dim: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(feature_dim, num_classes)
    if kind == "cosine":
        return NormedLinear(feature_dim, num_classes)
    raise ValueError(f"unknown model.head {kind!r}; allowed: {', '.join(HEADS)}")


class Classifier(nn.Module):
    """backbone + head (``model.head``: linear or cosine); ``features(x)`` exposes the penultimate
    representation."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, head: str = "linear"):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.head = build_head(head, feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_backbone(cfg: dict, in_channels: int) -> tuple[nn.Module, int]:
    """Backbone and its feature width from the ``model`` config group."""
    name = cfg["name"]
    if name == "cnn":
        net = SmallCNN(in_channels, width=int(cfg.get("width", 32)), feature_dim=int(cfg.get("feature_dim", 128)),
                       norm=norm_name(cfg))
        return net, net.feature_dim
    if name in ("resnet8", "resnet18", "resnet34"):
        net = CifarResNet(name, in_channels, widths=cfg.get("widths"), norm=norm_name(cfg))
        return net, net.feature_dim
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")


def build_model(cfg: dict, in_channels: int, num_classes: int) -> Classifier:
    backbone, dim = build_backbone(cfg, in_channels)
    return Classifier(backbone, dim, num_classes, head=head_name(cfg))
