"""Ditto (Li et al., 2021): every client keeps a full personal model v (in its persistent state, ``ctx.state``)
besides training the global model w exactly as FedAvg does.

Each time a client is sampled it first trains v for ``strategy.personal_epochs`` epochs (null = local_epochs)
on loss(v) + lambda/2 * ||v - w||^2, with w the global model it just received, then trains w as in FedAvg and
uploads w only. A client's v starts as the global model the first time it is sampled; a client never sampled
predicts with the global model. Personalized predictor: v. Generic predictor: w. Client loss: ``loss=``."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from fedlt.config import param
from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import ServerAlgorithm

PERSONAL = "personal_model."  # key prefix of v in ctx.state


class DittoClient(ClientAlgorithm):
    batched_refusal = ("needs a second full model per client (its personal model in ctx.state, trained for its "
                       "own personal_epochs with a proximal term before the global model's epochs), while every "
                       "phase of the vectorised trainer steps the one model each client starts from the received "
                       "global state")

    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        return "after"  # the personal model

    def personal_model(self, ctx: ClientContext) -> nn.Module:
        """v: a copy of the model holding the client's personal weights (the global ones if it has none yet)."""
        personal = copy.deepcopy(ctx.model)
        saved = {k[len(PERSONAL):]: v for k, v in ctx.state.items() if k.startswith(PERSONAL)}
        if saved:
            personal.load_state_dict(saved)
        return personal

    def train(self, ctx: ClientContext) -> dict[str, float]:
        lam = float(ctx.strategy["lam"])
        epochs = ctx.strategy.get("personal_epochs")
        personal = self.personal_model(ctx).train()
        params = [p for p in personal.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in ctx.model.parameters() if p.requires_grad]  # the received w

        def proximal() -> torch.Tensor:
            return 0.5 * lam * sum(((v - w) ** 2).sum() for v, w in zip(params, anchor, strict=True))

        own = self.local_epochs(ctx, personal, params, extra=proximal if lam > 0 else None,
                                epochs=None if epochs is None else int(epochs))
        ctx.state.update({PERSONAL + k: v.detach().clone() for k, v in personal.state_dict().items()})
        metrics = super().train(ctx)  # the global model, as FedAvg
        return {**metrics, "train/personal_loss": own["train/loss"]}

    def predictors(self, ctx: ClientContext):
        return {"personal": self.personal_model(ctx).eval()}


@dataclass(frozen=True)
class Params:
    lam: float = param(1.0, "proximal strength lambda (FL-bench's default 1; the paper sweeps 0.1-2)", lo=0.0)
    personal_epochs: int | None = param(None, "epochs on the personal model per sampled round; null = local_epochs",
                                        lo=0)


class Server(ServerAlgorithm):
    client_cls = DittoClient
    params = Params
    secagg_ready = True  # the aggregate is the plain sample-weighted mean (privacy.secagg)
