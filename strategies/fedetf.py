"""FedETF (Li et al., ICCV 2023, "No Fear of Classifier Biases: Neural Collapse Inspired Federated Learning with
Synthetic and Fixed Classifier").

Model: body -> learnable projection (Linear d -> K) -> L2 normalisation -> logits s * h^T M, with M a fixed
K x K simplex ETF (unit-norm class prototypes, pairwise cosine -1/(K-1)) and s a learnable scalar temperature
(initialised to 1). M is built on the server from the run seed and sent once (``frozen_prefixes``); it is never
trained or uploaded during FL. Local loss: balanced softmax CE(z + log n_c, y) on the client's counts, with an
absent class counted as 1 (log-prior 0, so it keeps its share of the softmax). Body, projection and s are
averaged as in FedAvg. The configured ``model.head`` is not used (the ETF is the classifier), so only
``model.head=linear`` (the default) is accepted.

Personalization (``finetuned``, primary; ``global`` = the received global model), on a copy of the global model
before every local test, in the official order:
1. one extra local round of ``strategy.extra_epochs`` epochs (null = ``local_epochs``, the official E) of FedETF
   training: balanced softmax, the run's optimiser, body + projection + s trained;
2. ``strategy.finetune_cycles`` alternating cycles of ``proto_epochs`` epochs on the ETF prototypes (SGD
   ``proto_lr``, no momentum) and ``proj_epochs`` epochs on the projection (SGD ``proj_lr`` with the run's
   ``optimizer.momentum`` and ``optimizer.weight_decay``), both with CE, everything else frozen, a new optimiser
   for every phase of every cycle.
The whole copy stays in train mode throughout (BatchNorm statistics follow the local data), as officially.

Checked against the official code, ZexiLee/ICCV-2023-FedETF at commit 092ace3471d0489c432fcde811ed7b7081042720:
``models_dict/proto_classifiers.py`` (``Proto_Classifier``: sqrt(K/(K-1)) P (I - 11^T/K), P from the QR of a
uniform random matrix), ``models_dict/resnet.py`` (``linear_proto``, L2 normalisation, ``scaling_train`` = 1),
``nodes.py`` (``generate_sample_per_class``: ``torch.where(sample_per_class > 0, sample_per_class, 1)``),
``client_funct.py`` (``balanced_softmax_loss``, ``client_fedetf``; ``Client_personalization``: ``Client_update``
-- one round of E epochs with balanced softmax for every client -- then ``for _ in range(20)``: 3 epochs on
``proto`` with SGD lr 0.1, 3 epochs on ``linear_proto`` with SGD lr 0.05, ``momentum=args.momentum``,
``weight_decay=args.local_wd_rate``, CE), ``args.py`` (lr 0.04, momentum 0.9, wd 5e-4, batch 128) and ``main.py``
(E = 3, 200 rounds, personalization once after the last round).

Deviations:
* budget: the default fine-tuning is 1 x (1 + 1) epochs after the extra round, to keep evaluation cheap on a CPU;
  the official schedule is ``strategy.finetune_cycles=20 strategy.proto_epochs=3 strategy.proj_epochs=3`` (use it
  with the 500-round presets, e.g. ``experiment=fedloge_cifar10_a0.5_if100 strategy=fedetf``);
* when: the official code personalizes once, after the last round; fedlt personalizes a fresh copy before every
  evaluation (``eval.every``), so each evaluation costs the fine-tuning budget per client (set
  ``eval.every=0`` to personalize only after the last round, as officially);
* the official clients keep one SGD optimiser (and its momentum) for the whole run and reuse it in the extra
  round; fedlt re-creates the run's optimiser every round, as for every method;
* the ETF is K x K as the official ``Proto_Classifier(num_classes, num_classes)``; its random rotation is drawn
  from the run seed (``ETF_STREAM``) instead of NumPy's global state."""

from __future__ import annotations

import copy
from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.config import param
from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import ServerAlgorithm
from fedlt.seeding import INIT, derive_seed
from fedlt.train.local import run_local_epochs, sgd, supervised_step
from fedlt.train.losses import balanced_softmax, loss_terms
from strategies._common import require_ce, require_linear_head

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


def floored_counts(counts: torch.Tensor) -> torch.Tensor:
    """The official balanced-softmax counts: a class the client does not hold counts as 1 (log-prior 0)."""
    return torch.as_tensor(counts, dtype=torch.float32).clamp(min=1.0)


