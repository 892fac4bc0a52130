"""FedETF (Li et al., ICCV 2023; the official code's design, fedloge-protocol.md §10.3).

Model: body -> learnable projection (Linear d -> K) -> L2 normalisation -> logits s * h^T M, with M a fixed
K x K simplex ETF (unit-norm class prototypes, pairwise cosine -1/(K-1)) and s a learnable scalar temperature
(initialised to 1). M is built on the server from the run seed and sent once (``frozen_prefixes``); it is never
trained or uploaded during FL. Local loss: balanced softmax on the client's counts
(fedlt.train.losses.balanced_softmax). Body, projection and s are averaged as in FedAvg.

Personalization (official: after FL, 20 alternating cycles of 3 epochs on the prototypes, SGD lr 0.1, then 3
epochs on the projection, lr 0.05, momentum 0.9, wd 5e-4, both with CE, body frozen): before every local test,
a copy of the global model is fine-tuned with ``strategy.finetune_cycles`` cycles of ``proto_epochs`` +
``proj_epochs`` (1 x (1 + 1) by default, to keep evaluation cheap; set 20/3/3 for the official schedule).
Personalized predictors: ``finetuned`` (primary) and ``global``; generic: the global model."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.config import check_float, check_int
from fedlt.federation.algorithm import ClientAlgorithm, ClientContext
from fedlt.federation.strategy import FedLTStrategy
from fedlt.seeding import INIT, derive_seed
from fedlt.train.local import run_local_epochs, sgd, supervised_step
from fedlt.train.losses import balanced_softmax
from strategies._common import require_ce

ETF_STREAM = 1  # sub-stream of INIT that draws the ETF's random rotation


def simplex_etf(num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """K x K simplex ETF: sqrt(K/(K-1)) * U (I - 11^T/K) with U a random orthogonal matrix (QR of a uniform
    random matrix, as the official code); column c is the prototype of class c."""
    k = num_classes
    u, _ = torch.linalg.qr(torch.rand(k, k, generator=generator, dtype=torch.float64))
    centred = torch.eye(k, dtype=torch.float64) - torch.full((k, k), 1.0 / k, dtype=torch.float64)
    return (math.sqrt(k / (k - 1)) * u @ centred).float()


class SimplexETF(nn.Module):
    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        self.prototypes = nn.Parameter(prototypes, requires_grad=False)  # trainable only in fine-tuning copies


class ETFClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, etf: torch.Tensor):
        super().__init__()
        self.backbone = backbone
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.projection = nn.Linear(feature_dim, num_classes)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.etf = SimplexETF(etf)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.normalize(self.projection(self.backbone(x)), dim=1)
        return self.scale * (h @ self.etf.prototypes)


class FedETFClient(ClientAlgorithm):
    frozen_prefixes = ("etf.",)

    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        return "after" if int(cfg["strategy"]["finetune_cycles"]) > 0 else "before"

    @staticmethod
    def build_model(base: nn.Module, cfg: dict) -> nn.Module:
        g = torch.Generator().manual_seed(derive_seed(int(cfg["seed"]), INIT, ETF_STREAM))
        return ETFClassifier(base.backbone, base.feature_dim, base.num_classes, simplex_etf(base.num_classes, g))

    def loss_fn(self, ctx: ClientContext):
        return balanced_softmax(ctx.data.train_counts.float())

    def predictors(self, ctx: ClientContext):
        ctx.model.eval()
        s = ctx.strategy
        if int(s["finetune_cycles"]) <= 0:
            return {"global": ctx.model}
        tuned = copy.deepcopy(ctx.model)
        tuned.requires_grad_(False)
        tuned.train()
        tuned.backbone.eval()  # the body is frozen: keep its BatchNorm statistics too
        proto_opt = sgd([tuned.etf.prototypes], {"lr": float(s["proto_lr"])})
        proj_opt = sgd(list(tuned.projection.parameters()),
                       {"lr": float(s["proj_lr"]), "momentum": 0.9, "weight_decay": 5e-4})
        batch = int(ctx.cfg["batch_size"])
        for _ in range(int(s["finetune_cycles"])):
            for params, opt, epochs in (([tuned.etf.prototypes], proto_opt, s["proto_epochs"]),
                                        (list(tuned.projection.parameters()), proj_opt, s["proj_epochs"])):
                for p in params:
                    p.requires_grad_(True)
                run_local_epochs(ctx.data, int(epochs), batch, ctx.generator,
                                 supervised_step(tuned, opt, F.cross_entropy), ctx.device)
                for p in params:
                    p.requires_grad_(False)
        return {"finetuned": tuned.eval(), "global": ctx.model}


class Server(FedLTStrategy):
    client_cls = FedETFClient

    @staticmethod
    def validate_config(cfg: dict) -> None:
        require_ce(cfg, "FedETF trains with balanced softmax on local counts")
        for key in ("finetune_cycles", "proto_epochs", "proj_epochs"):
            check_int(cfg, f"strategy.{key}", 0)
        check_float(cfg, "strategy.proto_lr", 0.0, lo_open=True)
        check_float(cfg, "strategy.proj_lr", 0.0, lo_open=True)
