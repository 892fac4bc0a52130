"""Shared by the server-optimizer strategies (FedAvgM, FedAdam): Flower's own ``FedAvgM`` / ``FedAdam`` objects
do the server update, called as a library from fedlt's ``aggregate`` hook.

* Flower's ``aggregate_train`` computes the sample-weighted average of the replies, then its update against the
  arrays the strategy sent (``current_arrays``, which Flower's own ``configure_train`` would have kept; fedlt's
  round loop sends the messages, so ``aggregate`` sets it from ``sent``).
* BatchNorm buffers (running mean/var, batch counters) are statistics, not parameters: a server optimizer step
  on them can overshoot (momentum) or move every entry by ~eta whatever its scale (Adam) and make a running
  variance negative. They are therefore plain sample-weighted averages, as in FedAvg (FL-bench's FedAvgM skips
  them too); only the trainable parameters get Flower's server update.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedlt.api.server import ServerAlgorithm
from strategies.fedavg import FedAvgClient


class ServerOptimizer(ServerAlgorithm):
    """Subclasses build ``self.flower`` (a Flower strategy object) and say how it remembers the sent arrays."""

    client_cls = FedAvgClient
    flower = None

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.buffer_keys: frozenset[str] = frozenset()

    def remember_sent(self, sent: ArrayRecord) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def initial_arrays(self, model: torch.nn.Module) -> ArrayRecord:
        self.buffer_keys = frozenset(k for k, _ in model.named_buffers())
        return super().initial_arrays(model)

    def aggregate(self, server_round: int, sent: ArrayRecord, replies: list[Message]) -> ArrayRecord | None:
        if not replies:
            return None
        self.remember_sent(sent)
        arrays, _ = self.flower.aggregate_train(server_round, replies)  # Flower's average + server update
        if arrays is None or not self.buffer_keys:
            return arrays
        average = super().aggregate(server_round, sent, replies)
        return ArrayRecord({k: average[k] if k in self.buffer_keys else a for k, a in arrays.items()})


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Server optimizer state as torch tensors (what ``server_state`` returns; ``torch.save``-able)."""
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def to_numpy(tensors: dict) -> dict[str, np.ndarray]:
    return {k: np.array(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t) for k, t in tensors.items()}
