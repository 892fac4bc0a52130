"""Fed-GraB (Xiao et al., NeurIPS 2023, "Fed-GraB: Federated Long-tailed Learning with Self-Adjusting Gradient
Balancer"): FedAvg whose clients train with a Self-adjusting Gradient Balancer (SGB) steered by a global class
prior that a Direct Prior Analyzer (DPA) reads off the global classifier.

* **DPA** (server, once): after ``warmup_rounds`` rounds, the prior is estimated from the aggregated classifier
  alone, p_c = ||w_c||_2 / sum_j ||w_j||_2 (the L2 norm of each class's row of ``head.weight``; no class counts
  are shared). The server keeps it (checkpointed) and sends it to the clients with every later round
  (``round_arrays``: ``fedgrab.prior``).
* **SGB** (clients, every step): the base loss is the official one, sigmoid binary cross-entropy over all classes,
  sum / batch size. Each class c has a PID controller on the accumulated difference of positive and negative
  logit-gradient magnitudes, Delta_c = sum |g_pos| - sum |g_neg| (set point 0). At each step, before the
  backward pass: e = 0 - Delta_c; incremental (``PID_DELTA``) update out_c += kp (e_0 - e_1) + ki e_0 +
  kd (e_0 - 2 e_1 + e_2); positive / negative gradient weights w+ = f(out_c), w- = f(-out_c) with
  f(x) = (10/9) / (1/9 + exp(-x/2)) (f(0) = 1, range (0, 10)). Each class is then left out of the balancing for
  this step (weights 1, its gradients not accumulated) with probability q_c = (p_c - min p) / (max p - min p),
  the min-max scaled DPA prior: the most frequent class is never balanced, the rarest always. The logit
  gradient becomes w * (sigmoid(z) - y) / n, and |w * (sigmoid(z) - y)| / n of the balanced classes is added to
  the positive (y = 1) and negative (y = 0) accumulators. Accumulators and controller states (out_c, the last
  three errors) are the client's state (``ctx.state``: ``fedgrab.*``), kept across rounds and in checkpoints,
  never reset (as the official per-client ``PIDLOSS`` objects). Before the prior exists (the warm-up rounds)
  clients train with the unweighted base loss and leave the state untouched.
* Server: FedAvg (sample-weighted average of every array; the official ``FedAvg_Rod`` averages backbone and
  classifier with the same client sizes). Prediction: the global model as is (argmax of the logits).

Checked against the official code, ZackZikaiXiao/FedGraB at commit 7394da67dc313ee2dddf82bf19ba100778709100:
``fed_grab.py`` (one ``PIDLOSS`` per client, ``pidmask=["head", "middle"]``, every class declared "tail", so
every controller is open), ``util/losses.py`` (``PIDLOSS``: BCE, weights from ``get_weight`` in the forward pass,
the gradient hook ``hook_func_tensor`` that re-weights the logit gradient and accumulates ``pos_grad`` /
``neg_grad``, ``map_func``; ``PID``: mode ``PID_DELTA``, Kp 10, Ki 0.01, Kd 0.1), ``util/update_baseline.py``
(``update_weights_pid``) and ``options.py`` (lr 0.03, momentum 0.5, 5 local epochs, 40 clients, all of them
trained every round as ``fed_grab.py`` sets ``args.frac = 1``; these are run options here). The loss is
written here from those formulas: weighting the per-logit loss by the detached weights gives exactly the hook's
re-weighted gradient, and the accumulated magnitudes are computed in closed form.

Deviations, and why:
* DPA is not in the public code: its ``fed_grab.py`` hard-codes all classes as tail and draws the per-class
  leave-out probability from a fixed geometric profile over class indices, 0.1^(rank / (L - 1)), which assumes
  the classes are numbered from head to tail. The code before the release commit
  (9d468b20a4606c79e38cfbfd805d3a2d6fc62056, ``util/losses.py``, commented out) min-max scaled a class
  distribution ``self.dist`` into these probabilities; fedlt does the same with the DPA prior, so no class order
  is assumed. The prior is read off the L2 norms of the classifier's class
  rows, as the paper's Sec. 3.2 is summarised in the sources available here; the PDF itself could not be read from
  this machine, so the normalisation (here: divide by the sum; a softmax would give a different q) is unchecked.
  When DPA runs (once, after ``warmup_rounds``, default 1) is fedlt's choice, documented as an option.
* The official release indexes the geometric profile with a counter that only advances when a class is left
  out (a bug: the probabilities then depend on earlier draws); here each class uses its own q_c.
* The official client optimiser holds only the backbone's parameters, so the classifier stays at its random
  initialisation for the whole run (its norms then carry no prior); here the whole model is trained, since DPA
  needs a classifier that learns.
* The official ``PID.LimitMax`` rebinds a local name and clamps nothing; no clamp is applied here either.
* Leave-out draws use a generator derived from (seed, round, client), separate from the data generator, so that
  with zero gains the client step is plain sigmoid-BCE training, batch for batch.

Uploads besides weights: none. DPA reads the aggregated classifier the server already holds (under
``privacy=dp_central`` it reads the noised model: post-processing), and the prior travels server -> client only.

Client batching: the balancer's state (pos, neg, out, err) is the client's ``batched_memory``, which
``batched_loss`` reads and ``batched_collect`` replaces at every step; the leave-out draws come from the same
generator, one per step in order, through ``batched_random``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message

from fedlt.api.client import MEMORY, RANDOM, ClientAlgorithm, ClientContext
from fedlt.api.server import ServerAlgorithm
from fedlt.config import param
from fedlt.seeding import TRAIN, torch_generator
from fedlt.train.local import run_local_epochs, sgd, supervised_step
from strategies._common import require_ce, require_linear_head

PRIOR = "fedgrab.prior"  # round array: the DPA prior, once estimated
POS, NEG, OUT, ERR = "fedgrab.pos_grad", "fedgrab.neg_grad", "fedgrab.pid_out", "fedgrab.pid_err"  # client state
SGB_STREAM = 14  # extra seed key of the leave-out draws (distinct from the data generator's keys)


def dpa_prior(head_weight: torch.Tensor) -> torch.Tensor:
    """The Direct Prior Analyzer: the class prior read off a linear classifier's weight rows, ||w_c|| / sum ||w_j||."""
    norms = head_weight.detach().double().norm(dim=1)
    return (norms / norms.sum()).float()


