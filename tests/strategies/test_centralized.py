"""Centralized: one virtual client (always client 0) trains on the pooled long-tailed training set."""

import numpy as np
import pytest

from strategies.centralized import Server, pooled_data
from tests.conftest import needs_fmnist
from tests.strategies.conftest import tiny_cfg


def test_the_trainer_is_always_the_one_virtual_client():
    server = Server(tiny_cfg({"name": "centralized"}, num_clients=7, participation=0.3))
    assert [server.sample_clients(r) for r in (1, 2, 9)] == [[0], [0], [0]]


@needs_fmnist
def test_pooled_data_is_exactly_the_long_tailed_training_set(tmp_path):
    from hydra import compose, initialize_config_dir

    from fedlt.cli import to_dict
    from fedlt.compose import CONFIG_DIR
    from fedlt.data.federated import prepare

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_dict(compose("config", overrides=["experiment=smoke", "num_clients=3"]))
    plan, split, _ = prepare(cfg)
    pooled = pooled_data(plan)
    np.testing.assert_array_equal(pooled.train_counts.numpy(), split.global_counts)
    assert pooled.num_train == len(split.lt_indices) == sum(len(t) for t in split.client_train)


@pytest.mark.parametrize("rnd", [1, 5])
def test_sampling_ignores_participation(rnd):
    assert Server(tiny_cfg({"name": "centralized"}, num_clients=20, participation=1.0)).sample_clients(rnd) == [0]
