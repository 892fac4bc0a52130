"""FedBABU (Oh et al., 2022): the head is randomly initialised (the same for every client: the run's seeded
initial model), sent once and **never updated during FL** (``frozen_prefixes``); only the body is trained and
averaged. Generic predictor: the global body with that frozen head.

Personalization (``personalization_stage`` "after"): before its local test every client fine-tunes a copy of
the global model on its own training data for ``strategy.finetune_epochs`` epochs -- the whole model
(``finetune_part: full``, the paper's main setting) or the head only (``head``) -- and predicts with it
(``finetuned``, primary); ``global`` is the frozen-head global model on the same local test. The copy is
discarded, so fine-tuning never leaks into training. Client loss: ``loss=`` (cross-entropy by default)."""

from __future__ import annotations

import copy

from torch import nn

from fedlt.config import check_choice, check_int
from fedlt.federation.algorithm import ClientAlgorithm, ClientContext
from fedlt.federation.strategy import FedLTStrategy


class FedBABUClient(ClientAlgorithm):
    frozen_prefixes = ("head.",)

    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        return "after" if int(cfg["strategy"]["finetune_epochs"]) > 0 else "before"

    @staticmethod
    def build_model(base: nn.Module, cfg: dict) -> nn.Module:
        base.head.requires_grad_(False)  # not in the local optimizer (ClientAlgorithm.train takes trainable params)
        return base

    def predictors(self, ctx: ClientContext):
        ctx.model.eval()
        epochs = int(ctx.strategy["finetune_epochs"])
        if epochs <= 0:
            return {"global": ctx.model}
        tuned = copy.deepcopy(ctx.model)
        tuned.head.requires_grad_(True)
        part = tuned.head if ctx.strategy["finetune_part"] == "head" else tuned
        tuned.train()
        self.local_epochs(ctx, tuned, list(part.parameters()), epochs=epochs)
        tuned.eval()
        return {"finetuned": tuned, "global": ctx.model}


class Server(FedLTStrategy):
    client_cls = FedBABUClient

    @staticmethod
    def validate_config(cfg: dict) -> None:
        check_int(cfg, "strategy.finetune_epochs", 0)
        check_choice(cfg, "strategy.finetune_part", ("full", "head"))
