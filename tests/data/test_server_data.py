"""The server-held balanced set (``server_data.per_class``): N training images of every class drawn with the run's
seed from the long-tailed training set before the partition -- no client holds them, nothing comes from test
data -- recorded in partition.json; off (0 / null without a strategy asking for it), the split is the one drawn
before the option existed (same split file key, no server indices)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt.config import ConfigError
from fedlt.data.federated import (prepare, profile_counts, server_data, server_set_size, split_key, summary)
from fedlt.data_cli import compose_config
from fedlt.validate import validate, validate_server_data

SYNTH = ["dataset=synthetic_lt", "dataset.num_classes=12", "dataset.train_per_class=40", "dataset.test_per_class=10",
         "dataset.image_size=8", "dataset.imbalance_factor=10", "num_clients=6", "seed=5"]  # smallest class: 4


def config(tmp_path, *overrides) -> dict:
    return validate(compose_config([*SYNTH, f"cache_dir={tmp_path / 'cache'}", *overrides]))


def test_server_set_is_balanced_drawn_from_the_long_tail_and_held_out_from_every_client(tmp_path):
    off_cfg = config(tmp_path)
    plan0, off, source = prepare(off_cfg)
    cfg = config(tmp_path, "server_data.per_class=3")
    plan, split, _ = prepare(cfg)
    labels = np.asarray(source.train_y)
    assert np.bincount(labels[split.server_indices], minlength=12).tolist() == [3] * 12
    assert np.isin(split.server_indices, split.lt_indices).all()  # from the long-tailed TRAINING set
    clients = np.concatenate(split.client_train)
    assert np.intersect1d(clients, split.server_indices).size == 0  # held out before the partition
    assert np.array_equal(np.sort(np.concatenate([clients, split.server_indices])), np.sort(split.lt_indices))
    assert np.array_equal(split.global_counts, off.global_counts)  # the long-tail profile itself is unchanged
    s = summary(split, source, cfg)
    assert s["server_data"]["class_counts"] == [3] * 12 and s["server_data"]["size"] == 36
    assert sum(s["client_train_sizes"]) == s["train_size"] - 36
    view = server_data(plan)
    assert view.train_counts.tolist() == [3] * 12 and view.train_x.dtype.is_floating_point is False
    # the run's seed draws it: the same seed gives the same set, another seed another one
    assert np.array_equal(prepare(cfg)[1].server_indices, split.server_indices)
    other = prepare(config(tmp_path, "server_data.per_class=3", "seed=6"))[1]
    assert not np.array_equal(other.server_indices, split.server_indices)


def test_off_leaves_the_split_as_it_was(tmp_path):
    cfg = config(tmp_path)
    assert cfg["server_data"]["per_class"] is None  # the default: none unless the strategy asks for a set
    plan, split, source = prepare(cfg)
    assert split.server_indices.size == 0 and server_data(plan) is None
    assert "server_data" not in summary(split, source, cfg)
    assert split_key(source, cfg, server_set_size(cfg, profile_counts(source, cfg["dataset"]))) == split_key(source,
                                                                                                            cfg)
    zero = config(tmp_path, "server_data.per_class=0")
    _, split0, _ = prepare(zero)
    assert all(np.array_equal(a, b) for a, b in zip(split0.client_train, split.client_train, strict=True))


def test_a_strategy_that_needs_a_set_gets_one_that_fits(tmp_path):
    cfg = config(tmp_path, "strategy=ratioloss")  # server_per_class 10 > half the smallest class (4)
    _, split, source = prepare(cfg)
    assert np.bincount(np.asarray(source.train_y)[split.server_indices], minlength=12).tolist() == [2] * 12
    explicit = config(tmp_path, "strategy=ratioloss", "server_data.per_class=3")
    assert validate_server_data(explicit, profile_counts(source, explicit["dataset"])) == 3


def test_too_large_or_bad_values_are_refused(tmp_path):
    cfg = config(tmp_path, "server_data.per_class=4")
    _, _, source = prepare(config(tmp_path))
    counts = profile_counts(source, cfg["dataset"])
    with pytest.raises(ConfigError, match=r"server_data.per_class=4.*smallest class, 10, has 4 .*at most 3"):
        validate_server_data(cfg, counts)
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(ConfigError, match="server_data.per_class"):
            config(tmp_path, f"server_data.per_class={bad}")
    with pytest.raises(ConfigError, match="server_data.per_class=0 for strategy=ratioloss"):
        config(tmp_path, "strategy=ratioloss", "server_data.per_class=0")
    tiny = config(tmp_path, "strategy=ratioloss", "dataset.imbalance_factor=40")  # smallest class: 1 image
    with pytest.raises(ConfigError, match="strategy=ratioloss needs a server-held set"):
        validate_server_data(tiny, profile_counts(source, tiny["dataset"]))
