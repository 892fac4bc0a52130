"""FedAvg (McMahan et al., 2017): local SGD, sample-weighted averaging of every model array (BatchNorm
buffers included). Optional personalization for evaluation: ``strategy.finetune_epochs`` > 0 fine-tunes a
copy of the global model on the client's own data before its local test (FedAvg-FT); the copy is discarded."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import ServerAlgorithm
from fedlt.config import param


@dataclass(frozen=True)
class FedAvgParams:
    finetune_epochs: int = param(0, "> 0: fine-tune a copy of the global model this many local epochs on the "
                                    "client's own data before its local test (FedAvg-FT)", lo=0)


class FedAvgClient(ClientAlgorithm):
    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        return "after" if int(cfg["strategy"].get("finetune_epochs", 0)) > 0 else "before"

    def predictors(self, ctx: ClientContext):
        epochs = int(ctx.strategy.get("finetune_epochs", 0))
        if epochs <= 0:
            return super().predictors(ctx)
        tuned = copy.deepcopy(ctx.model).train()
        self.local_epochs(ctx, tuned, tuned.parameters(), epochs=epochs)
        tuned.eval()
        return {"finetuned": tuned}


class Server(ServerAlgorithm):
    client_cls = FedAvgClient
    params = FedAvgParams
