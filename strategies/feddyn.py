"""FedDyn (Acar et al., ICLR 2021, "Federated Learning Based on Dynamic Regularization"): each client's objective
is dynamically regularised so that the local and global stationary points agree.

* Client i, with the received server model theta and its state lambda_i (``ctx.state``; zeros at first), minimises
  L_i(w) - <grad L_i(theta_i^{t-1}), w> + alpha/2 ||w - theta||^2 with grad L_i(theta_i^{t-1}) = -alpha lambda_i,
  i.e. per batch ``loss(w) + alpha <w, lambda_i - theta>`` with the gradient clipped to ``max_grad_norm`` and
  alpha/2 ||w||^2 as SGD weight decay (added to ``optimizer.weight_decay``), exactly as the official code. Then
  lambda_i <- lambda_i + (theta_i - theta): the paper's first-order condition, grad L_i(theta_i^t) =
  grad L_i(theta_i^{t-1}) - alpha (theta_i^t - theta).
* Server state h (saved in checkpoints): h <- h - alpha/m * sum_{i in P_t} (theta_i^t - theta^{t-1}) over the
  accepted replies, m = ``num_clients``; then theta^t = mean_{i in P_t} theta_i^t - h / alpha (unweighted mean).
  BatchNorm buffers (statistics, not parameters) are plain unweighted averages.

Checked against the official code, alpemreacar/FedDyn at commit 48a19fac440ef079ce563da8e0c2896f8256fef9:
``utils_methods.py`` ``train_FedDyn`` (server: ``local_param_list[clnt] += curr - cld``, ``cld = mean(selected
client params) + mean(local_param_list over all clients)`` -- the same as the paper's h with h = -alpha *
mean(lambda)) and ``utils_general.py`` ``train_feddyn_mdl`` (client loss ``CE + alpha * sum(w * (-cld +
lambda))``, SGD weight decay ``alpha + weight_decay``, ``clip_grad_norm_(max_norm=10)``). Defaults are the
official ones: ``alpha`` 0.01 (``example_cifar_10.py``; FL-bench uses 0.1), ``max_grad_norm`` 10, and the
official "adaptive alpha" ``alpha_i = alpha / (n_i / mean_j n_j)`` (``adaptive_alpha: true``): a client with more
data than average is regularised less. The server formula does not involve alpha_i (as officially).

Deviations: the official code applies FedDyn to ``model.parameters()`` of models without BatchNorm; here BatchNorm
buffers are averaged as in FedAvg. The mean client size for the adaptive alpha is read by the client from the
run's split (one public scalar, what the official simulator computes centrally; a deployment would broadcast
it); with ``adaptive_alpha: false`` alpha_i = alpha. Client-level DP (``privacy=``) is refused: h must see each
client's own drift. Client batching (``backend.client_batching``): the same update through the batched hooks
(linear term in ``batched_loss``, clipping and alpha_i * w in ``batched_grads``, lambda_i in ``batched_end``;
tests/strategies/test_feddyn_batching.py). Uploads besides weights: none (the server derives theta_i - theta from
the uploaded weights); the client's lambda_i never leaves it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from fedlt.api.client import ClientContext
from fedlt.config import ConfigError, param
from fedlt.data.federated import FederatedSplit
from fedlt.train.local import run_local_epochs, sgd
from strategies._common import reply_weights, weighted_mean
from strategies.fedavg import FedAvgClient, FedAvgParams
from strategies.fedavg import Server as FedAvgServer

LAMBDA = "feddyn.lambda."  # ctx.state: the accumulated drift sum(theta_i - theta); grad L_i = -alpha_i lambda_i


@functools.lru_cache(maxsize=8)
def mean_client_size(split_path: str) -> float:
    """Mean training-set size over all clients of the run's split (the official ``weight_list`` normaliser)."""
    split = FederatedSplit.load(split_path)
    return float(np.asarray(split.class_counts).sum()) / len(split.client_train)


def client_alpha(ctx: ClientContext) -> float:
    """alpha_i: ``alpha`` scaled by mean client size / this client's size when ``adaptive_alpha`` (official)."""
    alpha = float(ctx.strategy["alpha"])
    if not ctx.strategy["adaptive_alpha"]:
        return alpha
    return alpha * mean_client_size(ctx.data.plan.split_path) / max(ctx.data.num_train, 1)


def trainable(model: torch.nn.Module, is_shared) -> dict[str, torch.nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad and is_shared(k)}


