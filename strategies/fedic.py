"""FedIC (Xinyi Shang, Yang Lu, Yiu-ming Cheung, Hanzi Wang, "FEDIC: Federated Learning on Non-IID and Long-Tailed
Data via Calibrated Distillation", ICME 2022; arXiv 2205.00172): FedAvg clients; after every aggregation the
server calibrates the ensemble of the round's local models on a small balanced server set and distils it into the
global model.

Procedure (the authors' code, checked at ``shangxinyi/FEDIC`` commit 76a1d75e33f1b315b0ab99f1e603a206c37c5446,
``main.py``: ``Global.update_distillation_highway_feature``, ``Ensemble_highway``, ``Local``; defaults from
``options.py``). Clients run plain local SGD (the run's loss; officially CE). Each round the server, with the
replies' local models and their sample-weighted average w (FedAvg), runs three stages of Adam steps, each step on
a fresh batch drawn without replacement from the server set and augmented like client batches (the official
teaching and unlabeled sets use the training transform):

1. **Fine-tuning** (``finetune_steps``, official 100): a copy of w is trained with CE on labelled batches of
   ``labeled_batch_size`` (20), Adam lr ``server_lr`` (1e-3), weight decay ``weight_decay`` (2e-4), in train mode
   -- the fine-tuned FedAvg model w'.
2. **Calibration** (``calibration_steps``, official 100): the calibration module (official ``Ensemble_highway``) is
   trained with CE on labelled batches (Adam lr ``server_lr``, no weight decay); the local models and w' are frozen, in
   eval mode. For a batch, with f_k, z_k the features and logits of local model k (k = 1..m) and z' the logits of
   w': a_k = sigmoid(z_k s + b) (s a K-vector, b a scalar), normalised over the clients, a_k / sum_j a_j; the
   ensemble logits z_e = sum_k a_k z_k; the calibrated logits z_c = z_e * u + v (per-class scale u and bias v);
   the carry gate g = sigmoid(Linear(mean_k f_k)); the teacher z_t = g z_c + (1 - g) z'.
3. **Distillation** (``distill_steps``, official 100): a copy of w (the student; not w') is trained, in train mode, with
   ``distill_weight`` (0.5) * KL(softmax(z_t / T) || softmax(z_s / T)) (batch mean, ``temperature`` T = 2, no T^2
   factor, teacher fixed) on a batch of ``distill_batch_size`` (official 128) images plus (1 - 0.5) * CE on a labelled
   batch of ``labeled_batch_size``; Adam lr ``server_lr``, weight decay ``weight_decay``. The student becomes
   the new global model (BatchNorm statistics included).

As officially, the calibration module and the three Adam optimizers (their moments) persist from round to round
(server state, saved in checkpoints); each stage restarts its model from this round's w.
``distill_steps=0`` turns the method off: the global model is then FedAvg's (stages 1 and 2 only feed the teacher,
so they are skipped too). Generic and personalized predictor: the global model (before), like FedAvg.

Server data: the run's server-held set (``server_data.per_class``, README "Server-held data"): drawn with the
run's seed from the long-tailed training set before the partition, so no client holds those images. With
``server_data.per_class`` null the strategy asks for ``strategy.server_per_class`` images per class (default 100,
the official size), capped at half of the smallest class by the core (CIFAR-10-LT at IF 100: 25);
``server_data.per_class=0`` is refused.

Deviations, and why:

* **One server set, no second dataset.** The official code holds out 100 images per class from the full CIFAR-10
  training split (before the long tail) as the labelled set, and distils on unlabeled CIFAR-100 training images.
  fedlt has no second dataset per source, so the server-held set (from the long-tailed training pool, so it is
  smaller on small tails) serves as both the labelled and the distillation set, its labels unused in the KL term.
* **Any class count, client count and feature width.** The official module hard-codes 10 classes, 8 clients
  (the feature average uses weights 1/8) and 256-d features; here s, u, v have K entries, the gate reads the
  model's feature width d and the features are averaged over the m replies of the round (1/m, which is 1/8 with
  the official 8 clients).
* **Batches larger than the server set** are cut to its size (the official draw without replacement would fail).
* The calibration module's gate (``nn.Linear``) is initialised with PyTorch's default rule from a seeded stream,
  not the global RNG. The teacher is computed without gradients (the official code builds its graph and then
  detaches it: the same values).
* Under ``privacy=dp_central`` the server sees one noised reply, so the ensemble is that one model.

Defaults: the official values, except two CPU-friendly ones. The server forwards every local model on every batch
of stages 2 and 3 (m x 20 and m x 128 images per step), plus the fine-tuning and the student's steps: with the
official 100 steps per stage and batch 128 a round's server step costs about 40x the clients' local training of a
``cifar10_lt_quick`` round (12 clients; measured on the CPU). So ``finetune_steps``, ``calibration_steps`` and
``distill_steps`` default to 20 and ``distill_batch_size`` to 32: the server step then takes ~9 s of CPU per
``cifar10_lt_quick`` round against ~4 s for the clients' local training, and 5 rounds of ``experiment=compare_quick``
took 202 s against FedAvg's 170 s (2 heavily loaded cores). The official protocol is
``strategy.finetune_steps=100 strategy.calibration_steps=100 strategy.distill_steps=100
strategy.distill_batch_size=128``. The server step runs on one torch thread (as CReFF's).

Uploads besides weights: none (each client sends its model, as FedAvg; the server keeps the round's local models
only for this round's ensemble).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Message
from torch import nn

from fedlt.api.client import ClientAlgorithm
from fedlt.api.server import ServerAlgorithm
from fedlt.config import ConfigError, param
from fedlt.data.augment import random_crop_flip
from fedlt.data.federated import ClientData
from fedlt.seeding import derive_seed, torch_generator
from strategies._common import one_torch_thread

FEDIC_STREAM = 0xFED1C  # seed purpose of the server's batches and of the calibration module's initialisation
FINETUNE, CALIBRATE, DISTILL = 1, 2, 3  # sub-streams of the three stages


class Calibration(nn.Module):
    """The official ``Ensemble_highway`` for K classes, d-dimensional features and any number of local models."""

    def __init__(self, num_classes: int, feature_dim: int):
        super().__init__()
        self.ensemble_scale = nn.Parameter(torch.ones(num_classes, 1))
        self.ensemble_bias = nn.Parameter(torch.zeros(1))
        self.logit_scale = nn.Parameter(torch.ones(num_classes))
        self.logit_bias = nn.Parameter(torch.zeros(num_classes))
        self.gate = nn.Linear(feature_dim, 1)

    def forward(self, features: torch.Tensor, logits: torch.Tensor, fedavg_logits: torch.Tensor) -> torch.Tensor:
        """``features`` (m, B, d) and ``logits`` (m, B, K) of the m local models, ``fedavg_logits`` (B, K) of the
        fine-tuned FedAvg model -> the teacher's logits (B, K)."""
        a = torch.sigmoid(logits @ self.ensemble_scale + self.ensemble_bias)  # m, B, 1
        a = a / a.sum(0, keepdim=True)  # the official L1 normalisation over the clients (a > 0)
        calibrated = (a * logits).sum(0) * self.logit_scale + self.logit_bias
        g = torch.sigmoid(self.gate(features.mean(0)))  # B, 1
        return g * calibrated + (1 - g) * fedavg_logits


