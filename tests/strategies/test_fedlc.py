"""FedLC: local training uses CE on logits calibrated by tau * n_c^(-1/4) of the client's own counts."""

import torch
import torch.nn.functional as F

from strategies.fedlc import FedLCClient
from tests.strategies.conftest import build, context, tiny_cfg, tiny_data


def test_client_loss_subtracts_calibration_offsets():
    cfg = tiny_cfg({"name": "fedlc", "tau": 0.7})
    data = tiny_data((12, 6, 0, 2))
    loss = FedLCClient(cfg).loss_fn(context(build(FedLCClient, cfg), data, cfg))
    z = torch.randn(5, 4)
    y = torch.tensor([0, 1, 3, 0, 1])
    n = torch.tensor([12.0, 6.0, 2.0])
    expected = F.cross_entropy(z[:, [0, 1, 3]] - 0.7 * n ** -0.25, torch.tensor([0, 1, 2, 0, 1]))
    assert torch.allclose(loss(z, y), expected, atol=1e-6)
    assert not torch.allclose(loss(z, y), F.cross_entropy(z, y))


def test_calibration_changes_the_local_update():
    from strategies.fedavg import FedAvgClient

    cfg = tiny_cfg({"name": "fedlc", "tau": 1.0, "finetune_epochs": 0})
    calibrated, plain = build(FedLCClient, cfg), build(FedAvgClient, cfg)
    FedLCClient(cfg).train(context(calibrated, tiny_data(), cfg))
    FedAvgClient(cfg).train(context(plain, tiny_data(), cfg))
    assert not torch.allclose(calibrated.head.weight, plain.head.weight)
