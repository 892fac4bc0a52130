"""FedRep (Collins et al., ICML 2021): FedPer's split (shared body, personal ``head.*``) with an alternating
local schedule: every round a client first trains its personal head with the body frozen, then the body with
the head frozen; only the body is averaged. Generic predictor and personal state as in FedPer
(strategies/fedper.py).

Schedule, checked against the official code, lgcollins/FedRep at commit
d82e62982e107bb3322541604f059c0ff28bd289 (``models/Update.py``, ``LocalUpdate.train``: ``head_eps = local_ep -
local_rep_ep``, the head epochs first; ``utils/options.py``: ``--local_ep 5 --local_rep_ep 1``;
``scripts/FedRep_cifar10_2shards.sh``: 11 / 1; ``scripts/FedRep_cifar100_20shards.sh``: 15 / 5), and FL-bench at
commit 06e658bca5af6ce732e25bb7c0f8be321e14a85e (``src/client/fedrep.py``: the body trains in the last
``train_body_epoch`` = 1 of the ``local_epoch`` epochs, the head in the others): a round has ``local_epochs``
epochs, ``strategy.body_epochs`` of them (the official ``local_rep_ep``, default 1) on the body and the rest,
``local_epochs - body_epochs``, on the head, so the head gets most of the epochs. ``strategy.head_epochs`` set to
a number overrides the head's share.

Deviations:
* at least one head epoch: with ``local_epochs <= body_epochs`` the official split gives the head no epoch at all
  (the personal head would stay at its initialisation); fedlt then trains the head for 1 epoch, so such a round
  costs ``body_epochs + 1`` epochs;
* the official run ends with an extra round in which every client fine-tunes its head (``main_fedrep.py``,
  ``last``: max(10, local_ep - local_rep_ep) head epochs); fedlt evaluates the heads as trained in the rounds
  (a client never sampled keeps the initial head);
* optimiser: the run's ``optimizer`` (the official scripts: SGD lr 0.01, momentum 0.5, weight decay 1e-4 on
  weights), re-created for each phase (the phases train disjoint parameters, so no state is lost).

Client batching: the same two phases (``batched_phases``: head epochs on ``head.*``, then body epochs on
``backbone.*``, fresh SGD state each, the clients' batch draws continuing from their generators)."""

from __future__ import annotations

from dataclasses import dataclass

from fedlt.api.client import ClientContext
from fedlt.config import param
from strategies.fedper import FedPerClient
from strategies.fedper import Server as FedPerServer


def schedule(strategy: dict, local_epochs: int) -> tuple[int, int]:
    """(head epochs, body epochs) of one local round: body = ``body_epochs``; head = ``head_epochs`` when set,
    else ``local_epochs - body_epochs`` (the official split), at least 1."""
    body = int(strategy["body_epochs"])
    head = strategy.get("head_epochs")
    head = max(int(local_epochs) - body, 1) if head is None else int(head)
    return head, body


def phase_metrics(head: dict[str, float], body: dict[str, float]) -> dict[str, float]:
    """A round's metrics from its head phase's and body phase's: the loss of the last phase that ran."""
    return {"train/loss": body["train/loss"] if body["train/steps"] else head["train/loss"],
            "train/head_loss": head["train/loss"], "train/steps": head["train/steps"] + body["train/steps"],
            "train/samples": head["train/samples"] + body["train/samples"]}


class FedRepClient(FedPerClient):
    batched_ready = True  # client batching: the two phases below, then publish_head (FedPer's batched_end)

    def train(self, ctx: ClientContext) -> dict[str, float]:
        model = ctx.model
        head_epochs, body_epochs = schedule(ctx.strategy, ctx.cfg["local_epochs"])
        model.train()
        head = self.train_only(ctx, model.head, head_epochs)
        body = self.train_only(ctx, model.backbone, body_epochs)
        self.publish_head(model)
        return phase_metrics(head, body)

    def batched_phases(self, model, cfg: dict):
        head_epochs, body_epochs = schedule(cfg["strategy"], cfg["local_epochs"])
        return [(head_epochs, [(("head.",), cfg["optimizer"])]), (body_epochs, [(("backbone.",), cfg["optimizer"])])]

    def batched_metrics(self, phases: list[dict[str, float]]) -> dict[str, float]:
        return phase_metrics(*phases)

    def train_only(self, ctx: ClientContext, part, epochs: int) -> dict[str, float]:
        """Local epochs on ``part``'s parameters only; every other parameter is frozen meanwhile."""
        model = ctx.model
        was = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        params = list(part.parameters())
        for p in params:
            p.requires_grad_(True)
        try:
            return self.local_epochs(ctx, model, params, epochs=epochs)
        finally:
            for p, flag in was.items():
                p.requires_grad_(flag)


@dataclass(frozen=True)
class Params:
    body_epochs: int = param(1, "epochs on the body per round, head frozen (official --local_rep_ep, default 1)", lo=0)
    head_epochs: int | None = param(None, "epochs on the personal head per round, body frozen; null = "
                                          "local_epochs - body_epochs (at least 1)", lo=0)


class Server(FedPerServer):
    client_cls = FedRepClient
    params = Params
    secagg_ready = True  # the aggregate is the plain sample-weighted mean (privacy.secagg)