def leave_out_probabilities(prior: torch.Tensor) -> torch.Tensor:
    """q_c: the min-max scaled prior (the most frequent class 1, the rarest 0; all 0 for a flat prior)."""
    lo, hi = prior.min(), prior.max()
    return torch.zeros_like(prior) if hi <= lo else (prior - lo) / (hi - lo)


def weight_map(x: torch.Tensor) -> torch.Tensor:
    """The official map (10/9) / (1/9 + exp(-x/2)) from a controller output to a gradient weight, written as
    10 / (1 + 9 exp(-x/2)) so that f(0) is exactly 1; f -> 10 (x -> inf), 0 (x -> -inf)."""
    return 10.0 / (1.0 + 9.0 * torch.exp(-0.5 * x))


class GradientBalancer:
    """The SGB loss of one client for one call of ``train``: ``loss(logits, labels)`` re-weights and accumulates as
    the official ``PIDLOSS``; ``state()`` is what the client keeps. ``prior`` None: the unweighted base loss."""

    def __init__(self, num_classes: int, prior: torch.Tensor | None, state: dict, gains: tuple[float, float, float],
                 generator: torch.Generator, device: str = "cpu"):
        self.q = None if prior is None else leave_out_probabilities(prior.float()).to(device)
        self.kp, self.ki, self.kd = gains
        self.generator = generator
        zeros = torch.zeros(num_classes, device=device)
        self.pos = state.get(POS, zeros).to(device).clone()
        self.neg = state.get(NEG, zeros).to(device).clone()
        self.out = state.get(OUT, zeros).to(device).clone()
        self.err = state.get(ERR, torch.zeros(3, num_classes)).to(device).clone()  # e_0, e_1, e_2

    def weights(self, target: torch.Tensor) -> torch.Tensor:
        """One controller step per class (``PID.PID_calc`` in mode PID_DELTA), then the per-logit weights."""
        e = torch.stack([-(self.pos - self.neg), self.err[0], self.err[1]])
        self.err = e
        self.out = self.out + self.kp * (e[0] - e[1]) + self.ki * e[0] + self.kd * (e[0] - 2.0 * e[1] + e[2])
        return weight_map(self.out) * target + weight_map(-self.out) * (1 - target)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, k = logits.shape
        target = F.one_hot(labels, k).to(logits.dtype)
        per_logit = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.q is None:
            return per_logit.sum() / n
        w = self.weights(target)
        left_out = (torch.rand(k, generator=self.generator) < self.q.cpu()).to(logits.device)
        w = torch.where(left_out, torch.ones_like(w), w)
        with torch.no_grad():
            grad = (w * (torch.sigmoid(logits) - target)).abs() / n
            grad = torch.where(left_out, torch.zeros_like(grad), grad)
            self.pos += (grad * target).sum(0)
            self.neg += (grad * (1 - target)).sum(0)
        return (w.detach() * per_logit).sum() / n

    def state(self) -> dict[str, torch.Tensor]:
        return {POS: self.pos.cpu(), NEG: self.neg.cpu(), OUT: self.out.cpu(), ERR: self.err.cpu()}


