"""FedBN (Li et al., ICLR 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization"):
FedAvg in which every BatchNorm layer stays on its client -- its affine weight and bias and its running statistics
(``running_mean``, ``running_var``, ``num_batches_tracked``) -- and everything else is averaged (sample-weighted,
as fedlt's FedAvg).

Checked against the official code, med-air/FedBN at commit 2fa38adf627a8c8ba71c5fb515b1f2ba00aa8812,
``federated/fed_digits.py``: ``communication`` with ``mode=fedbn`` averages every state-dict key except those
containing ``bn`` (weights and statistics alike), and each client trains and is tested with its own model (local
BN + averaged rest). FL-bench (``src/client/fedbn.py``) makes the same keys personal. FedBN has no option of its
own; the official run-level defaults (SGD lr 1e-2, batch 32, 1 local epoch) are fedlt's run options.

How: matching ``bn`` in key names finds none of the CNN's BatchNorm layers (``backbone.body.1``) nor the ResNet
shortcuts' (``...shortcut.1``), so ``build_model`` finds them by type and moves each one under ``local_bn.``
(``local_bn.backbone-body-1.weight``, ...), leaving a stateless stand-in in its place that calls it: the forward
pass is unchanged, only the keys move. ``personal_prefixes = ("local_bn.",)`` then applies the core's one rule:
those keys are never sent, never uploaded, stay with their client between rounds and are checkpointed with its
state. A client never sampled still has the common initial BatchNorm (official: every client starts from the
server's initial model).

Deviations: the official code averages with equal client weights (``client_weights = 1/client_num``, all five
clients every round); fedlt's FedAvg weights by sample count, and FedBN is FedAvg minus BatchNorm, so it does the
same here. Uploads besides weights: none (less than FedAvg: no BatchNorm parameters or statistics).

Predictors: personalized = the averaged weights with the client's own BatchNorm (stage "after"). Generic: not
applicable -- the server never holds a BatchNorm layer (the official code never tests a global FedBN model), so
``generic/accuracy`` is logged as null, as for ``local``."""

from __future__ import annotations

import torch
from torch import nn

from fedlt.api.client import ClientAlgorithm
from fedlt.api.server import NoParams, ServerAlgorithm
from fedlt.models.norm import norm_name

LOCAL = "local_bn"  # the module (and state-dict prefix) holding every BatchNorm layer
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class LocalBatchNorm(nn.Module):
    """Stand-in left where a BatchNorm layer was: it calls the layer, which is registered under ``local_bn``
    only (held outside ``_modules``, so its parameters and buffers have one key each, the ``local_bn.`` one)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "layer", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def extra_repr(self) -> str:
        return f"-> {LOCAL}"


def localize_batch_norms(model: nn.Module) -> nn.Module:
    """Move every BatchNorm layer of ``model`` under ``model.local_bn`` (key: its path with '.' -> '-')."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, BATCH_NORMS)]
    if not found:
        raise ValueError("fedbn: the model has no BatchNorm layer, so FedBN would be FedAvg")
    local = nn.ModuleDict()
    for name, layer in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, LocalBatchNorm(layer))
        local[name.replace(".", "-")] = layer
    model.local_bn = local
    return model


class FedBNClient(ClientAlgorithm):
    personal_prefixes = (LOCAL + ".",)

    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        return "after"  # the client's own BatchNorm layers

    @staticmethod
    def build_model(base: nn.Module, cfg: dict) -> nn.Module:
        return localize_batch_norms(base)


class Server(ServerAlgorithm):
    client_cls = FedBNClient
    params = NoParams
    secagg_ready = True  # the aggregate is the plain sample-weighted mean (privacy.secagg)

    @staticmethod
    def validate_config(cfg: dict) -> None:
        norm = norm_name(cfg.get("model"))
        if norm != "batch":
            from fedlt.config import ConfigError

            raise ConfigError(f"invalid combination strategy=fedbn with model.norm={norm}: FedBN keeps every "
                              f"BatchNorm layer on its client, and a model.norm={norm} model has none (FedBN would be "
                              f"FedAvg); use model.norm=batch.")

    def generic_metrics(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        batch_size: int, evaluation=None) -> tuple[dict, dict]:
        return {"generic/accuracy": None}, {"not_applicable": "FedBN has no global BatchNorm layers"}
