"""FedAvgM (Hsu et al., 2019): FedAvg clients; the server treats (sent - averaged) as a pseudo-gradient and
applies SGD with momentum to it -- Flower's own ``flwr.serverapp.strategy.FedAvgM`` does the update
(``v = momentum * v + g`` (v = g in the first round); ``w = w - server_lr * v``; no Nesterov). BatchNorm
buffers are plain averages (strategies/_server_opt.py). The momentum vector is server state."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvgM

from fedlt.config import param
from strategies._server_opt import ServerOptimizer, to_numpy, to_tensors
from strategies.fedavg import FedAvgParams


@dataclass(frozen=True)
class Params(FedAvgParams):
    server_lr: float = param(1.0, "server learning rate (Flower's server_learning_rate)", lo=0.0, lo_open=True)
    server_momentum: float = param(0.9, "server momentum in [0, 1) (FL-bench's default; Hsu et al. sweep it)",
                                   lo=0.0, hi=1.0, hi_open=True)


class Server(ServerOptimizer):
    params = Params
    secagg_ready = True  # its server step needs only the sample-weighted mean (privacy.secagg)

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        s = cfg["strategy"]
        self.flower = FedAvgM(server_learning_rate=float(s["server_lr"]), server_momentum=float(s["server_momentum"]))

    def remember_sent(self, sent: ArrayRecord) -> None:
        self.flower.current_arrays = sent  # what Flower's FedAvgM.configure_train would have kept

    def server_state(self) -> dict:
        """The momentum vector, keyed by array name (Flower keeps it as a list in the arrays' key order)."""
        f = self.flower
        if f.momentum_vector is None or f.current_arrays is None:
            return {}
        return {"momentum": to_tensors(dict(zip(f.current_arrays.keys(), f.momentum_vector, strict=True)))}

    def load_server_state(self, state: dict) -> None:
        if "momentum" in state:
            self.flower.momentum_vector = list(to_numpy(state["momentum"]).values())
