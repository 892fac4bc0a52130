"""MOON (Li, He & Song, CVPR 2021, "Model-Contrastive Federated Learning"): FedAvg whose local loss adds a
model-contrastive term pulling the local representation towards the global model's and away from the client's
previous local model's.

Per local batch, with z = the local model's representation, z_glob = the received global model's and z_prev = the
client's previous local model's (both frozen, in eval mode, as officially):
``loss(head(z), y) + mu * CE([cos(z, z_glob), cos(z, z_prev)] / temperature, 0)``, i.e.
-log(exp(cos(z, z_glob)/T) / (exp(cos(z, z_glob)/T) + exp(cos(z, z_prev)/T))), averaged over the batch. The
previous local model is the client's own model at the end of its last training round, kept in its state
(``ctx.state``, ``moon.prev.*``: a full model copy per client, checkpointed). A client training for the first time
has no previous model: its logits row is [cos(z, z_glob)] alone and the term is 0, as in the official code's first
round (its model pool starts empty). Aggregation: sample-weighted FedAvg (official ``fed_avg_freqs``).

The network (official ``ModelFedCon``): backbone -> projection head Linear(d, d), ReLU, Linear(d, out) -> the
configured head on the projection; z is the projection. ``projection_dim: 0`` drops the projection head and
contrasts the backbone features under the run's usual head (as FL-bench and PFLlib do).

Checked against the official code, QinbinLi/MOON at commit 8fcba3c4efc9a47eb24687a91ba94cfb2005103f:
``main.py`` ``train_net_fedcon`` (the loss) and the ``moon`` branch of ``__main__`` (global model and model pool
in eval mode, FIFO pool of previous local models, weighted averaging), ``model.py`` ``ModelFedCon``. Defaults are
the official ones for CIFAR-10: ``mu`` 5 (README example and paper for CIFAR-10; ``main.py``'s argparse default is
1, the paper's CIFAR-100 / Tiny-ImageNet value), ``temperature`` 0.5, ``projection_dim`` 256 (``out_dim``).

Deviations: only ``model_buffer_size = 1`` (the official default and the paper's main setting; one previous model,
not a pool of several); a client never sampled before contributes no negative (officially, with partial
participation, it would contrast against its untrained initial network from round 2 on). Uploads besides
weights: none.

Client batching (``backend.client_batching``): ``batched_terms`` carries each client's two frozen models (the
received global state and its previous local model, or the global state with ``has_prev`` 0 for a first-time
client) as per-client tensors, so the vmapped ``batched_loss`` runs both through the same network with
``functional_call`` in eval mode; the contrastive term is the same per-sample cross-entropy over two logits,
multiplied by ``has_prev`` (exactly 0 where the sequential row has a single logit). Memory: two extra model
copies per client of the cohort.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedlt.api.client import ClientContext
from fedlt.config import param
from fedlt.models import build_head, head_name
from fedlt.train.local import run_local_epochs, sgd
from fedlt.train.losses import masked_loss
from strategies.fedavg import FedAvgClient, FedAvgParams
from strategies.fedavg import Server as FedAvgServer

PREV = "moon.prev."  # the client's previous local model (ctx.state)


class ProjectedClassifier(nn.Module):
    """backbone -> projection head -> head; ``features(x)`` is the projection (MOON's representation)."""

    def __init__(self, base: nn.Module, out_dim: int, head: str):
        super().__init__()
        d = int(base.feature_dim)
        self.backbone = base.backbone
        self.projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, out_dim))
        self.head = build_head(head, out_dim, int(base.num_classes))
        self.feature_dim, self.num_classes = out_dim, int(base.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def contrastive_loss(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor | None,
                     temperature: float) -> torch.Tensor:
    """MOON's model-contrastive loss, mean over the batch: the global representation is the positive, the previous
    local one (if any) the negative."""
    logits = [F.cosine_similarity(z, z_glob, dim=-1)]
    if z_prev is not None:
        logits.append(F.cosine_similarity(z, z_prev, dim=-1))
    logits = torch.stack(logits, dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


def frozen_copy(model: nn.Module, state: dict | None = None) -> nn.Module:
    other = copy.deepcopy(model)
    if state is not None:
        other.load_state_dict(state)
    return other.eval().requires_grad_(False)


_GLOBAL, _PREVIOUS, _HAS_PREV = "moon.global.", "moon.previous.", "moon.has_prev"  # batched_terms keys


class _Features(nn.Module):
    """``model.features`` as a module, so that ``functional_call`` runs it with a frozen model's state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class MOONClient(FedAvgClient):
    batched_ready = True  # client batching: batched_terms / batched_loss / batched_end below
    @staticmethod
    def build_model(base: nn.Module, cfg: dict) -> nn.Module:
        dim = int(cfg["strategy"]["projection_dim"])
        return ProjectedClassifier(base, dim, head_name(cfg.get("model"))) if dim > 0 else base

    def train(self, ctx: ClientContext) -> dict[str, float]:
        s = ctx.strategy
        mu, temperature = float(s["mu"]), float(s["temperature"])
        model = ctx.model.train()
        glob = frozen_copy(model)  # the received global model
        saved = {k[len(PREV):]: v for k, v in ctx.state.items() if k.startswith(PREV)}
        prev = frozen_copy(model, saved) if saved else None
        opt = sgd([p for p in model.parameters() if p.requires_grad], ctx.cfg["optimizer"])
        loss_fn = self.loss_fn(ctx)
        con_total = [0.0]

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            opt.zero_grad(set_to_none=True)
            z = model.features(x)
            loss = loss_fn(model.head(z), y)
            with torch.no_grad():
                z_glob = glob.features(x)
                z_prev = prev.features(x) if prev is not None else None
            con = contrastive_loss(z, z_glob, z_prev, temperature)
            loss = loss + mu * con
            loss.backward()
            opt.step()
            con_total[0] += con.detach().item()
            return loss.detach().item()

        metrics = run_local_epochs(ctx.data, int(ctx.cfg["local_epochs"]), int(ctx.cfg["batch_size"]), ctx.generator,
                                   step, ctx.device)
        ctx.state.clear()
        ctx.state.update({PREV + k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        return {**metrics, "train/contrastive_loss": con_total[0] / max(metrics["train/steps"], 1.0)}

    # ------------------------------------------------------------- client batching (backend.client_batching)
    def batched_terms(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        terms = super().batched_terms(ctx)
        glob = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        saved = {k[len(PREV):]: v for k, v in ctx.state.items() if k.startswith(PREV)}
        terms.update({_GLOBAL + k: v for k, v in glob.items()})
        terms.update({_PREVIOUS + k: v for k, v in (saved or glob).items()})  # same keys for every client
        terms[_HAS_PREV] = torch.tensor(1.0 if saved else 0.0)
        return terms

    def batched_loss(self, model, x, y, weight, terms):
        s = self.cfg["strategy"]
        mu, temperature = float(s["mu"]), float(s["temperature"])
        z = model.features(x)
        loss = masked_loss(terms, model.head(z), y, weight)
        features = _Features(model)

        def frozen(prefix: str) -> torch.Tensor:
            state = {"model." + k[len(prefix):]: v for k, v in terms.items() if k.startswith(prefix)}
            return functional_call(features, state, (x,)).detach()

        model.eval()  # the frozen models run in eval mode (BatchNorm on their running statistics), as in train
        z_glob, z_prev = frozen(_GLOBAL), frozen(_PREVIOUS)
        model.train()
        pos = F.cosine_similarity(z, z_glob, dim=-1) / temperature
        neg = F.cosine_similarity(z, z_prev, dim=-1) / temperature
        per_sample = torch.logsumexp(torch.stack([pos, neg], 1), 1) - pos  # CE of the logits [pos, neg], target 0
        con = terms[_HAS_PREV] * (per_sample * weight).sum() / weight.sum()
        return loss + mu * con, {"train/loss": loss + mu * con, "train/contrastive_loss": con}

    def batched_end(self, ctx: ClientContext) -> None:
        ctx.state.clear()
        ctx.state.update({PREV + k: v.detach().cpu().clone() for k, v in ctx.model.state_dict().items()})


@dataclass(frozen=True)
class Params(FedAvgParams):
    mu: float = param(5.0, "weight of the model-contrastive term (official CIFAR-10: 5; CIFAR-100: 1)", lo=0.0)
    temperature: float = param(0.5, "temperature of the contrastive logits (official 0.5)", lo=0.0, lo_open=True)
    projection_dim: int = param(256, "output width of the projection head (official out_dim 256); 0 = no "
                                     "projection head, contrast the backbone features", lo=0)


class Server(FedAvgServer):
    client_cls = MOONClient
    params = Params
    secagg_ready = True  # the aggregate is the plain sample-weighted mean (privacy.secagg)
