"""FedLC: local training uses CE on logits calibrated by tau * n_c^(-1/4); n_c are the client's own counts
(strategy.counts=local, the paper's and FL-bench's choice) or the counts summed over all clients of the split
(strategy.counts=global, PFLlib's choice)."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from fedlt.config import ConfigError
from fedlt.data.federated import FederatedSplit
from strategies.fedlc import FedLCClient, Server
from tests.strategies.conftest import validate_strategy, build, context, tiny_cfg, tiny_data

DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/strategy/fedlc.yaml").read_text())


def test_default_calibrates_with_the_clients_own_counts():
    assert DEFAULTS["counts"] == "local" and DEFAULTS["tau"] == 1.0
    validate_strategy(Server, tiny_cfg(DEFAULTS))


def test_client_loss_subtracts_calibration_offsets():
    cfg = tiny_cfg({**DEFAULTS, "tau": 0.7})
    data = tiny_data((12, 6, 0, 2))
    loss = FedLCClient(cfg).loss_fn(context(build(FedLCClient, cfg), data, cfg))
    z = torch.randn(5, 4)
    y = torch.tensor([0, 1, 3, 0, 1])
    n = torch.tensor([12.0, 6.0, 2.0])
    expected = F.cross_entropy(z[:, [0, 1, 3]] - 0.7 * n ** -0.25, torch.tensor([0, 1, 2, 0, 1]))
    assert torch.allclose(loss(z, y), expected, atol=1e-6)
    assert not torch.allclose(loss(z, y), F.cross_entropy(z, y))


def test_global_counts_are_the_split_counts_summed_over_clients(tmp_path):
    class_counts = np.array([[12, 6, 0, 2], [0, 3, 5, 0], [1, 0, 0, 0]])
    split = FederatedSplit(lt_indices=np.arange(29), client_train=[np.arange(20), np.arange(8), np.arange(1)],
                           client_test=[np.arange(2)] * 3, class_counts=class_counts,
                           global_counts=class_counts.sum(0))
    split.save(tmp_path / "split.npz")
    data = tiny_data((12, 6, 0, 2))
    data = replace(data, plan=replace(data.plan, split_path=str(tmp_path / "split.npz")))
    cfg = tiny_cfg({**DEFAULTS, "tau": 0.7, "counts": "global"})
    validate_strategy(Server, cfg)
    loss = FedLCClient(cfg).loss_fn(context(build(FedLCClient, cfg), data, cfg))
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 3, 0, 1])
    n = torch.tensor([13.0, 9.0, 5.0, 2.0])  # class 2: absent locally, present elsewhere -> a finite offset
    assert torch.allclose(loss(z, y), F.cross_entropy(z - 0.7 * n ** -0.25, y), atol=1e-6)
    local_cfg = tiny_cfg({**DEFAULTS, "tau": 0.7})
    local = FedLCClient(local_cfg).loss_fn(context(build(FedLCClient, local_cfg), data, local_cfg))
    assert not torch.allclose(loss(z, y), local(z, y))


def test_counts_option_is_validated():
    with pytest.raises(ConfigError, match="strategy.counts='server'"):
        validate_strategy(Server, tiny_cfg({**DEFAULTS, "counts": "server"}))


def test_calibration_changes_the_local_update():
    from strategies.fedavg import FedAvgClient

    cfg = tiny_cfg({**DEFAULTS, "tau": 1.0})
    calibrated, plain = build(FedLCClient, cfg), build(FedAvgClient, cfg)
    FedLCClient(cfg).train(context(calibrated, tiny_data(), cfg))
    FedAvgClient(cfg).train(context(plain, tiny_data(), cfg))
    assert not torch.allclose(calibrated.head.weight, plain.head.weight)
