"""FedLC (Zhang et al., 2022): FedAvg with a calibrated local loss, CE(z - tau * n_c^(-1/4), y) on the client's
own class counts n_c (fedlt.train.losses.logit_calibration): the rarer a class locally, the larger the offset
subtracted from its logit. Classes the client does not hold get an infinite offset, i.e. they are left out of
the training softmax (what FL-bench and PFLlib compute, pow(0, -1/4) = inf). Standard softmax CE on calibrated
logits, as FL-bench/PFLlib; the paper's pairwise form (target class dropped from the denominator) collapsed
training per the FL-bench maintainer. Prediction uses the raw logits. ``loss=`` must stay ``ce``."""

from __future__ import annotations

from fedlt.config import check_float
from fedlt.federation.algorithm import ClientAlgorithm, ClientContext
from fedlt.federation.strategy import FedLTStrategy
from fedlt.train.losses import logit_calibration
from strategies._common import require_ce


class FedLCClient(ClientAlgorithm):
    def loss_fn(self, ctx: ClientContext):
        return logit_calibration(ctx.data.train_counts.float(), tau=float(ctx.strategy["tau"]))


class Server(FedLTStrategy):
    client_cls = FedLCClient

    @staticmethod
    def validate_config(cfg: dict) -> None:
        check_float(cfg, "strategy.tau", 0.0)
        require_ce(cfg, "FedLC is defined by its calibrated loss")
