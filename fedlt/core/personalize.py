"""One personalization protocol for every method (``personalization.*``), applied by the client step.

Methods without a personal model of their own (``personalization_stage(cfg) == "before"``: FedAvg, FedProx,
FedAvgM, FedAdam, FedLC, CReFF, CCVR, SCAFFOLD, FedDyn, MOON, FedNH, Fed-GraB, Ratio Loss, centralized, ...) get,
with ``personalization.finetune_epochs`` > 0, an extra personalized predictor ``finetuned``: a copy of the received global model fine-tuned on the
client's own training data with the same budget for every method (epochs, SGD lr and momentum, all parameters or
the head only, plain cross-entropy or the run's loss), logged BESIDE the unchanged model (which stays the primary
predictor), so a table can show "as trained" and "after the same fine-tuning". Methods with their own
personalization step (FedBABU, FedETF, FedRep, Ditto, FedRoD, FedPer, FedLoGe's GLA-FR, FedBN, FedProto, local)
keep their paper's step; ``results.json`` records which applied (``personalized/budget``).

Clients never sampled before an evaluation: every method evaluates them on the current global arrays with their
personal parts at the run's deterministic initial values (the core loads init -> frozen -> global -> personal,
and a never-trained client has no personal record); their number is logged as ``personalized/never_sampled``."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedlt.api.client import ClientAlgorithm, ClientContext, Predictor
from fedlt.config import param
from fedlt.train.local import run_local_epochs, supervised_step


@dataclass(frozen=True)
class PersonalizationParams:
    finetune_epochs: int = param(0, "local epochs of the shared fine-tuning before each local test (0 = off)", lo=0)
    finetune_lr: float = param(0.01, "SGD lr of the shared fine-tuning", lo=0.0, lo_open=True)
    finetune_momentum: float = param(0.9, "SGD momentum of the shared fine-tuning (no weight decay)", lo=0.0, hi=1.0,
                                     hi_open=True)
    finetune_parts: str = param("all", "all = every trainable parameter; head = the model's `head` only",
                                choices=("all", "head"))
    finetune_loss: str = param("ce", "ce = plain cross-entropy; run = the run's `loss=`", choices=("ce", "run"))


def params_of(cfg: dict) -> PersonalizationParams:
    return PersonalizationParams(**{k: v for k, v in (cfg.get("personalization") or {}).items()})


def applies(algo_cls: type[ClientAlgorithm], cfg: dict) -> bool:
    """Does the shared fine-tuning apply (the method has no personalization step of its own, and it is on)?"""
    return algo_cls.personalization_stage(cfg) == "before" and params_of(cfg).finetune_epochs > 0


def budget(algo_cls: type[ClientAlgorithm], cfg: dict) -> dict:
    """What results.json records as the method's personalization budget."""
    if algo_cls.personalization_stage(cfg) == "after":
        options = {k: v for k, v in cfg["strategy"].items() if k != "name"}
        return {"step": "the method's own", "strategy_options": options}
    p = params_of(cfg)
    if p.finetune_epochs == 0:
        return {"step": "none (the received global model as is)"}
    return {"step": "shared fine-tuning (predictor `finetuned`)", "epochs": p.finetune_epochs, "lr": p.finetune_lr,
            "momentum": p.finetune_momentum, "parts": p.finetune_parts, "loss": p.finetune_loss}


def finetuned(algo: ClientAlgorithm, ctx: ClientContext) -> Predictor:
    """The shared fine-tuning: a copy of ``ctx.model`` trained on the client's data; the copy is returned."""
    p = params_of(ctx.cfg)
    model = copy.deepcopy(ctx.model).train()
    if p.finetune_parts == "head":
        if not hasattr(model, "head"):
            raise ValueError(f"personalization.finetune_parts=head: {type(model).__name__} has no `head`")
        params = list(model.head.parameters())
    else:
        params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=p.finetune_lr, momentum=p.finetune_momentum)
    loss = F.cross_entropy if p.finetune_loss == "ce" else algo.loss_fn(ctx)
    run_local_epochs(ctx.data, p.finetune_epochs, int(ctx.cfg["batch_size"]), ctx.generator,
                     supervised_step(model, opt, loss), ctx.device)
    return model.eval()