class FedGraBClient(ClientAlgorithm):
    batched_ready = True  # client batching: the balancer's state as batched_memory, its draws as batched_random

    def loss_fn(self, ctx: ClientContext) -> GradientBalancer:
        """A balancer started from a copy of the client's state (``train`` saves it back; a fine-tuning copy with
        ``personalization.finetune_loss=run`` leaves the state alone)."""
        s = ctx.strategy
        gen = torch_generator(int(ctx.cfg["seed"]), TRAIN, ctx.round, int(ctx.data.client_id), SGB_STREAM)
        return GradientBalancer(int(ctx.data.plan.num_classes), ctx.received.get(PRIOR), ctx.state,
                                (float(s["kp"]), float(s["ki"]), float(s["kd"])), gen, ctx.device)

    def train(self, ctx: ClientContext) -> dict[str, float]:
        model = ctx.model.train()
        balancer = self.loss_fn(ctx)
        opt = sgd([p for p in model.parameters() if p.requires_grad], ctx.cfg["optimizer"])
        metrics = run_local_epochs(ctx.data, int(ctx.cfg["local_epochs"]), int(ctx.cfg["batch_size"]), ctx.generator,
                                   supervised_step(model, opt, balancer), ctx.device)
        if balancer.q is not None:
            ctx.state.update(balancer.state())
        return metrics

    # ------------------------------------------------------------- client batching (backend.client_batching)
    # The GradientBalancer's step written as a pure function: its state (pos, neg, out, err) is the client's
    # batched_memory, seen by batched_loss and replaced by batched_collect after each step; its leave-out draws
    # come from the same generator through batched_random. Before the prior exists: the plain sigmoid-BCE.
    def batched_terms(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        prior, k = ctx.received.get(PRIOR), int(ctx.data.plan.num_classes)
        q = torch.zeros(k) if prior is None else leave_out_probabilities(prior.float())
        return {**super().batched_terms(ctx), "fedgrab.q": q}

    def batched_memory(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        k = int(ctx.data.plan.num_classes)
        zeros = torch.zeros(k)
        return {"pos": ctx.state.get(POS, zeros).float().clone(), "neg": ctx.state.get(NEG, zeros).float().clone(),
                "out": ctx.state.get(OUT, zeros).float().clone(),
                "err": ctx.state.get(ERR, torch.zeros(3, k)).float().clone()}

    def batched_random(self, ctx: ClientContext):
        if PRIOR not in ctx.received:  # the same for every client of a round
            return None
        gen = torch_generator(int(ctx.cfg["seed"]), TRAIN, ctx.round, int(ctx.data.client_id), SGB_STREAM)
        return gen, (int(ctx.data.plan.num_classes),)

    def batched_loss(self, model, x, y, weight, terms):
        logits = model(x)
        k = logits.shape[1]
        target = (y[:, None] == torch.arange(k, device=y.device)[None, :]).to(logits.dtype)
        per_logit = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight[:, None]
        n = weight.sum()
        if RANDOM not in terms:  # no prior yet: the unweighted base loss
            loss = per_logit.sum() / n
            return loss, {"train/loss": loss}
        s = self.cfg["strategy"]
        kp, ki, kd = float(s["kp"]), float(s["ki"]), float(s["kd"])
        pos, neg, out, err = (terms[MEMORY + n_] for n_ in ("pos", "neg", "out", "err"))
        e = torch.stack([-(pos - neg), err[0], err[1]])  # GradientBalancer.weights: one PID step per class
        out = out + kp * (e[0] - e[1]) + ki * e[0] + kd * (e[0] - 2.0 * e[1] + e[2])
        w = weight_map(out) * target + weight_map(-out) * (1 - target)
        left_out = terms[RANDOM] < terms["fedgrab.q"]
        w = torch.where(left_out, torch.ones_like(w), w)
        grad = (w * (torch.sigmoid(logits) - target)).abs().detach() / n * weight[:, None]
        grad = torch.where(left_out, torch.zeros_like(grad), grad)
        loss = (w.detach() * per_logit).sum() / n
        return loss, {"train/loss": loss, "fedgrab/pos": pos + (grad * target).sum(0),
                      "fedgrab/neg": neg + (grad * (1 - target)).sum(0), "fedgrab/out": out, "fedgrab/err": e}

    def batched_collect(self, memory, outputs, epoch, terms):
        if "fedgrab/pos" not in outputs:
            return memory
        return {n: outputs["fedgrab/" + n] for n in ("pos", "neg", "out", "err")}

    def batched_end(self, ctx: ClientContext) -> None:
        if PRIOR in ctx.received:
            m = ctx.memory
            ctx.state.update({POS: m["pos"], NEG: m["neg"], OUT: m["out"], ERR: m["err"]})


@dataclass(frozen=True)
class Params:
    warmup_rounds: int = param(1, "rounds of plain sigmoid-BCE training before DPA reads the prior off the global "
                                  "classifier (once); SGB acts from the next round on", lo=1)
    kp: float = param(10.0, "PID proportional gain (official PID: 10)", lo=0.0)
    ki: float = param(0.01, "PID integral gain (official PID: 0.01)", lo=0.0)
    kd: float = param(0.1, "PID derivative gain (official PID: 0.1)", lo=0.0)


class Server(ServerAlgorithm):
    client_cls = FedGraBClient
    params = Params

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.prior: torch.Tensor | None = None

    @staticmethod
    def validate_config(cfg: dict) -> None:
        require_ce(cfg, "Fed-GraB is defined by its gradient-balanced sigmoid loss")
        require_linear_head(cfg, "DPA reads the class prior off the rows of a linear classifier")

    def after_aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        if self.prior is None and server_round >= int(self.cfg["strategy"]["warmup_rounds"]):
            self.prior = dpa_prior(torch.from_numpy(arrays["head.weight"].numpy().copy()))
        return arrays

    def round_arrays(self, server_round: int) -> dict[str, torch.Tensor]:
        return {} if self.prior is None else {PRIOR: self.prior}

    def diagnostics(self, model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
        """Once DPA has run: the imbalance its prior implies, max p / min p (``fedgrab/prior_ratio``)."""
        return {} if self.prior is None else {"fedgrab/prior_ratio": float(self.prior.max() / self.prior.min())}

    def server_state(self) -> dict:
        return {} if self.prior is None else {"prior": self.prior.clone()}

    def load_server_state(self, state: dict) -> None:
        self.prior = torch.as_tensor(state["prior"]).clone() if "prior" in state else None