def extra_epochs(cfg: dict) -> int:
    """Epochs of the extra local round before fine-tuning (``strategy.extra_epochs``; null = ``local_epochs``)."""
    e = cfg["strategy"].get("extra_epochs")
    return int(cfg["local_epochs"] if e is None else e)


class FedETFClient(ClientAlgorithm):
    frozen_prefixes = ("etf.",)

    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        return "after" if int(cfg["strategy"]["finetune_cycles"]) > 0 or extra_epochs(cfg) > 0 else "before"

    @staticmethod
    def build_model(base: nn.Module, cfg: dict) -> nn.Module:
        g = torch.Generator().manual_seed(derive_seed(int(cfg["seed"]), INIT, ETF_STREAM))
        return ETFClassifier(base.backbone, base.feature_dim, base.num_classes, simplex_etf(base.num_classes, g))

    def loss_fn(self, ctx: ClientContext):
        return balanced_softmax(floored_counts(ctx.data.train_counts))

    batched_ready = True  # client batching: the same balanced softmax as data (batched_terms)

    def batched_terms(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        return loss_terms({"name": "balanced_softmax"}, floored_counts(ctx.data.train_counts))

    def predictors(self, ctx: ClientContext):
        ctx.model.eval()
        s = ctx.strategy
        cycles, extra = int(s["finetune_cycles"]), extra_epochs(ctx.cfg)
        if cycles <= 0 and extra <= 0:
            return {"global": ctx.model}
        tuned = copy.deepcopy(ctx.model).train()  # train mode throughout, as officially
        if extra > 0:  # 1. one extra local round with balanced softmax (body, projection, s)
            self.local_epochs(ctx, tuned, [p for p in tuned.parameters() if p.requires_grad], epochs=extra)
        tuned.requires_grad_(False)
        batch, opt_cfg = int(ctx.cfg["batch_size"]), ctx.cfg["optimizer"]
        proj_cfg = {"lr": float(s["proj_lr"]), "momentum": float(opt_cfg.get("momentum", 0.0)),
                    "weight_decay": float(opt_cfg.get("weight_decay", 0.0))}
        phases = (([tuned.etf.prototypes], {"lr": float(s["proto_lr"])}, int(s["proto_epochs"])),
                  (list(tuned.projection.parameters()), proj_cfg, int(s["proj_epochs"])))
        for _ in range(cycles):  # 2. alternating prototype / projection fine-tuning with CE
            for params, opt_settings, epochs in phases:
                for p in params:
                    p.requires_grad_(True)
                opt = sgd(params, opt_settings)  # a new optimiser every phase, as officially
                run_local_epochs(ctx.data, epochs, batch, ctx.generator,
                                 supervised_step(tuned, opt, F.cross_entropy), ctx.device)
                for p in params:
                    p.requires_grad_(False)
        return {"finetuned": tuned.eval(), "global": ctx.model}


@dataclass(frozen=True)
class Params:
    extra_epochs: int | None = param(None, "epochs of the extra balanced-softmax local round before fine-tuning; "
                                           "null = local_epochs (official E); 0 = skip it", lo=0)
    finetune_cycles: int = param(1, "alternating fine-tuning cycles before each local test (official 20); 0 = none",
                                 lo=0)
    proto_epochs: int = param(1, "epochs on the ETF prototypes per cycle (official 3)", lo=0)
    proj_epochs: int = param(1, "epochs on the projection per cycle (official 3)", lo=0)
    proto_lr: float = param(0.1, "SGD lr for the prototypes (official; no momentum)", lo=0.0, lo_open=True)
    proj_lr: float = param(0.05, "SGD lr for the projection (official; with the run's momentum and weight decay)",
                           lo=0.0, lo_open=True)


class Server(ServerAlgorithm):
    client_cls = FedETFClient
    params = Params
    secagg_ready = True  # the aggregate is the plain sample-weighted mean (privacy.secagg)

    @staticmethod
    def validate_config(cfg: dict) -> None:
        require_ce(cfg, "FedETF trains with balanced softmax on local counts")
        require_linear_head(cfg, "FedETF replaces the configured head by its own classifier (projection, L2 "
                                 "normalisation and the fixed simplex ETF)")
