"""Global vs local long tails and quantity skew (partition=local_lt, global_local_lt, quantity_skew): the stated
per-client imbalance factors, sizes that follow the requested skew, one seed one split, and the regime on record."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt.config import ConfigError
from fedlt.data.federated import prepare, summary
from fedlt.data.longtail import longtail_counts
from fedlt.data.partition import PartitionError, _local_profiles, partition
from fedlt.data_cli import compose_config
from fedlt.validate import validate

BALANCED = np.repeat(np.arange(10), 2000)
LONG_TAIL = np.repeat(np.arange(10), longtail_counts(10, 2000, 50))


def counts_of(labels, parts, k=10):
    return np.stack([np.bincount(labels[p], minlength=k) for p in parts])


def requested(n, k, seed, lo, hi, ordering):
    factors, w = _local_profiles(n, k, np.random.default_rng(seed), lo, hi, ordering, "test")
    return factors, np.argsort(-w, axis=1, kind="stable")  # each client's class order, head first


@pytest.mark.parametrize("ordering", ["random", "shifted", "global"])
def test_local_lt_gives_every_client_its_own_imbalance_factor_and_order(ordering):
    parts = partition(BALANCED, 20, "local_lt", seed=3, imbalance_factor_min=5, imbalance_factor_max=50,
                      ordering=ordering)
    cc = counts_of(BALANCED, parts)
    factors, order = requested(20, 10, 3, 5, 50, ordering)
    assert factors.min() >= 5 and factors.max() <= 50 and factors.max() / factors.min() > 3  # really per client
    for k in range(20):
        head, tail = cc[k].max(), cc[k].min()
        # n = floor(m * IF^(-rank/(C-1))): the tail is floor(m / IF_k) and the head floor(m)
        assert head / factors[k] - 1 < tail < (head + 1) / factors[k], (k, head, tail, factors[k])
        assert np.all(np.diff(cc[k][order[k]]) <= 0)  # counts fall along the client's own class order
        assert cc[k][order[k][0]] == head
    heads = {int(order[k][0]) for k in range(20)}
    if ordering == "global":
        assert heads == {0}
    elif ordering == "shifted":
        assert heads == set(range(10)) and all(order[k][0] == k % 10 for k in range(20))
    else:
        assert len(heads) > 3
    assert cc.sum(axis=0).max() <= 2000  # never more than the pool
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # no image twice
    again = partition(BALANCED, 20, "local_lt", seed=3, imbalance_factor_min=5, imbalance_factor_max=50,
                      ordering=ordering)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_local_lt_with_shifted_order_uses_almost_the_whole_balanced_pool():
    parts = partition(BALANCED, 20, "local_lt", seed=1, imbalance_factor_min=10, imbalance_factor_max=10,
                      ordering="shifted")
    cc = counts_of(BALANCED, parts)
    assert cc.sum() >= 0.99 * len(BALANCED)  # each class is every rank exactly twice
    assert np.allclose(cc.max(1) / cc.min(1), 10, rtol=0.05)


def test_local_lt_refuses_a_pool_too_small_for_its_tails():
    with pytest.raises(PartitionError, match="imbalance_factor_max"):
        partition(np.repeat(np.arange(10), 30), 20, "local_lt", seed=0, imbalance_factor_min=100,
                  imbalance_factor_max=100)


def test_global_local_lt_keeps_the_global_long_tail_and_skews_every_client_its_own_way():
    parts = partition(LONG_TAIL, 20, "global_local_lt", seed=2, imbalance_factor_min=10, imbalance_factor_max=10,
                      ordering="random")
    allidx = np.sort(np.concatenate(parts))
    assert np.array_equal(allidx, np.arange(len(LONG_TAIL)))  # every image used once: the global tail is exact
    cc = counts_of(LONG_TAIL, parts)
    _, order = requested(20, 10, 2, 10, 10, "random")
    # within a class, clients get shares proportional to their own weight: a client whose head the class is gets
    # more of it than a client for which it is the tail
    for c in range(10):
        heads = [k for k in range(20) if order[k][0] == c]
        tails = [k for k in range(20) if order[k][-1] == c]
        for h in heads:
            for t in tails:
                assert cc[h, c] >= cc[t, c]
    assert not np.array_equal(partition(LONG_TAIL, 20, "global_local_lt", seed=3)[0], parts[0])


def test_quantity_skew_sizes_follow_the_requested_distribution():
    n, N = len(LONG_TAIL), 200
    parts = partition(np.tile(LONG_TAIL, 4), N, "quantity_skew", seed=4, distribution="lognormal", sigma=0.5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 4 * n
    assert np.std(np.log(sizes)) == pytest.approx(0.5, abs=0.08)  # log-normal spread sigma
    equal = [len(p) for p in partition(LONG_TAIL, 7, "quantity_skew", seed=4, sigma=0.0)]
    assert max(equal) - min(equal) <= 1  # sigma 0: FedLab's balanced sizes
    shares = [len(p) for p in partition(LONG_TAIL, 50, "quantity_skew", seed=4, distribution="dirichlet",
                                        size_alpha=0.3)]
    assert sum(shares) == n and np.std(shares) / np.mean(shares) > 1.0  # Dir(0.3): very unequal
    big = max(parts, key=len)  # an IID class mix: the largest client's label mix follows the global long tail
    mix = np.bincount(np.tile(LONG_TAIL, 4)[big], minlength=10) / len(big)
    assert np.abs(mix - np.bincount(LONG_TAIL) / n).max() < 0.05
    again = partition(np.tile(LONG_TAIL, 4), N, "quantity_skew", seed=4, distribution="lognormal", sigma=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


SYNTH = ["dataset=synthetic_lt", "dataset.num_classes=10", "dataset.train_per_class=60", "dataset.test_per_class=10",
         "dataset.image_size=8", "num_clients=5", "seed=5"]


def test_the_regime_is_recorded_and_local_lt_needs_balanced_global_data(tmp_path):
    base = [*SYNTH, f"cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match="dataset.imbalance_factor=1"):
        validate(compose_config([*base, "dataset.imbalance_factor=10", "partition=local_lt"]))
    cfg = validate(compose_config([*base, "dataset.imbalance_factor=1", "partition=local_lt",
                                   "partition.imbalance_factor_min=3", "partition.imbalance_factor_max=6"]))
    _, split, source = prepare(cfg)
    s = summary(split, source, cfg)
    assert s["regime"].startswith("balanced global data, per-client long tails")
    assert all(3 <= f <= 6 * 1.5 for f in s["client_imbalance_factors"])
    assert s["unassigned_train_images"] == 600 - sum(s["client_train_sizes"]) >= 0
    cfg = validate(compose_config([*base, "dataset.imbalance_factor=10", "partition=global_local_lt"]))
    s = summary(*prepare(cfg)[1:], cfg)
    assert s["regime"].startswith("global long tail (IF=10) and per-client long tails")
    assert s["unassigned_train_images"] == 0
    cfg = validate(compose_config([*base, "dataset.imbalance_factor=10"]))
    s = summary(*prepare(cfg)[1:], cfg)
    assert s["regime"] == "global long tail (IF=10), dirichlet split"
    from fedlt.data.figure import partition_figure

    assert "global long tail (IF=10), dirichlet split" in partition_figure(s).get_suptitle()


@pytest.mark.parametrize("override,named", [
    ("partition.ordering=sorted", "partition.ordering='sorted'"),
    ("partition.imbalance_factor_min=0.5", "partition.imbalance_factor_min=0.5"),
])
def test_bad_regime_options_are_refused(tmp_path, override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        validate(compose_config([*SYNTH, "dataset.imbalance_factor=1", "partition=local_lt", override]))


@pytest.mark.parametrize("override,named", [("partition.distribution=pareto", "partition.distribution='pareto'"),
                                            ("partition.size_alpha=0", "partition.size_alpha=0")])
def test_bad_quantity_skew_options_are_refused(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        validate(compose_config([*SYNTH, "partition=quantity_skew", override]))
