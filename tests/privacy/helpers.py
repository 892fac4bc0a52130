"""Shared by the privacy tests: hand-built run configs, global arrays and client replies."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedlt.config import param_defaults
from fedlt.privacy import MODES

TINY = ("experiment=smoke", "model.width=8", "model.feature_dim=16", "num_clients=4", "participation=0.5",
        "eval.every=1", "checkpoint.every=1", "checkpoint.keep=0")


def run_cfg(mode: str = "dp_central", num_clients: int = 20, participation: float = 0.5, num_rounds: int = 10,
            seed: int = 3, **privacy) -> dict:
    """The parts of a run config that fedlt.privacy reads."""
    return {"seed": seed, "num_clients": num_clients, "participation": participation, "num_rounds": num_rounds,
            "privacy": {"name": mode, **param_defaults(MODES[mode]), **privacy}}


def arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v.numpy())) for k, v in tensors.items()})


def reply(client: int, tensors: dict[str, torch.Tensor], **metrics) -> Message:
    content = RecordDict({"arrays": arrays(tensors),
                          "metrics": MetricRecord({"num-examples": 10, "client-id": client, "train/loss": 1.0,
                                                   **metrics})})
    return Message(content=content, dst_node_id=100 + client, message_type=MessageType.TRAIN)


def delta_norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 norm of a - b over the floating-point arrays, in float64."""
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a
                                if a[k].is_floating_point())))