def new_calibration(num_classes: int, feature_dim: int, seed: int) -> Calibration:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, FEDIC_STREAM, 0))
        return Calibration(num_classes, feature_dim)


def server_batch(data: ClientData, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """min(size, n) server images drawn without replacement, normalised and augmented as client batches are."""
    idx = torch.randperm(data.num_train, generator=generator)[: min(size, data.num_train)]
    x = data.normalise(data.train_x[idx])
    plan = data.plan
    if plan.augment_padding > 0 or plan.augment_hflip:
        x = random_crop_flip(x, plan.augment_padding, plan.augment_hflip, generator)
    return x, data.train_y[idx]


@torch.no_grad()
def ensemble_outputs(models: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (m, B, d) and logits (m, B, K) of the local models (in eval mode) on ``x``."""
    feats, logits = [], []
    for m in models:
        f = m.features(x)
        feats.append(f)
        logits.append(m.head(f))
    return torch.stack(feats), torch.stack(logits)


class FedICClient(ClientAlgorithm):
    """FedAvg's client side (the official ``Local``: plain local SGD)."""


@dataclass(frozen=True)
class Params:
    server_per_class: int = param(100, "server images per class when server_data.per_class is null (capped at half "
                                       "of the smallest class; official: 100 per class)", lo=1)
    finetune_steps: int = param(20, "stage 1: Adam steps fine-tuning the FedAvg model on the server set (CPU "
                                    "default; official 100)", lo=0)
    calibration_steps: int = param(20, "stage 2: Adam steps training the calibration module (CPU default; official "
                                       "100)", lo=0)
    distill_steps: int = param(20, "stage 3: Adam steps distilling the calibrated ensemble into the global model "
                                   "(CPU default; official 100; 0 = FedAvg)", lo=0)
    server_lr: float = param(1e-3, "Adam learning rate of the three stages (official 1e-3)", lo=0.0, lo_open=True)
    weight_decay: float = param(2e-4, "Adam weight decay of stages 1 and 3 (official 2e-4; the calibration module "
                                      "has none)", lo=0.0)
    labeled_batch_size: int = param(20, "labelled server images per step (official 20)", lo=1)
    distill_batch_size: int = param(32, "server images per distillation step for the KL term (CPU default; "
                                        "official 128 unlabeled CIFAR-100 images)", lo=1)
    temperature: float = param(2.0, "distillation temperature T (official 2)", lo=0.0, lo_open=True)
    distill_weight: float = param(0.5, "loss = w * KL + (1 - w) * CE in stage 3 (official 0.5)", lo=0.0, hi=1.0)


class Server(ServerAlgorithm):
    client_cls = FedICClient
    params = Params

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self._template: nn.Module | None = None
        self._locals: list[nn.Module] = []
        self._finetuned = self._student = self._calibration = None
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._pending: dict = {}  # server state loaded before the models exist

    @staticmethod
    def validate_config(cfg: dict) -> None:
        if (cfg.get("server_data") or {}).get("per_class") == 0:
            raise ConfigError(
                "invalid value server_data.per_class=0 for strategy=fedic: FedIC calibrates and distils on a "
                "server-held balanced set of training images; leave server_data.per_class=null (the strategy's "
                "size, strategy.server_per_class, capped at half of the smallest class) or set N >= 1.")

    # ------------------------------------------------------------------------------- server models
    def initial_arrays(self, model: nn.Module) -> ArrayRecord:
        self._template = copy.deepcopy(model)
        self._setup()
        return super().initial_arrays(model)

    def _setup(self) -> None:
        if self._template is None or self._student is not None:
            return
        s, t = self.cfg["strategy"], self._template
        self._finetuned, self._student = copy.deepcopy(t), copy.deepcopy(t)
        self._calibration = new_calibration(t.num_classes, t.feature_dim, int(self.cfg["seed"]))
        lr, wd = float(s["server_lr"]), float(s["weight_decay"])
        self._optimizers = {
            "finetune": torch.optim.Adam(self._finetuned.parameters(), lr=lr, weight_decay=wd),
            "calibration": torch.optim.Adam(self._calibration.parameters(), lr=lr),
            "distill": torch.optim.Adam(self._student.parameters(), lr=lr, weight_decay=wd)}
        if self._pending:
            self._load(self._pending)
            self._pending = {}

    def _local_models(self, replies: list[Message]) -> list[nn.Module]:
        while len(self._locals) < len(replies):
            self._locals.append(copy.deepcopy(self._template))
        out = []
        for model, r in zip(self._locals, replies):
            self._load_arrays(model, r.content["arrays"])
            model.eval()
            out.append(model)
        return out

    def _load_arrays(self, model: nn.Module, arrays: ArrayRecord) -> None:
        model.load_state_dict({k: v.clone() for k, v in arrays.to_torch_state_dict().items()}, strict=False)
        if self.frozen:
            model.load_state_dict(self.frozen, strict=False)

    # --------------------------------------------------------------------------------- server step
    def after_aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        if not replies or int(self.cfg["strategy"]["distill_steps"]) == 0:
            return arrays
        if self.server_data is None:
            raise RuntimeError("strategy=fedic needs the server-held set (server_data.per_class)")
        self._setup()
        with one_torch_thread():
            return self._server_step(server_round, arrays, replies)

    def _server_step(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        s = self.cfg["strategy"]
        data, seed = self.server_data, int(self.cfg["seed"])
        labeled, unlabeled = int(s["labeled_batch_size"]), int(s["distill_batch_size"])
        locals_ = self._local_models(replies)

        finetuned, opt = self._finetuned, self._optimizers["finetune"]  # stage 1: fine-tune FedAvg
        self._load_arrays(finetuned, arrays)
        finetuned.train()
        g = torch_generator(seed, FEDIC_STREAM, server_round, FINETUNE)
        for _ in range(int(s["finetune_steps"])):
            x, y = server_batch(data, labeled, g)
            loss = F.cross_entropy(finetuned(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finetuned.eval()

        def teacher_inputs(x: torch.Tensor):
            feats, logits = ensemble_outputs(locals_, x)
            with torch.no_grad():
                return feats, logits, finetuned(x)

        calibration, opt = self._calibration, self._optimizers["calibration"]  # stage 2: calibration
        calibration.train()
        g = torch_generator(seed, FEDIC_STREAM, server_round, CALIBRATE)
        for _ in range(int(s["calibration_steps"])):
            x, y = server_batch(data, labeled, g)
            loss = F.cross_entropy(calibration(*teacher_inputs(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        calibration.eval()

        student, opt = self._student, self._optimizers["distill"]  # stage 3: distillation into FedAvg's w
        self._load_arrays(student, arrays)
        student.train()
        g = torch_generator(seed, FEDIC_STREAM, server_round, DISTILL)
        temp, w = float(s["temperature"]), float(s["distill_weight"])
        for _ in range(int(s["distill_steps"])):
            xu, _ = server_batch(data, unlabeled, g)
            xl, yl = server_batch(data, labeled, g)
            with torch.no_grad():
                target = F.softmax(calibration(*teacher_inputs(xu)) / temp, dim=1)
            soft = F.kl_div(F.log_softmax(student(xu) / temp, dim=1), target, reduction="batchmean")
            hard = F.cross_entropy(student(xl), yl)
            loss = w * soft + (1 - w) * hard
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        student.eval()
        state = student.state_dict()
        return ArrayRecord({k: (Array(state[k].detach().numpy().copy()) if k in state else a)
                            for k, a in arrays.items()})

    # ----------------------------------------------------------------------------------- state
    def server_state(self) -> dict:
        if self._calibration is None:
            return dict(self._pending)
        return {"calibration": {k: v.detach().clone() for k, v in self._calibration.state_dict().items()},
                "optimizers": {k: copy.deepcopy(o.state_dict()) for k, o in self._optimizers.items()}}

    def load_server_state(self, state: dict) -> None:
        if not state:
            return
        if self._calibration is None:
            self._pending = dict(state)
        else:
            self._load(state)

    def _load(self, state: dict) -> None:
        self._calibration.load_state_dict(state["calibration"])
        for k, o in self._optimizers.items():
            o.load_state_dict(copy.deepcopy(state["optimizers"][k]))
