"""The run's model: the configured backbone+head, wrapped by the algorithm (extra heads, frozen parts)."""

from __future__ import annotations

from torch import nn

from fedlt.data.federated import DataPlan
from fedlt.data.sources import open_cached_source
from fedlt.models import build_model


def in_channels(plan: DataPlan) -> int:
    return int(open_cached_source(plan.source_cache, plan.source_name, plan.mean, plan.std).train_x.shape[-1])


def build_run_model(cfg: dict, plan: DataPlan, algo_cls) -> nn.Module:
    base = build_model(cfg["model"], in_channels(plan), plan.num_classes)
    return algo_cls.build_model(base, cfg)
