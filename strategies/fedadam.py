"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization"): FedAvg clients; the server applies Adam to
the pseudo-gradient (averaged - sent) -- Flower's own ``flwr.serverapp.strategy.FedAdam`` does the update:
``m = b1 m + (1-b1) d``, ``v = b2 v + (1-b2) d^2``,
``w = w + eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) * m / (sqrt(v) + tau)`` (t = the round). BatchNorm buffers
are plain averages (strategies/_server_opt.py). The moments m, v are server state."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam

from fedlt.config import param
from strategies._server_opt import ServerOptimizer, to_numpy, to_tensors
from strategies.fedavg import FedAvgParams


@dataclass(frozen=True)
class Params(FedAvgParams):
    server_lr: float = param(0.1, "server learning rate eta (Flower's default)", lo=0.0, lo_open=True)
    beta_1: float = param(0.9, "first-moment decay", lo=0.0, hi=1.0, hi_open=True)
    beta_2: float = param(0.99, "second-moment decay", lo=0.0, hi=1.0, hi_open=True)
    tau: float = param(0.001, "adaptivity (added to sqrt(v))", lo=0.0, lo_open=True)


class Server(ServerOptimizer):
    params = Params
    secagg_ready = True  # its server step needs only the sample-weighted mean (privacy.secagg)

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        s = cfg["strategy"]
        self.flower = FedAdam(eta=float(s["server_lr"]), eta_l=float(cfg["optimizer"]["lr"]),
                              beta_1=float(s["beta_1"]), beta_2=float(s["beta_2"]), tau=float(s["tau"]))

    def remember_sent(self, sent: ArrayRecord) -> None:
        self.flower.current_arrays = {k: a.numpy() for k, a in sent.items()}  # as Flower's FedOpt.configure_train

    def server_state(self) -> dict:
        """Adam's first and second moments, keyed by array name."""
        f = self.flower
        return {name: to_tensors(moment) for name, moment in (("m_t", f.m_t), ("v_t", f.v_t)) if moment}

    def load_server_state(self, state: dict) -> None:
        self.flower.m_t = to_numpy(state["m_t"]) if "m_t" in state else None
        self.flower.v_t = to_numpy(state["v_t"]) if "v_t" in state else None