class FedDynClient(FedAvgClient):
    def train(self, ctx: ClientContext) -> dict[str, float]:
        model = ctx.model.train()
        params = trainable(model, self.is_shared)
        theta = {k: p.detach().clone() for k, p in params.items()}  # the received server model
        lam = {k: ctx.state.get(LAMBDA + k, torch.zeros_like(p)).to(p.device) for k, p in params.items()}
        linear = {k: lam[k] - theta[k] for k in params}  # alpha_i <w, lambda_i - theta>
        alpha = client_alpha(ctx)
        opt_cfg = dict(ctx.cfg["optimizer"])
        opt_cfg["weight_decay"] = float(opt_cfg.get("weight_decay", 0.0)) + alpha  # alpha_i/2 ||w||^2
        opt = sgd(list(params.values()), opt_cfg)
        max_norm = float(ctx.strategy["max_grad_norm"])
        loss_fn = self.loss_fn(ctx)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            opt.zero_grad(set_to_none=True)
            task = loss_fn(model(x), y)
            (task + alpha * sum((p * linear[k]).sum() for k, p in params.items())).backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm=max_norm)
            opt.step()
            return task.detach().item()  # train/loss: the task loss (the linear term has no scale of its own)

        metrics = run_local_epochs(ctx.data, int(ctx.cfg["local_epochs"]), int(ctx.cfg["batch_size"]), ctx.generator,
                                   step, ctx.device)
        for k, p in params.items():
            ctx.state[LAMBDA + k] = (lam[k] + p.detach() - theta[k]).cpu()
        return metrics

    # client batching (backend.client_batching): the same update as train(), one client's batch at a time under
    # vmap -- the linear term in batched_loss, clipping and the per-client alpha_i weight decay in batched_grads
    batched_ready = True
    LINEAR = "feddyn/linear/"  # batched_terms: lambda_i - theta, per trained parameter
    ALPHA = "feddyn/alpha"  # batched_terms: alpha_i (a per-client scalar under adaptive_alpha)
    THETA = "feddyn.theta."  # ctx.state between batched_begin and batched_end only: the received theta

    def batched_begin(self, ctx: ClientContext) -> None:
        for k, p in trainable(ctx.model, self.is_shared).items():
            ctx.state[self.THETA + k] = p.detach().cpu().clone()

    def batched_terms(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        terms = super().batched_terms(ctx)
        for k, p in trainable(ctx.model, self.is_shared).items():
            lam = ctx.state.get(LAMBDA + k, torch.zeros_like(p)).to(p.device)
            terms[self.LINEAR + k] = lam - p.detach()
        terms[self.ALPHA] = torch.tensor(client_alpha(ctx), dtype=torch.float32)
        return terms

    def batched_loss(self, model, x, y, weight, terms):
        task, _ = super().batched_loss(model, x, y, weight, terms)
        linear = sum((p * terms[self.LINEAR + n]).sum() for n, p in model.named_parameters()
                     if self.LINEAR + n in terms)
        return task + terms[self.ALPHA] * linear, {"train/loss": task}

    def batched_grads(self, grads, params, terms):
        # clip_grad_norm_ over the client's FedDyn parameters, then alpha_i * w (train's extra weight decay: the
        # trainer adds optimizer.weight_decay * w after this, as SGD adds (weight_decay + alpha_i) * w)
        names = [n for n in grads if self.LINEAR + n in terms]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[n]) for n in names]))
        coef = (float(self.cfg["strategy"]["max_grad_norm"]) / (norm + 1e-6)).clamp(max=1.0)
        alpha = terms[self.ALPHA]
        return {n: (g * coef + alpha * params[n] if n in names else g) for n, g in grads.items()}

    def batched_end(self, ctx: ClientContext) -> None:
        for k, p in trainable(ctx.model, self.is_shared).items():
            theta = ctx.state.pop(self.THETA + k).to(p.device)
            lam = ctx.state.get(LAMBDA + k, torch.zeros_like(p)).to(p.device)
            ctx.state[LAMBDA + k] = (lam + p.detach() - theta).cpu()


@dataclass(frozen=True)
class Params(FedAvgParams):
    alpha: float = param(0.01, "regularisation alpha (official CIFAR-10 example: 1e-2)", lo=0.0, lo_open=True)
    adaptive_alpha: bool = param(True, "official: alpha_i = alpha * mean client size / n_i; false: alpha for all")
    max_grad_norm: float = param(10.0, "client gradient clipping norm (official max_norm 10)", lo=0.0, lo_open=True)


class Server(FedAvgServer):
    client_cls = FedDynClient
    params = Params

    @staticmethod
    def validate_config(cfg: dict) -> None:
        mode = (cfg.get("privacy") or {}).get("name", "none")
        if mode != "none":
            raise ConfigError(
                f"invalid combination privacy={mode} with strategy=feddyn: FedDyn's server state h accumulates each "
                f"client's own drift theta_i - theta and must match the clients' lambda_i, while client-level DP "
                f"shows the server only clipped, noised updates (dp_central: their noised mean), so h would no "
                f"longer match; use privacy=none.")

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.h: dict[str, torch.Tensor] = {}

    def initial_arrays(self, model: torch.nn.Module) -> ArrayRecord:
        self.h = {k: torch.zeros_like(p.detach()) for k, p in trainable(model, self.client_cls.is_shared).items()}
        return super().initial_arrays(model)

    def aggregate(self, server_round: int, sent: ArrayRecord, replies: list[Message]) -> ArrayRecord | None:
        if not replies:
            return None
        alpha, m = float(self.cfg["strategy"]["alpha"]), int(self.cfg["num_clients"])
        mean = weighted_mean(replies, reply_weights(replies, "uniform"))
        out = {}
        for k, avg in mean.items():
            if k in self.h:
                x = sent[k].numpy().astype(np.float64)
                drift = sum(r.content["arrays"][k].numpy().astype(np.float64) - x for r in replies)
                self.h[k] = (self.h[k].double() - alpha / m * torch.from_numpy(drift)).to(self.h[k].dtype)
                avg = avg - self.h[k].double().numpy() / alpha
            out[k] = Array(np.asarray(avg, dtype=np.float64))  # merge() restores each array's dtype
        return ArrayRecord(out)

    def server_state(self) -> dict:
        return {"h": {k: v.clone() for k, v in self.h.items()}}

    def load_server_state(self, state: dict) -> None:
        if "h" in state:
            self.h = {k: torch.as_tensor(v).clone() for k, v in state["h"].items()}
