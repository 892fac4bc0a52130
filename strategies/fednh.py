"""FedNH (Dai et al., AAAI 2023, "Tackling Data Heterogeneity in Federated Learning with Class Prototypes"): a
prototype classifier whose class prototypes start uniformly spread on the unit sphere and are moved smoothly
towards the clients' class means (semantic information), so that tail classes keep their own region of the
feature space.

* Model: the run's backbone, then the prototype head (``model.head`` is replaced, so only ``model.head=linear``,
  the default, is accepted): logits = s * <f / ||f||, w_c>, with the K x d prototypes W (unit rows) and the scale
  s. W is never trained by the clients (a non-persistent buffer: not in the model arrays); s is a learnable
  scalar initialised to 1 and averaged with the backbone (official default ``FedNH_fix_scaling: False``), or a
  constant with ``strategy.fixed_scale`` (the official fixed option sets 30).
* Initial prototypes: ``torch.nn.init.orthogonal_`` of a K x d matrix (the official ``FedNH_head_init:
  orthogonal``: rows orthonormal when K <= d, i.e. pairwise cosine 0), drawn from the run seed (``PROTO_STREAM``
  of INIT), rows then normalised to unit length.
* Client: local SGD of the backbone (and s) with the run's loss (``loss=ce`` by default, the official CE) on the
  scaled cosine logits, W frozen. After training, in eval mode, one pass over its training images: per class c
  it holds, mu_c = normalise(mean of the normalised features of its class-c images). Uploads besides the model
  arrays: ``fednh.proto`` (K x d, the normalised class means mu_c; zero rows for classes it does not hold) and
  ``fednh.count`` (K, its per-class training counts, i.e. its label histogram).
* Server: backbone and s averaged (fedlt's FedAvg, sample-weighted); per class, mu = normalise(sum_k n_kc mu_kc /
  sum_k n_kc) over the participants holding the class, then w_c <- normalise(rho * w_c + (1 - rho) * mu) with
  ``strategy.rho`` (official ``FedNH_smoothing`` 0.9); a class no participant holds keeps its prototype (the
  official code does the same: its average is 0 there and normalise(rho * w_c) = w_c). The prototypes are server
  state (checkpointed) and go to every client with every train and evaluate message (``round_arrays``:
  ``fednh.global``, K x d).
* Predictors: generic = the global backbone with the server's prototypes; personalized (stage "before") = the
  received global model with the global prototypes, on each client's local test set (FedNH has no personal
  head); fedlt's shared ``personalization.finetune_epochs`` step applies to it as to FedAvg.

Checked against the official code, Yutong-Dai/FedNH at commit 60c3161412d576cddc8187af318cdc8a91a8709f:
``src/flbase/strategies/FedNH.py`` (``FedNHClient._estimate_prototype``: eval mode, normalised per-class mean of
normalised embeddings, scaled by the class count for the server; ``FedNHServer.aggregate``: count-weighted mean,
normalise, ``FedNH_smoothing`` moving average, normalise again), ``src/flbase/strategies/FedUH.py``
(``_initialize_model``: prototype ``requires_grad_(False)``, ``orthogonal_`` init, ``FedNH_fix_scaling`` -> 30;
``training``: CE), ``src/flbase/models/CNN.py`` (``Conv2CifarNH``: normalised embedding, frozen prototype used as
is, learnable ``scaling`` initialised to 1), ``main.py`` (``--FedNH_smoothing`` 0.9) and
``experiments/Cifar10_Conv2Cifar.yaml`` / ``FedNH_dir.sh`` (SGD lr 0.01, momentum 0.9, weight decay 1e-5, batch
64, 5 local epochs, 100 clients, participation 0.1, 200 rounds: run options in fedlt).

Deviations:
* the backbone and s are averaged weighted by sample counts (fedlt's FedAvg, as for every method here); the
  official server takes the unweighted mean of the participants' models (for FedAvg too);
* prototype rows are normalised after the orthogonal init: a no-op when K <= d (every official setting), whereas
  with K > d the official first-round rows are not unit length; the official ``uniform`` init exists only for
  d = 2 and is not offered; the draw uses the run seed instead of torch's global state;
* the class means are computed over the client's training images without augmentation, in a fixed order; the
  official estimate iterates its shuffled training loader (with that loader's transform);
* no gradient clipping: the official local training clips every method's gradients to norm 10 (a repository-wide
  detail), fedlt's methods do not clip; the official "diminishing" per-round lr decay is not applied;
* personalized evaluation: the official PFL score is each *participating* client's model after its local round,
  on its test split; fedlt scores every client with the received global model (the same rule for every method
  without a personal part) and offers the official-style local round as ``personalization.finetune_epochs``
  (the copy trains backbone and s with W frozen);
* the official alternatives ``FedNH_client_adv_prototype_agg`` / ``FedNH_server_adv_prototype_agg`` (off by
  default there) are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message
from torch import nn

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import ServerAlgorithm
from fedlt.config import param
from fedlt.data.federated import ClientData
from fedlt.seeding import INIT, derive_seed
from strategies._common import pop_uploads, require_linear_head

UP = "fednh."  # upload prefix: proto (K x d normalised class means), count (K)
GLOBAL = "fednh.global"  # round array: the global prototypes (K x d)
PROTO_STREAM = 2  # sub-stream of INIT that draws the initial prototypes (FedETF's ETF uses 1)


def initial_prototypes(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """K x d unit rows: ``orthogonal_`` of a K x d matrix (the official init), rows normalised."""
    g = torch.Generator().manual_seed(derive_seed(seed, INIT, PROTO_STREAM))
    w = torch.nn.init.orthogonal_(torch.empty(num_classes, dim), generator=g)
    return F.normalize(w, dim=1)


class PrototypeHead(nn.Module):
    """logits = s * normalise(f) @ W^T; W is a non-persistent buffer set from the server's prototypes."""

    def __init__(self, prototypes: torch.Tensor, fixed_scale: float | None):
        super().__init__()
        self.register_buffer("prototype", prototypes.clone(), persistent=False)
        self.initial = prototypes.clone()  # what a client uses before any prototype was received
        self.fixed_scale = fixed_scale
        if fixed_scale is None:
            self.scaling = nn.Parameter(torch.tensor(1.0))  # learnable, official init 1

    def scale(self) -> torch.Tensor | float:
        return self.scaling if self.fixed_scale is None else self.fixed_scale

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale() * (F.normalize(f, dim=1) @ self.prototype.T.to(f.dtype))


