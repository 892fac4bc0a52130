"""Ditto (Li et al., 2021): every client keeps a full personal model v (in its persistent state, ``ctx.state``)
besides training the global model w exactly as FedAvg does.

Each time a client is sampled it first trains v for ``strategy.personal_epochs`` epochs (null = local_epochs)
on loss(v) + lambda/2 * ||v - w||^2, with w the global model it just received, then trains w as in FedAvg and
uploads w only. A client's v starts as the global model the first time it is sampled; a client never sampled
predicts with the global model. Personalized predictor: v. Generic predictor: w. Client loss: ``loss=``.

Client batching: the same two phases (``batched_phases``): v from the client's own state (else the received w)
with the proximal term, whose anchor w travels in the client's terms, then w from the received model
(``batched_phase_start`` keeps the trained v in ``ctx.state`` between them)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from fedlt.config import param
from fedlt.api.client import PHASE, ClientAlgorithm, ClientContext
from fedlt.api.server import ServerAlgorithm

PERSONAL = "personal_model."  # key prefix of v in ctx.state


ANCHOR = "ditto.anchor."  # client batching: the received w's trainable arrays among a client's terms


def _array(model: nn.Module, name: str) -> torch.Tensor:
    """``model``'s array ``name`` as the module holds it now (under ``functional_call``: the client's tensor,
    which ``get_parameter`` refuses because it is not an ``nn.Parameter``)."""
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr)


class DittoClient(ClientAlgorithm):
    batched_ready = True  # client batching: two phases (v with the proximal term, then w), see the hooks below

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

    # ------------------------------------------------------------- client batching (backend.client_batching)
    def batched_phases(self, model: nn.Module, cfg: dict):
        epochs = cfg["strategy"].get("personal_epochs")
        personal = int(cfg["local_epochs"] if epochs is None else epochs)
        return [(personal, self.batched_groups(model, cfg)), (int(cfg["local_epochs"]), self.batched_groups(model, cfg))]

    def batched_phase_start(self, ctx: ClientContext, phase: int, start: dict, previous: dict) -> dict:
        if phase == 0:  # v: the client's personal model, or the received w the first time
            saved = {k[len(PERSONAL):]: v for k, v in ctx.state.items() if k.startswith(PERSONAL)}
            return saved or start
        ctx.state.update({PERSONAL + k: v.detach().clone() for k, v in previous.items()})  # v as trained
        return start  # then w from the received global model, as FedAvg

    def batched_terms(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        anchor = {ANCHOR + n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
        return {**super().batched_terms(ctx), **anchor}

    def batched_loss(self, model, x, y, weight, terms):
        loss, metrics = super().batched_loss(model, x, y, weight, terms)
        lam = float(self.cfg["strategy"]["lam"])
        if lam > 0:  # the proximal term on v (phase 0) only
            prox = sum(((_array(model, k[len(ANCHOR):]) - w) ** 2).sum() for k, w in terms.items()
                       if k.startswith(ANCHOR))
            loss = loss + (terms[PHASE] == 0).to(loss.dtype) * 0.5 * lam * prox
        return loss, {**metrics, "train/loss": loss}

    def batched_metrics(self, phases: list[dict[str, float]]) -> dict[str, float]:
        own, glob = phases
        return {**glob, "train/personal_loss": own.get("train/loss", 0.0)}

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
