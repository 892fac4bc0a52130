"""FedProto (Tan et al., AAAI 2022, "FedProto: Federated Prototype Learning across Heterogeneous Clients"): no model
weights are shared; clients exchange class prototypes (mean feature vectors) only.

* Every client keeps its whole model (``personal_prefixes = ("",)``; it starts from the run's common initial
  model). Per local batch, with f = backbone features: ``loss(head(f), y) + lamda * MSE(f, target)``, where a
  sample's target is the global prototype of its class, or its own (detached) feature when that class has no
  global prototype yet (no pull, but it still counts in the mean) -- the official ``update_weights_het``.
* Upload: the client's local prototypes, the per-class means of the features of its last local epoch's batches
  (computed in training mode during that epoch, as officially) -- ``fedproto.proto`` (K x d, zero rows for classes
  it has not seen) and ``fedproto.count`` (K: how many features each mean averages).
* Server: per class, the average of the local prototypes of the clients that hold it (``proto_weighting``:
  ``counts`` weights each by its count |D_ij| / N_j, the paper's Eq. (6) -- whose further factor 1/|N_j| would
  shrink a prototype by the number of clients holding its class; no implementation applies it, nor does this
  one; ``uniform`` is the official code's plain mean).
  The global prototypes are server state (checkpointed) and go to every client with every train and evaluate
  message (``round_arrays``: ``fedproto.global``, K x d, and ``fedproto.present``, K).
* Predictors (stage "after", the client's own model): ``proto`` (primary; the paper's "prototype-based model
  inference", argmin_j ||f(x) - C^(j)||) = the nearest global prototype (logits
  = minus the mean squared distance, as the official evaluation's ``MSELoss``; classes without a global prototype
  get a logit of -1e9) and ``model`` = the client's own classifier. Generic: not applicable (there is no global
  model); ``generic/accuracy`` is null, as for ``local``.

Checked against the official code, yuetan031/fedproto at commit 97e42e2741e1ae2e2fce2465e80f38f6997f8836:
``lib/update.py`` ``LocalUpdate.update_weights_het`` (loss and prototype collection) and
``test_inference_new_het_lt`` (both predictors), ``lib/utils.py`` ``agg_func`` / ``proto_aggregation``,
``exps/federated_main.py`` ``FedProto_taskheter``. Default ``lamda`` 0.1 is the official CIFAR-10 command
(README, with ``--local_bs 32``); ``options.py``'s default ``ld`` 1 is used for MNIST / FEMNIST (and by FL-bench).

Deviations: ``proto_weighting: counts`` (the paper's Eq. (6)) is the default, whereas the official code, FL-bench
and PFLlib average uniformly (``proto_weighting: uniform``); with client sampling, a class no sampled client
holds keeps its previous global prototype (the official code trains every client every round, so a class never
goes missing there); the ``proto`` predictor scores every class with a global prototype, not only the client's
training classes (fedlt's masked / unmasked variants restrict classes the same way for every method); the
official CIFAR-10 run starts from ImageNet-pretrained ResNet-18 weights, fedlt from the run's initial model.
Uploads besides weights (there are no weights): per-class mean features and per-class counts of the last epoch,
i.e. the client's label histogram.

Client batching: the pull is a loss term (the received prototypes and a 0/1 "pull" flag as per-client terms;
``torch.where`` instead of boolean indexing), and ``batched_loss`` returns each batch's per-class feature sums
and counts, which ``batched_collect`` keeps for the last local epoch's steps only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import ServerAlgorithm
from fedlt.config import param
from fedlt.train.local import run_local_epochs, sgd
from fedlt.train.losses import masked_loss
from strategies._common import pop_uploads

UP = "fedproto."  # upload prefix: proto (K x d), count (K)
GLOBAL, PRESENT = "fedproto.global", "fedproto.present"  # round arrays
MISSING = -1e9  # logit of a class without a global prototype


def received_prototypes(ctx: ClientContext) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(global prototypes K x d, which classes have one) as sent this round, or None before the first."""
    if GLOBAL not in ctx.received:
        return None
    return ctx.received[GLOBAL].to(ctx.device), ctx.received[PRESENT].to(ctx.device) > 0


