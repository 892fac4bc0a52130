"""FedPer (Arivazhagan et al., 2019): a shared body trained and averaged as in FedAvg, and a personal head
(``head.*``) that stays on its client and is trained together with the body.

Personalized predictor: the shared body + the client's own head (a client never sampled yet still has the
common initial head). Generic predictor: there is no global head in FedPer; fedlt evaluates the global body
with ``averaged_head``, the sample-weighted average of the personal heads of the clients trained in that round
(each client copies its head there after training; it is averaged like any shared array, but no client ever
predicts with it or trains it). FedRep (strategies/fedrep.py) reuses all of this."""

from __future__ import annotations

import copy

from torch import nn

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import NoParams, ServerAlgorithm


class FedPerClient(ClientAlgorithm):
    personal_prefixes = ("head.",)
    dp_sgd_ready = True  # train = the base class's one local_epochs call + a copy of the head (privacy=dp_sgd)

    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        return "after"  # the personal head

    @staticmethod
    def build_model(base: nn.Module, cfg: dict) -> nn.Module:
        base.averaged_head = copy.deepcopy(base.head).requires_grad_(False)
        return base

    def train(self, ctx: ClientContext) -> dict[str, float]:
        metrics = super().train(ctx)  # body + personal head, jointly
        self.publish_head(ctx.model)
        return metrics

    def shared_features(self, model: nn.Module) -> nn.Module:
        """The shared body: the predictor (the whole model) is the personal head on its features
        (eval.personalized_path)."""
        return model.backbone

    def personal_heads(self, ctx: ClientContext):
        ctx.model.eval()
        return {"model": ctx.model.head}

    batched_ready = True  # client batching: the default batched step, then publish_head (batched_end)

    def batched_end(self, ctx: ClientContext) -> None:
        self.publish_head(ctx.model)

    @staticmethod
    def publish_head(model: nn.Module) -> None:
        """Copy the personal head into ``averaged_head`` (uploaded; averaged on the server for generic use)."""
        model.averaged_head.load_state_dict(model.head.state_dict())


class Server(ServerAlgorithm):
    client_cls = FedPerClient
    params = NoParams
    secagg_ready = True  # the aggregate is the plain sample-weighted mean (privacy.secagg)

    def generic_predictors(self, model: nn.Module):
        model.eval()
        return {"averaged_head": lambda x: model.averaged_head(model.features(x))}