def set_prototypes(model: nn.Module, prototypes: torch.Tensor | None) -> None:
    with torch.no_grad():
        model.head.prototype.copy_(model.head.initial if prototypes is None else prototypes)


@torch.no_grad()
def class_means(model: nn.Module, data: ClientData, batch_size: int, device: str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(K x d normalised per-class means of the normalised features of the client's training images, zero rows
    for classes it does not hold; K training counts): one pass in eval mode, no augmentation."""
    model.eval()
    k, n = int(data.plan.num_classes), int(data.num_train)
    sums = torch.zeros(k, int(model.feature_dim), device=device)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        f = F.normalize(model.features(data.normalise(data.train_x[idx]).to(device)), dim=1)
        sums.index_add_(0, data.train_y[idx].to(device), f.to(sums.dtype))
    counts = torch.bincount(data.train_y, minlength=k).to(device)
    means = F.normalize(sums / counts.clamp(min=1)[:, None].to(sums.dtype), dim=1)  # zero rows stay zero
    return means, counts


class FedNHClient(ClientAlgorithm):
    """Client batching: ``batched_begin`` sets the received prototypes (the same for the whole cohort), the default
    hooks run the same local SGD with W frozen, and ``batched_end`` uploads the class means as ``train`` does."""

    extra_uploads = ("per-class normalised mean features of the client's training set and its per-class training "
                     "counts (fednh.*)")

    @staticmethod
    def build_model(base: nn.Module, cfg: dict) -> nn.Module:
        fixed = cfg["strategy"].get("fixed_scale")
        base.head = PrototypeHead(initial_prototypes(int(base.num_classes), int(base.feature_dim), int(cfg["seed"])),
                                  None if fixed is None else float(fixed))
        return base

    def train(self, ctx: ClientContext) -> dict[str, float]:
        model = ctx.model
        set_prototypes(model, ctx.received.get(GLOBAL))
        model.train()
        metrics = self.local_epochs(ctx, model, [p for p in model.parameters() if p.requires_grad])  # W frozen
        self.upload_class_means(ctx)
        return metrics

    def upload_class_means(self, ctx: ClientContext) -> None:
        """After training: the client's normalised class means and counts into ``ctx.uploads``."""
        means, counts = class_means(ctx.model, ctx.data, int(ctx.cfg["batch_size"]), ctx.device)
        ctx.uploads[UP + "proto"] = means.float().cpu()
        ctx.uploads[UP + "count"] = counts.float().cpu()

    # client batching: the same local SGD (default batched_loss / terms / groups: W is a buffer, never trained)
    batched_ready = True

    def batched_begin(self, ctx: ClientContext) -> None:
        # W is a non-persistent buffer: not in the state dict, so not part of the stacked start state and not
        # swapped by functional_call -- the trainer reads it from ctx.model itself, the module it vmaps. Setting it
        # here is within batched_begin's contract: it is the same for every client of the cohort (every client
        # gets the same received prototypes) and survives each client's load_state_dict before batched_end.
        set_prototypes(ctx.model, ctx.received.get(GLOBAL))

    def batched_end(self, ctx: ClientContext) -> None:
        self.upload_class_means(ctx)

    def predictors(self, ctx: ClientContext):
        set_prototypes(ctx.model, ctx.received.get(GLOBAL))
        ctx.model.eval()
        return {"model": ctx.model}


@dataclass(frozen=True)
class Params:
    rho: float = param(0.9, "prototype smoothing: w <- normalise(rho * w + (1 - rho) * aggregated class mean) "
                            "(official FedNH_smoothing 0.9; 1 = prototypes never move)", lo=0.0, hi=1.0)
    fixed_scale: float | None = param(None, "null = learnable logit scale initialised to 1 (official default); a "
                                            "number fixes it (official FedNH_fix_scaling: 30)", lo=0.0, lo_open=True)


class Server(ServerAlgorithm):
    client_cls = FedNHClient
    params = Params

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.protos: torch.Tensor | None = None  # K x d, unit rows

    @staticmethod
    def validate_config(cfg: dict) -> None:
        require_linear_head(cfg, "FedNH replaces the configured head by its prototype classifier (scaled cosine to "
                                 "the server's class prototypes)")

    def initial_arrays(self, model: torch.nn.Module) -> ArrayRecord:
        arrays = super().initial_arrays(model)
        if self.protos is None:
            self.protos = model.head.initial.detach().cpu().clone()
        return arrays

    def round_arrays(self, server_round: int) -> dict[str, torch.Tensor]:
        return {} if self.protos is None else {GLOBAL: self.protos}

    def aggregate(self, server_round: int, sent: ArrayRecord, replies: list[Message]) -> ArrayRecord | None:
        uploads = [u for u in pop_uploads(replies, UP) if u]  # before averaging: only model arrays remain
        arrays = super().aggregate(server_round, sent, replies)
        if uploads:
            self.update_prototypes([u["proto"] for u in uploads], [u["count"] for u in uploads])
        return arrays

    def update_prototypes(self, means: list[torch.Tensor], counts: list[torch.Tensor]) -> None:
        """Count-weighted mean of the clients' normalised class means, normalised, then the smoothed update
        w <- normalise(rho * w + (1 - rho) * mu) for every class some client holds."""
        n = torch.stack(counts).double()  # clients x K
        total = n.sum(0)
        mu = torch.einsum("ck,ckd->kd", n, torch.stack(means).double()) / total.clamp(min=1e-12)[:, None]
        rho = float(self.cfg["strategy"]["rho"])
        old = self.protos.double()
        new = F.normalize(rho * old + (1.0 - rho) * F.normalize(mu, dim=1), dim=1)
        self.protos = torch.where((total > 0)[:, None], new, old).to(self.protos.dtype)

    def generic_predictors(self, model: torch.nn.Module):
        set_prototypes(model, self.protos)
        model.eval()
        return {"model": model}

    def server_state(self) -> dict:
        return {} if self.protos is None else {"protos": self.protos.clone()}

    def load_server_state(self, state: dict) -> None:
        if "protos" in state:
            self.protos = torch.as_tensor(state["protos"]).clone()
