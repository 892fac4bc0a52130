"""Centralized training on the pooled long-tailed training set: the upper reference for generic accuracy, run
by the same machinery as every federated method.

One virtual client trains on the union of all clients' training data (exactly the long-tailed training set)
every round: the server always "samples" client 0, whose train call swaps its data for the pooled set. So a
run is ``num_rounds x local_epochs`` epochs of plain mini-batch SGD over the pooled set with the run's
optimizer, batch size, augmentation and ``loss=`` (class counts = the global long-tailed counts, e.g. for
``loss=balanced_softmax``). The optimizer (and its momentum) is re-created every round, as for clients.

Generic predictor: the central model on the balanced test set. Personalized evaluation still covers all N
clients: each evaluates the central model on its own local test set (``personalized/stage`` "before")."""

from __future__ import annotations

import dataclasses

import torch

from fedlt.data.federated import ClientData, DataPlan, client_data
from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import NoParams, ServerAlgorithm

TRAINER = 0  # the client whose node runs the central training


def pooled_data(plan: DataPlan) -> ClientData:
    """All clients' training data as one client (the long-tailed training set)."""
    parts = [client_data(plan, c) for c in range(plan.num_clients)]
    train_y = torch.cat([p.train_y for p in parts])
    first = parts[TRAINER]
    return ClientData(client_id=TRAINER, train_x=torch.cat([p.train_x for p in parts]), train_y=train_y,
                      test_x=first.test_x, test_y=first.test_y,
                      train_counts=torch.bincount(train_y, minlength=plan.num_classes),
                      test_counts=first.test_counts, plan=plan)


class CentralizedClient(ClientAlgorithm):
    batched_refusal = ("trains one virtual client on the pooled training set of all clients (train swaps ctx.data "
                       "for it), while the vectorised trainer draws each client's batches from that client's own "
                       "data, which no batched hook replaces (and each round samples that one client: there is no "
                       "cohort to vectorise)")

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self._pooled: tuple[DataPlan, ClientData] | None = None

    def pooled(self, plan: DataPlan) -> ClientData:
        if self._pooled is None or self._pooled[0] != plan:
            self._pooled = (plan, pooled_data(plan))
        return self._pooled[1]

    def train(self, ctx: ClientContext) -> dict[str, float]:
        # the reply's num-examples is then the pooled size; the run's sampler (sampler=) draws from the pool
        ctx.data = dataclasses.replace(self.pooled(ctx.data.plan), sampler=ctx.data.sampler)
        return super().train(ctx)


class Server(ServerAlgorithm):
    client_cls = CentralizedClient
    params = NoParams

    def sample_clients(self, server_round: int) -> list[int]:
        return [TRAINER]
