"""CReFF (Shang et al., IJCAI 2022; the procedure of the official code, github.com/shangxinyi/CReFF-FL).

* Clients train body + head with ordinary FedAvg. Before that, from the global model they received, each client
  computes per-class gradients of a separate classifier ``creff_head`` (the server's re-trained classifier,
  received with the global arrays) on the features of its own images: for every class it holds,
  ``grad_repeats`` draws of up to ``grad_images_per_class`` images (augmented like training batches; the
  official code uses DSA augmentation), body in eval mode, CE gradient w.r.t. the classifier's weight and bias,
  averaged over the draws. They travel in the train reply under the reserved ``creff.grad.*`` keys (dense
  K x K x d / K x K arrays + a K-vector saying which classes the client holds, so every reply has the same keys)
  and are removed before averaging.
* Server (``after_aggregate``): per class, the unweighted mean of the gradients of the clients holding it; then
  ``match_steps`` SGD steps (lr ``feature_lr``) on the **federated features** (``features_per_class`` per class,
  random at first, kept across rounds: server state) to minimise the gradient-matching distance (the official
  "ours" distance: sum over output rows of 1 - cosine) between the gradients those features induce on the same
  classifier and the clients' gradients; then a **fresh balanced linear classifier** is trained on the federated
  features (``retrain_epochs`` epochs, batch ``retrain_batch_size``, SGD lr ``retrain_lr``) and becomes the new
  ``creff_head`` sent to clients.
* Predictors (generic and personalized): ``creff`` = FedAvg body + re-trained classifier (primary) and ``fedavg``
  = FedAvg body + FedAvg head.

Defaults are the official ones (100 features/class, 100 matching steps, lr 0.1; 300 re-training epochs, lr 0.01,
batch 32; 10 x 32 images per class). Costs: each sampled client runs an extra forward-only pass over up to
10 x 32 images per class it holds (lower ``grad_repeats`` to make it cheaper); the server step takes about 1 s
per round on one CPU core for 10 classes (ResNet-8, d = 256) but ~1 min for 100 classes with d = 512 (18 s
matching, 40 s re-training: 300 x 313 SGD steps); ``retrain_epochs`` / ``match_steps`` trade it off.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Message
from torch import nn

from fedlt.config import param
from fedlt.data.augment import random_crop_flip
from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import ServerAlgorithm
from fedlt.seeding import derive_seed
from strategies._common import one_torch_thread, require_linear_head

GRAD = "creff.grad."  # reserved upload keys: weight (K, K, d), bias (K, K), present (K,)
HEAD = "creff_head."
CREFF_STREAM = 1001  # seed purpose of the server's federated features and re-training


def class_gradients(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Gradients of the mean CE of a linear classifier (weight K x d, bias K) w.r.t. weight and bias, for
    ``features`` (C, m, d) holding m samples of class c in row c: the closed form (softmax - onehot) f^T / m,
    differentiable w.r.t. the features. Returns (C, K, d) and (C, K)."""
    c, m, _ = features.shape
    probs = torch.softmax(features @ weight.T + bias, dim=-1)  # C, m, K
    err = probs - F.one_hot(torch.arange(c, device=features.device), weight.shape[0]).to(probs.dtype)[:, None, :]
    return torch.einsum("cmk,cmd->ckd", err, features) / m, err.mean(1)


