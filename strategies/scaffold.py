"""SCAFFOLD (Karimireddy et al., ICML 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning"),
Algorithm 1 with option II: control variates correct the client drift.

* Server state: the server control variate c (one tensor per trainable parameter, zeros at first), sent every
  round with the global model (``round_arrays``: ``scaffold.c.<key>``) and saved in checkpoints.
* Client state: its control variate c_i (``ctx.state``, zeros until its first training round).
* Local step: every SGD step uses the corrected gradient g(y) - c_i + c (added to the gradient before the
  optimizer, so momentum / weight decay from ``optimizer.*`` apply as to a plain gradient).
* After K local steps (lr eta_l): c_i+ = the mean over the K steps of the client's own minibatch gradient g_i(y)
  (plus weight decay), the quantity option II, c_i+ = c_i - c + (x - y_i) / (K eta_l), equals under plain SGD
  (x - y_i = eta_l * sum of the corrected gradients g_i - c_i + c); the client keeps c_i+ and uploads
  dc_i = c_i+ - c_i (``scaffold.dc.<key>``, removed by the server before averaging).
* Server: x <- x + eta_g * mean_i (y_i - x) over the accepted replies; c <- c + (1/N) sum_i dc_i with N =
  ``num_clients``. BatchNorm buffers (statistics, not parameters) are plain averages with the same weights.

There is no official code by the paper's authors. Checked against FL-bench (KarhouTam/FL-bench at commit
06e658bca5af6ce732e25bb7c0f8be321e14a85e, ``src/client/scaffold.py``, ``src/server/scaffold.py``), PFLlib
(TsingZ0/PFLlib at d832e76f6a23b833038949ec1e4fdefe63a4d350, ``system/flcore/clients/clientscaffold.py``,
``system/flcore/servers/serverscaffold.py``) and the SCAFFOLD baseline in FedDyn's code (alpemreacar/FedDyn at
48a19fac440ef079ce563da8e0c2896f8256fef9, ``utils_methods.py`` ``train_SCAFFOLD``): all three use option II, the
correction c - c_i on the gradient, an unweighted mean of the client models and c += sum(dc_i) / N (FedDyn's
baseline also rescales c and dc_i by each client's relative data size, ``weight_list``, and gives every client
the same number of local steps; neither is in the paper, and neither is done here). Defaults:
``server_lr`` 1 (FL-bench ``global_lr``, PFLlib ``server_learning_rate``, FedDyn's ``global_learning_rate``),
``weighting: uniform`` (the paper's 1/|S| mean, as all three).

Deviations: K counts the steps the client actually took (``train/steps``; a trailing one-image batch is skipped),
not a nominal K; c_i+ is accumulated as the mean gradient instead of read from (x - y_i) / (K eta_l): the two are
equal under plain SGD (up to float rounding), but with momentum beta in ``optimizer.*`` (x - y_i) / (K eta_l) is
about 1 / (1 - beta) times the mean gradient (FL-bench applies it so), and at ``cifar10_lt_quick``'s momentum 0.9
those ten-fold variates made client updates non-finite and every seed end at chance accuracy; ``weighting:
samples`` (not in the paper) weights the model average by sample count, so that SCAFFOLD with zero control
variates is exactly fedlt's FedAvg (c's update stays the paper's). Client batching (``backend.client_batching``):
the same update through the batched hooks (c - c_i in ``batched_terms`` and ``batched_grads``, the sum of the raw
minibatch gradients in ``batched_memory`` / ``batched_accumulate``, c_i+ and dc_i in ``batched_end``;
tests/strategies/test_scaffold_batching.py). Uploads besides weights: dc_i, one tensor per
trainable parameter (as large as the model); the server's c travels to every client every round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from fedlt.api.client import ClientContext
from fedlt.config import param
from fedlt.train.local import run_local_epochs, sgd
from strategies._common import pop_uploads, reply_weights, weighted_mean
from strategies.fedavg import FedAvgClient, FedAvgParams
from strategies.fedavg import Server as FedAvgServer

C = "scaffold.c."  # the server control variate (round arrays)
C_I = "scaffold.c_i."  # the client's control variate (ctx.state)
DC = "scaffold.dc."  # the client's upload: c_i+ - c_i


def trainable(model: torch.nn.Module, is_shared) -> dict[str, torch.nn.Parameter]:
    """The parameters control variates exist for: trainable and shared."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad and is_shared(k)}


