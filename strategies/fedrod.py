"""FedRoD (Chen & Chao, ICLR 2022), the paper's form (as PFLlib implements it: TsingZ0/PFLlib,
``system/flcore/clients/clientrod.py``).

One body, two heads. Per local batch, with f = body(x):
  * generic: the body and the generic head ``head`` minimise the balanced softmax CE(head(f) + log n, y) on the
    client's own class counts n (fedlt.train.losses.balanced_softmax); both are averaged as in FedAvg;
  * personal: ``personal_head`` (kept per client, never uploaded) sits on the *detached* features and
    minimises CE(head(f).detach() + personal_head(f.detach()), y); it does not train the body.
FL-bench differs: its personal head trains on its own logits and both losses reach the body; we keep the paper's.
The optional hypernetwork for unseen clients is not implemented.

Predictors: personalized ``personal`` = generic + personal logits (primary) and ``generic_head`` = the generic
head alone on the client's test; generic = body + generic head. The loss is defined by the method, so
``loss=`` must stay ``ce``."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import NoParams, ServerAlgorithm
from fedlt.train.local import run_local_epochs, sgd
from fedlt.train.losses import balanced_softmax, loss_terms, masked_loss
from strategies._common import require_ce


class FedRoDClient(ClientAlgorithm):
    personal_prefixes = ("personal_head.",)

    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        return "after"  # the personal head

    @staticmethod
    def build_model(base: nn.Module, cfg: dict) -> nn.Module:
        base.personal_head = copy.deepcopy(base.head)
        return base

    def train(self, ctx: ClientContext) -> dict[str, float]:
        model = ctx.model.train()
        generic_loss = balanced_softmax(ctx.data.train_counts.float())
        opt = sgd([p for p in model.parameters() if p.requires_grad], ctx.cfg["optimizer"])

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            opt.zero_grad(set_to_none=True)
            f = model.features(x)
            generic = model.head(f)
            personal = model.personal_head(f.detach())
            loss = generic_loss(generic, y) + F.cross_entropy(generic.detach() + personal, y)
            loss.backward()
            opt.step()
            return loss.detach().item()

        return run_local_epochs(ctx.data, int(ctx.cfg["local_epochs"]), int(ctx.cfg["batch_size"]), ctx.generator,
                                step, ctx.device)

    # client batching (backend.client_batching): the same step, for all clients at once
    batched_ready = True

    def batched_terms(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        return loss_terms({"name": "balanced_softmax"}, ctx.data.train_counts.float())

    def batched_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                     terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f = model.features(x)
        generic = model.head(f)
        personal = model.personal_head(f.detach())
        loss = masked_loss(terms, generic, y, weight) + masked_loss({}, generic.detach() + personal, y, weight)
        return loss, {"train/loss": loss}

    def predictors(self, ctx: ClientContext):
        model = ctx.model.eval()

        def personal(x: torch.Tensor) -> torch.Tensor:
            f = model.features(x)
            return model.head(f) + model.personal_head(f)

        return {"personal": personal, "generic_head": model}

    def shared_features(self, model: nn.Module) -> nn.Module:
        """The body: both predictors are heads on its features (eval.personalized_path)."""
        return model.backbone

    def personal_heads(self, ctx: ClientContext):
        model = ctx.model.eval()
        return {"personal": lambda f: model.head(f) + model.personal_head(f), "generic_head": model.head}


class Server(ServerAlgorithm):
    client_cls = FedRoDClient
    params = NoParams
    secagg_ready = True  # the aggregate is the plain sample-weighted mean (privacy.secagg)

    @staticmethod
    def validate_config(cfg: dict) -> None:
        require_ce(cfg, "FedRoD trains its generic head with balanced softmax and its personal head with CE")

