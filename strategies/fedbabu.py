"""FedBABU (Oh et al., ICLR 2022): the head is randomly initialised (the same for every client: the run's seeded
initial model), sent once and **never updated during FL** (``frozen_prefixes``); only the body is trained and
averaged. Generic predictor: the global body with that frozen head.

Personalization (``personalization_stage`` "after"): before its local test every client fine-tunes a copy of
the global model on its own training data for ``strategy.finetune_epochs`` epochs -- the whole model
(``finetune_part: full``, the paper's main setting) or the head only (``head``) -- and predicts with it
(``finetuned``, primary); ``global`` is the frozen-head global model on the same local test. The copy is
discarded, so fine-tuning never leaks into training. Fine-tuning has its own optimiser, plain SGD with
``strategy.finetune_lr`` and ``strategy.finetune_momentum`` (no weight decay), not the training optimiser.
Client loss: ``loss=`` (cross-entropy by default), in training and fine-tuning.

Checked against the official code, jhoon-oh/FedBABU at commit e34c15b4288224f0af1bc13670bc0cdc373c9576:
``analysis.ipynb`` (personalization: ``personalization_epoch = 5`` epochs on the whole model, train mode, with
``torch.optim.SGD`` over body and head at ``lr 1e-3``, ``momentum 0.9``, no weight decay, CE) and
``scripts/run_fedbabu.sh`` (FL training: ``--lr 0.1 --momentum 0.90 --wd 0.0 --local_upt_part body
--aggr_part body``). The defaults here are those: 5 epochs, lr 1e-3, momentum 0.9.

Deviations:
* the official notebook fine-tunes once, after the last round; fedlt fine-tunes a fresh copy before every
  evaluation (``eval.every``), so the personalized numbers are available during training too;
* fine-tuning uses the run's ``batch_size`` (official: ``local_bs`` 50, the training batch size as well) and the
  run's ``loss=`` (official: CE, which is also fedlt's default)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import ServerAlgorithm
from fedlt.config import param
from fedlt.train.local import run_local_epochs, sgd, supervised_step


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
        s = ctx.strategy
        epochs = int(s["finetune_epochs"])
        if epochs <= 0:
            return {"global": ctx.model}
        tuned = copy.deepcopy(ctx.model)
        tuned.head.requires_grad_(True)
        part = tuned.head if s["finetune_part"] == "head" else tuned
        tuned.train()
        opt = sgd(list(part.parameters()), {"lr": float(s["finetune_lr"]), "momentum": float(s["finetune_momentum"])})
        run_local_epochs(ctx.data, epochs, int(ctx.cfg["batch_size"]), ctx.generator,
                         supervised_step(tuned, opt, self.loss_fn(ctx)), ctx.device)
        tuned.eval()
        return {"finetuned": tuned, "global": ctx.model}

    def shared_features(self, model: nn.Module) -> nn.Module | None:
        """Without fine-tuning (``finetune_epochs=0``) every client predicts with the global model itself
        (eval.personalized_path); with it, each client's fine-tuned copy is its own: no shared features."""
        return model if int(self.cfg["strategy"]["finetune_epochs"]) <= 0 else None

    def personal_heads(self, ctx: ClientContext):
        ctx.model.eval()
        return {"global": lambda h: h}


@dataclass(frozen=True)
class Params:
    finetune_epochs: int = param(5, "local fine-tuning epochs before each personalized evaluation (official 5); "
                                    "0 = none", lo=0)
    finetune_part: str = param("full", "full = body and head (the paper's main setting), head = the head only",
                               choices=("full", "head"))
    finetune_lr: float = param(0.001, "SGD lr of the fine-tuning (official 1e-3; independent of optimizer.lr)",
                               lo=0.0, lo_open=True)
    finetune_momentum: float = param(0.9, "SGD momentum of the fine-tuning (official 0.9; no weight decay)",
                                     lo=0.0, hi=1.0, hi_open=True)


class Server(ServerAlgorithm):
    client_cls = FedBABUClient
    params = Params
    secagg_ready = True  # the aggregate is the plain sample-weighted mean (privacy.secagg)
