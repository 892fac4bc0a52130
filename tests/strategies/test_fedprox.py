"""FedProx: the proximal term mu/2 ||w - w_global||^2 pulls the local model towards the model it received."""

import torch

from strategies.fedprox import FedProxClient
from tests.strategies.conftest import build, context, tiny_cfg, tiny_data


def distance_after_training(mu: float) -> float:
    cfg = tiny_cfg({"name": "fedprox", "mu": mu, "finetune_epochs": 0}, local_epochs=3, batch_size=8)
    model = build(FedProxClient, cfg)
    received = [p.detach().clone() for p in model.parameters()]
    FedProxClient(cfg).train(context(model, tiny_data(), cfg))
    return float(sum(((p.detach() - r) ** 2).sum() for p, r in zip(model.parameters(), received, strict=True)))


def test_proximal_term_keeps_the_local_model_near_the_global_one():
    free, prox = distance_after_training(0.0), distance_after_training(1.0)
    assert free > 0 and prox < 0.7 * free


def test_mu_zero_is_fedavg():
    from strategies.fedavg import FedAvgClient

    cfg = tiny_cfg({"name": "fedprox", "mu": 0.0, "finetune_epochs": 0})
    a, b = build(FedProxClient, cfg), build(FedAvgClient, cfg)
    FedProxClient(cfg).train(context(a, tiny_data(), cfg))
    FedAvgClient(cfg).train(context(b, tiny_data(), cfg))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