def prototype_targets(f: torch.Tensor, y: torch.Tensor, protos: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Each sample's target: its class's global prototype, or its own detached feature if there is none."""
    target = f.detach().clone()
    has = present[y]
    target[has] = protos[y[has]].to(target.dtype)
    return target


def prototype_logits(f: torch.Tensor, protos: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Minus the mean squared distance of each feature to each global prototype (MISSING where none)."""
    logits = -((f[:, None, :] - protos[None, :, :].to(f.dtype)) ** 2).mean(-1)
    return logits.masked_fill(~present[None, :], MISSING)


class FedProtoClient(ClientAlgorithm):
    personal_prefixes = ("",)  # the whole model stays on the client
    extra_uploads = "per-class mean features and per-class counts of the last local epoch (fedproto.*)"
    batched_ready = True  # client batching: batched_terms / batched_loss / batched_memory / batched_collect / end

    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        return "after"  # each client's own model

    def train(self, ctx: ClientContext) -> dict[str, float]:
        model = ctx.model.train()
        lamda = float(ctx.strategy["lamda"])
        k, d = int(ctx.data.plan.num_classes), int(model.feature_dim)
        received = received_prototypes(ctx)
        opt = sgd([p for p in model.parameters() if p.requires_grad], ctx.cfg["optimizer"])
        loss_fn = self.loss_fn(ctx)
        sums, counts = torch.zeros(k, d, device=ctx.device), torch.zeros(k, device=ctx.device)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            opt.zero_grad(set_to_none=True)
            f = model.features(x)
            loss = loss_fn(model.head(f), y)
            if received is not None and bool(received[1].any()):
                loss = loss + lamda * F.mse_loss(f, prototype_targets(f, y, *received))
            loss.backward()
            opt.step()
            sums.index_add_(0, y, f.detach())
            counts.add_(torch.bincount(y, minlength=k).to(counts.dtype))
            return loss.detach().item()

        total, steps = 0.0, 0.0
        for _ in range(int(ctx.cfg["local_epochs"])):  # one pass at a time: the prototypes are the last epoch's
            sums.zero_()
            counts.zero_()
            m = run_local_epochs(ctx.data, 1, int(ctx.cfg["batch_size"]), ctx.generator, step, ctx.device)
            total += m["train/loss"] * m["train/steps"]
            steps += m["train/steps"]
        ctx.uploads[UP + "proto"] = (sums / counts.clamp(min=1)[:, None]).cpu()
        ctx.uploads[UP + "count"] = counts.cpu()
        return {"train/loss": total / max(steps, 1.0), "train/steps": steps}

    # ------------------------------------------------------------- client batching (backend.client_batching)
    def batched_terms(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        k, d = int(ctx.data.plan.num_classes), int(ctx.model.feature_dim)
        received = received_prototypes(ctx)
        pull = received is not None and bool(received[1].any())  # the same for every client of a round
        protos, present = received if received is not None else (torch.zeros(k, d), torch.zeros(k, dtype=torch.bool))
        return {**super().batched_terms(ctx), "fedproto.global": protos.float(), "fedproto.present": present.float(),
                "fedproto.pull": torch.tensor(float(pull))}

    def batched_loss(self, model, x, y, weight, terms):
        f = model.features(x)
        loss = masked_loss(terms, model.head(f), y, weight)
        target = torch.where(terms["fedproto.present"][y][:, None] > 0, terms["fedproto.global"][y], f.detach())
        mse = (weight[:, None] * (f - target) ** 2).sum() / (weight.sum() * f.shape[1])  # F.mse_loss, real rows
        loss = loss + float(self.cfg["strategy"]["lamda"]) * terms["fedproto.pull"] * mse
        classes = torch.arange(terms["fedproto.present"].shape[0], device=y.device)
        onehot = (y[:, None] == classes[None, :]).to(f.dtype) * weight[:, None]  # F.one_hot is not vmappable
        return loss, {"train/loss": loss, "fedproto/sums": onehot.T @ f.detach(), "fedproto/counts": onehot.sum(0)}

    def batched_memory(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        k, d = int(ctx.data.plan.num_classes), int(ctx.model.feature_dim)
        return {"sums": torch.zeros(k, d), "counts": torch.zeros(k)}

    def batched_collect(self, memory, outputs, epoch, terms):
        last = (epoch == int(self.cfg["local_epochs"]) - 1).to(memory["sums"].dtype)  # the last epoch's batches
        return {"sums": memory["sums"] + last * outputs["fedproto/sums"],
                "counts": memory["counts"] + last * outputs["fedproto/counts"]}

    def batched_end(self, ctx: ClientContext) -> None:
        sums, counts = ctx.memory["sums"], ctx.memory["counts"]
        ctx.uploads[UP + "proto"] = (sums / counts.clamp(min=1)[:, None]).cpu()
        ctx.uploads[UP + "count"] = counts.cpu()

    def predictors(self, ctx: ClientContext):
        model = ctx.model.eval()
        received = received_prototypes(ctx)
        if received is None:  # no global prototype yet: every class is MISSING
            k = int(ctx.data.plan.num_classes)
            received = (torch.zeros(k, int(model.feature_dim), device=ctx.device),
                        torch.zeros(k, dtype=torch.bool, device=ctx.device))
        return {"proto": lambda x: prototype_logits(model.features(x), *received), "model": model}


@dataclass(frozen=True)
class Params:
    lamda: float = param(0.1, "weight of the prototype MSE term (official CIFAR-10 command: 0.1; options.py "
                              "default, MNIST/FEMNIST: 1)", lo=0.0)
    proto_weighting: str = param("counts", "per-class average of the clients' prototypes: counts (paper Eq. 6) or "
                                           "uniform (official code, FL-bench, PFLlib)", choices=("counts", "uniform"))


class Server(ServerAlgorithm):
    client_cls = FedProtoClient
    params = Params

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.protos: torch.Tensor | None = None  # K x d
        self.present: torch.Tensor | None = None  # K, bool

    def round_arrays(self, server_round: int) -> dict[str, torch.Tensor]:
        if self.protos is None:
            return {}
        return {GLOBAL: self.protos, PRESENT: self.present.float()}

    def aggregate(self, server_round: int, sent: ArrayRecord, replies: list[Message]) -> ArrayRecord | None:
        uploads = [u for u in pop_uploads(replies, UP) if u]
        if uploads:
            self.update_prototypes([u["proto"] for u in uploads], [u["count"] for u in uploads])
        return None  # no model arrays are shared

    def update_prototypes(self, protos: list[torch.Tensor], counts: list[torch.Tensor]) -> None:
        """Per class, the (count- or uniformly) weighted mean of the prototypes of the clients holding it;
        classes no client holds this round keep their previous global prototype."""
        counts_ = torch.stack(counts).double()  # clients x K
        weights = counts_ if self.cfg["strategy"]["proto_weighting"] == "counts" else (counts_ > 0).double()
        total = weights.sum(0)
        mean = torch.einsum("ck,ckd->kd", weights, torch.stack(protos).double()) / total.clamp(min=1e-12)[:, None]
        held = total > 0
        if self.protos is None:
            self.protos = torch.zeros(mean.shape, dtype=protos[0].dtype)
            self.present = torch.zeros(len(held), dtype=torch.bool)
        self.protos = torch.where(held[:, None], mean.to(self.protos.dtype), self.protos)
        self.present = self.present | held

    def generic_metrics(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        batch_size: int, evaluation=None) -> tuple[dict, dict]:
        return {"generic/accuracy": None}, {"not_applicable": "FedProto shares no model, only prototypes"}

    def server_state(self) -> dict:
        return {} if self.protos is None else {"protos": self.protos.clone(), "present": self.present.clone()}

    def load_server_state(self, state: dict) -> None:
        if "protos" in state:
            self.protos = torch.as_tensor(state["protos"]).clone()
            self.present = torch.as_tensor(state["present"]).clone().bool()
