"""FedAvg (McMahan et al., 2017): local SGD, sample-weighted averaging of every model array (BatchNorm
buffers included). FedAvg-FT is the shared personalization protocol (``personalization.finetune_epochs`` > 0,
fedlt.core.personalize): the same fine-tuning budget as every other method without a personal model."""

from __future__ import annotations

from dataclasses import dataclass

from fedlt.api.client import ClientAlgorithm
from fedlt.api.server import ServerAlgorithm


@dataclass(frozen=True)
class FedAvgParams:
    """FedAvg has no options (its fine-tuning is the shared ``personalization.*``)."""


class FedAvgClient(ClientAlgorithm):
    """The base class's local SGD and predictor: FedAvg's client side."""


class Server(ServerAlgorithm):
    client_cls = FedAvgClient
    params = FedAvgParams
    secagg_ready = True  # the aggregate is the plain sample-weighted mean (privacy.secagg)
