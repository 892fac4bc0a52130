"""Local-only training: every client trains its own model on its own data and nothing is federated -- the
lower bound users ask for (how much does federation buy a client at all?).

The whole model is personal state (``personal_prefixes`` covers every key): a client starts from the run's
common initial model the first time it is sampled and continues from its own model afterwards. Sampling and
local epochs are the same as in the federated methods (participation, local_epochs, num_rounds), so each
client gets the same amount of local computation as under FedAvg. Train replies carry no arrays and the server
averages nothing.

Personalized predictor: the client's own model (a client never sampled keeps the untrained initial model).
Generic accuracy is **not applicable** (there is no global model): ``generic/accuracy`` is logged as null."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message

from fedlt.api.client import ClientAlgorithm
from fedlt.api.server import NoParams, ServerAlgorithm


class LocalClient(ClientAlgorithm):
    personal_prefixes = ("",)  # every state-dict key

    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        return "after"  # each client's own model


class Server(ServerAlgorithm):
    client_cls = LocalClient
    params = NoParams

    def aggregate(self, server_round: int, sent: ArrayRecord, replies: list[Message]) -> ArrayRecord | None:
        uploaded = [k for r in replies for rec in r.content.array_records.values() for k in rec.keys()]
        if uploaded:
            raise RuntimeError(f"local: a client uploaded model arrays {uploaded[:3]}; nothing may be shared")
        return None

    def generic_metrics(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        batch_size: int, evaluation=None) -> tuple[dict, dict]:
        return {"generic/accuracy": None}, {"not_applicable": "local training has no global model"}