class SCAFFOLDClient(FedAvgClient):
    extra_uploads = "the change of the client's control variate, one array per trainable parameter (scaffold.dc.*)"

    def train(self, ctx: ClientContext) -> dict[str, float]:
        model = ctx.model.train()
        params = trainable(model, self.is_shared)
        c = {k: ctx.received.get(C + k, torch.zeros_like(p)).to(p.device) for k, p in params.items()}
        c_i = {k: ctx.state.get(C_I + k, torch.zeros_like(p)).to(p.device) for k, p in params.items()}
        correction = {k: c[k] - c_i[k] for k in params}
        opt = sgd(list(params.values()), ctx.cfg["optimizer"])
        weight_decay = float(ctx.cfg["optimizer"].get("weight_decay") or 0.0)
        grad_sum = {k: torch.zeros_like(p) for k, p in params.items()}  # sum of g_i(y) over the steps: c_i+
        loss_fn = self.loss_fn(ctx)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            for k, p in params.items():
                if p.grad is not None:
                    grad_sum[k].add_(p.grad).add_(p.detach(), alpha=weight_decay)
                    p.grad.add_(correction[k])
            opt.step()
            return loss.detach().item()

        metrics = run_local_epochs(ctx.data, int(ctx.cfg["local_epochs"]), int(ctx.cfg["batch_size"]), ctx.generator,
                                   step, ctx.device)
        steps = int(metrics["train/steps"])
        if steps > 0:
            for k, p in params.items():
                new = grad_sum[k] / steps  # = option II's c_i - c + (x - y_i) / (K eta_l) under plain SGD
                ctx.uploads[DC + k] = (new - c_i[k]).cpu()
                ctx.state[C_I + k] = new.cpu()
        else:  # no step taken: c_i unchanged
            ctx.uploads.update({DC + k: torch.zeros_like(p).cpu() for k, p in params.items()})
        return metrics

    # client batching (backend.client_batching): the same update as train(), one client's step at a time under
    # vmap -- c - c_i per client in batched_terms, the raw minibatch gradient (+ weight decay) summed in the
    # memory (batched_accumulate), the correction added in batched_grads, c_i+ and dc_i in batched_end
    batched_ready = True
    CORRECTION = "scaffold/correction/"  # batched_terms: c - c_i
    SUM = "scaffold/sum/"  # batched_memory: the sum of g_i(y) + weight_decay * y over the steps
    STEPS = "scaffold/steps"  # batched_memory: the steps taken

    def batched_terms(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        terms = super().batched_terms(ctx)
        for k, p in trainable(ctx.model, self.is_shared).items():
            c = ctx.received.get(C + k, torch.zeros_like(p)).to(p.device)
            terms[self.CORRECTION + k] = c - ctx.state.get(C_I + k, torch.zeros_like(p)).to(p.device)
        return terms

    def batched_memory(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        memory = {self.SUM + k: torch.zeros_like(p.detach())
                  for k, p in trainable(ctx.model, self.is_shared).items()}
        return {**memory, self.STEPS: torch.zeros(())}

    def batched_accumulate(self, memory, grads, params, terms):
        wd = float(self.cfg["optimizer"].get("weight_decay") or 0.0)
        out = {name: v + grads[name[len(self.SUM):]] + wd * params[name[len(self.SUM):]]
               for name, v in memory.items() if name.startswith(self.SUM)}
        return {**out, self.STEPS: memory[self.STEPS] + 1}

    def batched_grads(self, grads, params, terms):
        return {n: g + terms[self.CORRECTION + n] if self.CORRECTION + n in terms else g for n, g in grads.items()}

    def batched_end(self, ctx: ClientContext) -> None:
        steps = int(ctx.memory[self.STEPS])
        for k, p in trainable(ctx.model, self.is_shared).items():
            c_i = ctx.state.get(C_I + k, torch.zeros_like(p)).cpu()
            if steps > 0:
                new = ctx.memory[self.SUM + k] / steps
                ctx.uploads[DC + k] = (new - c_i).cpu()
                ctx.state[C_I + k] = new.cpu()
            else:  # no step taken: c_i unchanged
                ctx.uploads[DC + k] = torch.zeros_like(p).cpu()


@dataclass(frozen=True)
class Params(FedAvgParams):
    server_lr: float = param(1.0, "global step size eta_g (FL-bench / PFLlib / FedDyn's code: 1)", lo=0.0,
                             lo_open=True)
    weighting: str = param("uniform", "model average over the replies: uniform (paper, FL-bench, PFLlib) or samples "
                                      "(by sample count, as FedAvg)", choices=("uniform", "samples"))


class Server(FedAvgServer):
    client_cls = SCAFFOLDClient
    params = Params

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.c: dict[str, torch.Tensor] = {}

    def initial_arrays(self, model: torch.nn.Module) -> ArrayRecord:
        self.c = {k: torch.zeros_like(p.detach()) for k, p in trainable(model, self.client_cls.is_shared).items()}
        return super().initial_arrays(model)

    def round_arrays(self, server_round: int) -> dict[str, torch.Tensor]:
        return {C + k: v for k, v in self.c.items()}

    def aggregate(self, server_round: int, sent: ArrayRecord, replies: list[Message]) -> ArrayRecord | None:
        uploads = pop_uploads(replies, DC)
        if not replies:
            return None
        s = self.cfg["strategy"]
        mean = weighted_mean(replies, reply_weights(replies, s["weighting"]))
        eta = float(s["server_lr"])
        out = {}
        for k, avg in mean.items():
            x = sent[k].numpy()
            new = x + eta * (avg - x) if k in self.c else avg  # buffers: plain average
            out[k] = Array(np.asarray(new, dtype=np.float64))  # merge() restores each array's dtype
        n = int(self.cfg["num_clients"])
        for k in self.c:
            self.c[k] = self.c[k] + sum(u[k] for u in uploads) / n
        return ArrayRecord(out)

    def server_state(self) -> dict:
        return {"c": {k: v.clone() for k, v in self.c.items()}}

    def load_server_state(self, state: dict) -> None:
        if "c" in state:
            self.c = {k: torch.as_tensor(v).clone() for k, v in state["c"].items()}
