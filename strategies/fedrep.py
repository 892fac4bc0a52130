"""FedRep (Collins et al., 2021): FedPer's split (shared body, personal ``head.*``) with an alternating local
schedule: first ``strategy.head_epochs`` epochs train the personal head with the body frozen, then
``strategy.body_epochs`` epochs (null = ``local_epochs``) train the body with the head frozen; only the body is
averaged. The paper uses 10 head epochs; the default here (1) keeps a round's cost close to FedAvg's.
Generic predictor and personal state as in FedPer (strategies/fedper.py)."""

from __future__ import annotations

from fedlt.config import check_int
from fedlt.federation.algorithm import ClientContext
from strategies.fedper import FedPerClient
from strategies.fedper import Server as FedPerServer


class FedRepClient(FedPerClient):
    def train(self, ctx: ClientContext) -> dict[str, float]:
        s, model = ctx.strategy, ctx.model
        body_epochs = ctx.cfg["local_epochs"] if s.get("body_epochs") is None else s["body_epochs"]
        model.train()
        head = self.train_only(ctx, model.head, int(s["head_epochs"]))
        body = self.train_only(ctx, model.backbone, int(body_epochs))
        self.publish_head(model)
        return {"train/loss": body["train/loss"] if body["train/steps"] else head["train/loss"],
                "train/head_loss": head["train/loss"], "train/steps": head["train/steps"] + body["train/steps"]}

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


class Server(FedPerServer):
    client_cls = FedRepClient

    @staticmethod
    def validate_config(cfg: dict) -> None:
        check_int(cfg, "strategy.head_epochs", 0)
        if cfg["strategy"].get("body_epochs") is not None:
            check_int(cfg, "strategy.body_epochs", 0)
