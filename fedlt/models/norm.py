"""The normalisation layer of the CNN and ResNet models (``model.norm``).

* ``batch`` (default): ``nn.BatchNorm2d`` -- every existing run, bit for bit.
* ``group``: ``nn.GroupNorm(gcd(32, C), C)`` in place of EVERY BatchNorm (CNN blocks, ResNet stem, blocks and
  shortcuts): 32 groups, Wu & He's default ("Group Normalization", ECCV 2018) and what the Opacus examples and
  De et al. 2022 use for DP-SGD, for any width that is a multiple of 32 (all standard widths: 32...512); a
  narrower or odd width gets the largest divisor of 32 that divides it (e.g. 16 groups for the smoke CNN's
  first block of width 16). GroupNorm normalises each sample on its own, so it has no running statistics and
  no cross-sample dependence: per-sample gradients (``privacy=dp_sgd``) are well defined, which BatchNorm's
  are not. Its affine weight and bias are initialised to 1 and 0 like BatchNorm's, and building it draws no
  random numbers, so the other layers' seeded initial weights are the same under either option."""

from __future__ import annotations

import math

from torch import nn

NORMS = ("batch", "group")
GROUPS = 32  # GroupNorm's group count for widths that are multiples of 32 (Wu & He 2018)


def norm_name(model_cfg: dict | None) -> str:
    """The configured normalisation (``model.norm``; ``batch`` when absent, e.g. a run written before it)."""
    return (model_cfg or {}).get("norm") or "batch"


def group_count(channels: int) -> int:
    """gcd(32, channels): 32 for every multiple of 32."""
    return math.gcd(GROUPS, int(channels))


def norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"unknown model.norm {kind!r}; allowed: {', '.join(NORMS)}")
