"""FedProx (Li et al., 2020): FedAvg plus the textbook proximal term mu/2 * ||w - w_global||^2 on every local
step (the official FedLoGe baselines use the unsquared norm; this is the paper's form)."""

from __future__ import annotations

import torch

from dataclasses import dataclass

from fedlt.config import param
from strategies.fedavg import FedAvgClient, FedAvgParams
from strategies.fedavg import Server as FedAvgServer


class FedProxClient(FedAvgClient):
    dp_sgd_ready = True  # one local_epochs call; the proximal term reads no data (privacy=dp_sgd adds its gradient)

    def train(self, ctx) -> dict[str, float]:
        mu = float(ctx.strategy["mu"])
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in params]

        def proximal() -> torch.Tensor:
            return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))

        ctx.model.train()
        return self.local_epochs(ctx, ctx.model, params, extra=proximal if mu > 0 else None)


    # client batching (backend.client_batching): the same proximal step, for all clients at once
    batched_ready = True
    ANCHOR = "anchor/"  # batched_terms keys of the start weights

    def batched_terms(self, ctx) -> dict[str, torch.Tensor]:
        terms = super().batched_terms(ctx)
        terms.update({self.ANCHOR + n: p.detach().clone() for n, p in ctx.model.named_parameters()
                      if p.requires_grad})
        return terms

    def batched_loss(self, model, x, y, weight, terms):
        loss, _ = super().batched_loss(model, x, y, weight, terms)
        mu = float(self.cfg["strategy"]["mu"])
        if mu > 0:
            loss = loss + 0.5 * mu * sum(((p - terms[self.ANCHOR + n]) ** 2).sum()
                                         for n, p in model.named_parameters() if self.ANCHOR + n in terms)
        return loss, {"train/loss": loss}


@dataclass(frozen=True)
class Params(FedAvgParams):
    mu: float = param(0.01, "proximal strength (the FedLoGe baselines use 0.01)", lo=0.0)


class Server(FedAvgServer):
    client_cls = FedProxClient
    params = Params
    secagg_ready = True  # the aggregate is the plain sample-weighted mean (privacy.secagg)
