"""Shared by the server-optimizer strategies (FedAvgM, FedAdam): glue between fedlt's round loop and Flower's
own ``FedAvgM`` / ``FedOpt`` classes, which do the actual update.

* Flower's strategies remember the arrays they sent in their ``configure_train``; fedlt's
  ``FedLTStrategy.configure_train`` does its own seeded sampling and does not call it, so each strategy
  records the sent arrays itself (``remember_sent``) before building the messages.
* BatchNorm buffers (running mean/var, batch counters) are statistics, not parameters: a server optimizer step
  on them can overshoot (momentum) or move every entry by ~eta whatever its scale (Adam) and make a running
  variance negative. They are therefore plain sample-weighted averages, as in FedAvg (FL-bench's FedAvgM skips
  them too); only the trainable parameters get Flower's server update.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedlt.config import check_float, check_int


class ServerOptimizer:
    """Mix in before ``FedLTStrategy`` (``class Server(ServerOptimizer, FedLTStrategy, FedAdam)``)."""

    buffer_keys: frozenset[str] = frozenset()

    def remember_sent(self, arrays: ArrayRecord) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def initial_arrays(self, model: torch.nn.Module) -> ArrayRecord:
        self.buffer_keys = frozenset(k for k, _ in model.named_buffers())
        return super().initial_arrays(model)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.remember_sent(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)  # Flower's server optimizer
        if arrays is None or not self.buffer_keys:
            return arrays, metrics
        average = aggregate_arrayrecords([r.content for r in replies], self.weighted_by_key)
        return ArrayRecord({k: average[k] if k in self.buffer_keys else a for k, a in arrays.items()}), metrics


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Server optimizer state as torch tensors (what ``server_state`` returns; ``torch.save``-able)."""
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def to_numpy(tensors: dict) -> dict[str, np.ndarray]:
    return {k: np.array(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t) for k, t in tensors.items()}


def validate_common(cfg: dict) -> None:
    check_float(cfg, "strategy.server_lr", 0.0, lo_open=True)
    check_int(cfg, "strategy.finetune_epochs", 0)
