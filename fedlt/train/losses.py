"""Client losses, selectable for any strategy with ``loss=NAME``. Each takes (logits, targets) and may use
the client's per-class training counts (``counts``), given when the loss is built."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(counts: torch.Tensor | None = None, **_) -> LossFn:
    return F.cross_entropy


LOSSES: dict[str, Callable[..., LossFn]] = {"ce": cross_entropy}


def build_loss(cfg: dict | None, counts: torch.Tensor | None = None) -> LossFn:
    cfg = dict(cfg or {"name": "ce"})
    name = cfg.pop("name", "ce")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](counts=counts, **cfg)