def matching_distance(syn: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The official 'ours' distance summed over classes: per class, sum over the rows of 1 - cos(real, syn)
    (a bias gradient is a single row)."""
    dot = (syn * real).sum(-1)
    return (1 - dot / (syn.norm(dim=-1) * real.norm(dim=-1) + 1e-6)).sum()


class CReFFClient(ClientAlgorithm):
    extra_uploads = "per-class gradients of the classifier (CReFF's feature-matching input, ctx.uploads)"

    @staticmethod
    def build_model(base: nn.Module, cfg: dict) -> nn.Module:
        base.creff_head = copy.deepcopy(base.head).requires_grad_(False)  # set by the server, never trained here
        return base

    # client batching: the same upload from the received global model, computed before the cohort's batches are
    # drawn (so the client's generator is consumed in the same order as by train), then the default local SGD
    batched_ready = True

    def train(self, ctx: ClientContext) -> dict[str, float]:
        ctx.uploads.update(self.gradient_upload(ctx))  # from the received global body, before local training
        return super().train(ctx)

    def batched_begin(self, ctx: ClientContext) -> None:
        ctx.uploads.update(self.gradient_upload(ctx))

    def gradient_upload(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        model, data, s = ctx.model, ctx.data, ctx.strategy
        weight, bias = model.creff_head.weight.detach(), model.creff_head.bias.detach()
        k, d = weight.shape
        grad_w, grad_b = torch.zeros(k, k, d), torch.zeros(k, k)
        present = (data.train_counts > 0).float()
        plan = data.plan
        model.eval()
        with torch.no_grad():
            for c in torch.nonzero(present).flatten().tolist():
                idx = torch.nonzero(data.train_y == c).flatten()
                gw, gb = torch.zeros(k, d), torch.zeros(k)
                for _ in range(int(s["grad_repeats"])):
                    pick = idx[torch.randperm(len(idx), generator=ctx.generator)[: int(s["grad_images_per_class"])]]
                    x = data.normalise(data.train_x[pick])
                    if plan.augment_padding > 0 or plan.augment_hflip:
                        x = random_crop_flip(x, plan.augment_padding, plan.augment_hflip, ctx.generator)
                    f = model.features(x.to(ctx.device)).cpu()
                    w_c, b_c = class_gradients(f[None], weight.cpu(), bias.cpu())
                    gw += w_c[0]
                    gb += b_c[0]
                grad_w[c], grad_b[c] = gw / int(s["grad_repeats"]), gb / int(s["grad_repeats"])
        return {GRAD + "weight": grad_w, GRAD + "bias": grad_b, GRAD + "present": present}

    def predictors(self, ctx: ClientContext):
        model = ctx.model.eval()
        return {"creff": lambda x: model.creff_head(model.features(x)), "fedavg": model}


@dataclass(frozen=True)
class Params:
    features_per_class: int = param(100, "federated features per class (official 100)", lo=1)
    match_steps: int = param(100, "gradient-matching SGD steps per round (official match_epoch 100)", lo=0)
    feature_lr: float = param(0.1, "lr of the federated features (official)", lo=0.0, lo_open=True)
    retrain_epochs: int = param(300, "epochs of classifier re-training on the federated features per round "
                                     "(official 300)", lo=0)
    retrain_lr: float = param(0.01, "lr of the re-training (official)", lo=0.0, lo_open=True)
    retrain_batch_size: int = param(32, "batch size of the re-training (official: the local batch size, 32)", lo=1)
    grad_repeats: int = param(10, "client: draws per class whose gradients are averaged (official 10)", lo=1)
    grad_images_per_class: int = param(32, "client: images per class per draw (official batch_real 32)", lo=1)


class Server(ServerAlgorithm):
    client_cls = CReFFClient
    params = Params

    @staticmethod
    def validate_config(cfg: dict) -> None:
        require_linear_head(cfg, "CReFF's gradients and re-trained classifier are those of a linear head (weight "
                                 "and bias)")

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.federated_features: torch.Tensor | None = None  # (K * features_per_class, d)
        self.sent_head: tuple[torch.Tensor, torch.Tensor] | None = None
        self.round_gradients: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ---------------------------------------------------------------------------------- aggregation
    def aggregate(self, server_round: int, sent: ArrayRecord, replies: list[Message]) -> ArrayRecord | None:
        """Take the class gradients out of the replies (and remember the classifier they were computed on),
        then average the rest as FedAvg does."""
        self.sent_head = (torch.from_numpy(np.array(sent[HEAD + "weight"].numpy())),
                          torch.from_numpy(np.array(sent[HEAD + "bias"].numpy())))
        self.round_gradients = pop_class_gradients(replies)
        return super().aggregate(server_round, sent, replies)

    # ------------------------------------------------------------------------------- server step
    def after_aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        if self.round_gradients is None or self.sent_head is None:
            return arrays
        grad_w, grad_b, held = self.round_gradients
        self.round_gradients = None
        with one_torch_thread():
            self.match_features(*self.sent_head, grad_w, grad_b, held)
            head = self.retrain_classifier(server_round)
        out = dict(arrays.items())
        out[HEAD + "weight"] = Array(head.weight.detach().numpy().copy())
        out[HEAD + "bias"] = Array(head.bias.detach().numpy().copy())
        return ArrayRecord(out)

    def feature_labels(self, num_classes: int) -> torch.Tensor:
        return torch.arange(num_classes).repeat_interleave(int(self.cfg["strategy"]["features_per_class"]))

    def match_features(self, weight: torch.Tensor, bias: torch.Tensor, grad_w: torch.Tensor, grad_b: torch.Tensor,
                       held: torch.Tensor) -> float:
        """Gradient matching on the federated features; returns the final matching distance."""
        s = self.cfg["strategy"]
        k, d = weight.shape
        m = int(s["features_per_class"])
        if self.federated_features is None:
            g = torch.Generator().manual_seed(derive_seed(int(self.cfg["seed"]), CREFF_STREAM, 0))
            self.federated_features = torch.randn(k * m, d, generator=g)
        feats = self.federated_features.clone().requires_grad_(True)
        opt = torch.optim.SGD([feats], lr=float(s["feature_lr"]))
        loss = torch.tensor(0.0)
        if held.any():
            for _ in range(int(s["match_steps"])):
                syn_w, syn_b = class_gradients(feats.view(k, m, d), weight, bias)
                loss = (matching_distance(syn_w[held], grad_w[held])
                        + matching_distance(syn_b[held][:, None], grad_b[held][:, None]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.federated_features = feats.detach()
        return float(loss.detach())

    def fresh_classifier(self, server_round: int, feature_dim: int, num_classes: int) -> nn.Linear:
        """The re-training's starting point: a newly initialised Linear layer (seeded by round), as officially."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(int(self.cfg["seed"]), CREFF_STREAM, server_round))
            return nn.Linear(feature_dim, num_classes)

    def retrain_classifier(self, server_round: int) -> nn.Linear:
        """A fresh linear classifier trained on the (class-balanced) federated features."""
        s = self.cfg["strategy"]
        feats = self.federated_features
        k = self.sent_head[0].shape[0]
        labels = self.feature_labels(k)
        head = self.fresh_classifier(server_round, feats.shape[1], k)
        g = torch.Generator().manual_seed(derive_seed(int(self.cfg["seed"]), CREFF_STREAM, server_round))
        lr, batch = float(s["retrain_lr"]), int(s["retrain_batch_size"])
        weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
        onehot = F.one_hot(labels, k).to(feats.dtype)
        with torch.no_grad():  # plain SGD on mean CE, with the closed-form gradient (~10x faster than autograd)
            for _ in range(int(s["retrain_epochs"])):
                perm = torch.randperm(len(labels), generator=g)
                for start in range(0, len(perm), batch):
                    idx = perm[start:start + batch]
                    x = feats[idx]
                    err = torch.softmax(x @ weight.T + bias, dim=1) - onehot[idx]
                    weight -= lr * (err.T @ x) / len(idx)
                    bias -= lr * err.mean(0)
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        return head

    # ------------------------------------------------------------------------------- evaluation
    def generic_predictors(self, model: nn.Module):
        model.eval()
        return {"creff": lambda x: model.creff_head(model.features(x)), "fedavg": model}

    def server_state(self) -> dict:
        return {} if self.federated_features is None else {"federated_features": self.federated_features.clone()}

    def load_server_state(self, state: dict) -> None:
        if "federated_features" in state:
            self.federated_features = torch.as_tensor(state["federated_features"]).clone()


def pop_class_gradients(replies: list[Message]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Remove the ``creff.grad.*`` arrays from the replies (so that averaging sees only model arrays) and return
    the per-class gradients averaged over the clients that hold each class, and which classes any client held."""
    grads = []
    for r in replies:
        rec = r.content["arrays"]
        keys = [k for k in rec.keys() if k.startswith(GRAD)]
        if keys:
            grads.append({k[len(GRAD):]: torch.from_numpy(np.array(rec[k].numpy())) for k in keys})
            for k in keys:
                del rec[k]
    if not grads:
        return None
    present = torch.stack([g["present"] for g in grads])  # clients x K
    count = present.sum(0)
    weight = sum(p[:, None, None] * g["weight"] for p, g in zip(present, grads, strict=True))
    bias = sum(p[:, None] * g["bias"] for p, g in zip(present, grads, strict=True))
    held = count > 0
    denom = count.clamp(min=1)
    return weight / denom[:, None, None], bias / denom[:, None], held
