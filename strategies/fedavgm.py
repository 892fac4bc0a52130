"""FedAvgM (Hsu et al., 2019): FedAvg clients; the server treats (sent - averaged) as a pseudo-gradient and
applies SGD with momentum to it -- Flower's own ``flwr.serverapp.strategy.FedAvgM`` does the update
(``v = momentum * v + g`` (v = g in the first round); ``w = w - server_lr * v``; no Nesterov). BatchNorm
buffers are plain averages (strategies/_server_opt.py). The momentum vector is server state."""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvgM

from fedlt.config import check_float
from fedlt.federation.strategy import FedLTStrategy
from strategies._server_opt import ServerOptimizer, to_numpy, to_tensors, validate_common
from strategies.fedavg import FedAvgClient


class Server(ServerOptimizer, FedLTStrategy, FedAvgM):
    client_cls = FedAvgClient

    def flower_kwargs(self) -> dict:
        s = self.cfg["strategy"]
        return {"server_learning_rate": float(s["server_lr"]), "server_momentum": float(s["server_momentum"])}

    def remember_sent(self, arrays: ArrayRecord) -> None:
        self.current_arrays = arrays  # what Flower's FedAvgM.configure_train would have kept

    def server_state(self) -> dict:
        """The momentum vector, keyed by array name (Flower keeps it as a list in the arrays' key order)."""
        if self.momentum_vector is None or self.current_arrays is None:
            return {}
        return {"momentum": to_tensors(dict(zip(self.current_arrays.keys(), self.momentum_vector, strict=True)))}

    def load_server_state(self, state: dict) -> None:
        if "momentum" in state:
            self.momentum_vector = list(to_numpy(state["momentum"]).values())

    @staticmethod
    def validate_config(cfg: dict) -> None:
        validate_common(cfg)
        check_float(cfg, "strategy.server_momentum", 0.0, 1.0, hi_open=True)
