"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization"): FedAvg clients; the server applies Adam to
the pseudo-gradient (averaged - sent) -- Flower's own ``flwr.serverapp.strategy.FedAdam`` does the update:
``m = b1 m + (1-b1) d``, ``v = b2 v + (1-b2) d^2``,
``w = w + eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) * m / (sqrt(v) + tau)`` (t = the round). BatchNorm buffers
are plain averages (strategies/_server_opt.py). The moments m, v are server state."""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam

from fedlt.config import check_float
from fedlt.federation.strategy import FedLTStrategy
from strategies._server_opt import ServerOptimizer, to_numpy, to_tensors, validate_common
from strategies.fedavg import FedAvgClient


class Server(ServerOptimizer, FedLTStrategy, FedAdam):
    client_cls = FedAvgClient

    def flower_kwargs(self) -> dict:
        s = self.cfg["strategy"]
        return {"eta": float(s["server_lr"]), "eta_l": float(self.cfg["optimizer"]["lr"]),
                "beta_1": float(s["beta_1"]), "beta_2": float(s["beta_2"]), "tau": float(s["tau"])}

    def remember_sent(self, arrays: ArrayRecord) -> None:
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}  # as Flower's FedOpt.configure_train

    def server_state(self) -> dict:
        """Adam's first and second moments, keyed by array name."""
        return {name: to_tensors(moment) for name, moment in (("m_t", self.m_t), ("v_t", self.v_t)) if moment}

    def load_server_state(self, state: dict) -> None:
        self.m_t = to_numpy(state["m_t"]) if "m_t" in state else None
        self.v_t = to_numpy(state["v_t"]) if "v_t" in state else None

    @staticmethod
    def validate_config(cfg: dict) -> None:
        validate_common(cfg)
        check_float(cfg, "strategy.beta_1", 0.0, 1.0, hi_open=True)
        check_float(cfg, "strategy.beta_2", 0.0, 1.0, hi_open=True)
        check_float(cfg, "strategy.tau", 0.0, lo_open=True)
