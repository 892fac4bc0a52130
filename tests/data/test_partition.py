import numpy as np
import pytest

from fedlt.data.longtail import longtail_counts
from fedlt.data.partition import PartitionError, dirichlet_official, partition

# fedloge-protocol.md §5.2: N=40, seed 3407, official per-sample Dirichlet split
GOLDEN = [
    (10, 0.5, 50, (66, 237, 995), [226, 200, 143, 400, 329], 8.1),
    (10, 0.5, 100, (90, 215, 1106), [215, 141, 207, 171, 243], 7.8),
    (10, 1.0, 50, (146, 320, 720), [265, 279, 338, 591, 172], 9.3),
    (10, 1.0, 100, (96, 271, 730), [257, 284, 401, 688, 137], 8.5),
    (100, 0.5, 50, (214, 316, 409), [270, 281, 386, 244, 332], 51.0),
    (100, 0.5, 100, (185, 264, 406), [264, 285, 233, 378, 283], 46.7),
    (100, 1.0, 50, (239, 308, 408), [287, 313, 403, 401, 288], 61.2),
    (100, 1.0, 100, (172, 270, 399), [258, 226, 281, 299, 258], 54.8),
]


@pytest.mark.parametrize("k,alpha,IF,min_med_max,first5,mean_classes", GOLDEN)
def test_official_dirichlet_split_reproduces_golden_client_sizes(k, alpha, IF, min_med_max, first5, mean_classes):
    counts = longtail_counts(k, 5000 if k == 10 else 500, IF)
    labels = np.repeat(np.arange(k), counts)
    parts = dirichlet_official(labels, 40, alpha, 3407)
    sizes = [len(p) for p in parts]
    assert sizes[:5] == first5
    assert (min(sizes), int(np.median(sizes)), max(sizes)) == min_med_max
    assert round(float(np.mean([len(np.unique(labels[p])) for p in parts])), 1) == mean_classes


@pytest.mark.parametrize("name,params", [("dirichlet", {"alpha": 0.3}), ("iid", {})])
def test_every_index_used_exactly_once(name, params):
    labels = np.repeat(np.arange(10), longtail_counts(10, 300, 20))
    parts = partition(labels, 17, name, seed=5, **params)
    assert len(parts) == 17
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(labels)))


def test_min_samples_guard_fails_after_bounded_attempts():
    labels = np.repeat(np.arange(3), [50, 5, 1])
    with pytest.raises(PartitionError, match="min_samples_per_client=30"):
        partition(labels, 10, "dirichlet", seed=0, min_samples_per_client=30, max_attempts=5, alpha=0.1)


# ------------------------------------------------------------------ every partitioner: invariants (hypothesis)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedlt.data.partition import PARTITIONERS, dirichlet_balanced, shards  # noqa: E402

ALL = [("dirichlet", {"alpha": 0.3}), ("dirichlet_balanced", {"alpha": 0.3}), ("dirichlet_per_client", {"alpha": 0.3}),
       ("shards", {"classes_per_client": 2}), ("iid", {}), ("local_lt", {}), ("global_local_lt", {}),
       ("quantity_skew", {})]  # the last three: tests/data/test_regimes.py


def test_every_partitioner_is_registered_and_covered():
    assert sorted(PARTITIONERS) == sorted(n for n, _ in ALL)


def check_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))  # every index exactly once
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats


@st.composite
def labelled(draw):
    k = draw(st.integers(2, 12))
    counts = draw(st.lists(st.integers(1, 60), min_size=k, max_size=k))
    labels = np.repeat(np.arange(k), counts)
    n_clients = draw(st.integers(1, min(len(labels), 15)))
    return labels, n_clients, draw(st.integers(0, 2**31)), draw(st.sampled_from([0.05, 0.3, 1.0, 10.0]))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labelled())
def test_dirichlet_family_invariants(case):
    labels, n_clients, seed, alpha = case
    n = len(labels)
    for name in ("dirichlet", "dirichlet_balanced", "dirichlet_per_client"):
        try:
            parts = partition(labels, n_clients, name, seed=seed, alpha=alpha)
        except PartitionError as e:  # only the bounded re-draw of dirichlet_balanced may give up
            assert name == "dirichlet_balanced" and "max_redraws" in str(e)
            continue
        assert len(parts) == n_clients
        check_exact_cover(parts, n)
        if name != "dirichlet":  # equal client sizes
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
        again = partition(labels, n_clients, name, seed=seed, alpha=alpha)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))  # one seed, one split


@settings(max_examples=40, deadline=None)
@given(labelled(), st.integers(1, 12))
def test_shards_give_exactly_k_classes_or_fail_clearly(case, k):
    labels, n_clients, seed, _ = case
    n_classes = int(labels.max()) + 1
    counts = np.bincount(labels)
    try:
        parts = shards(labels, n_clients, seed=seed, classes_per_client=k)
    except PartitionError as e:
        msg = str(e)
        assert (k > n_classes and "between 1 and" in msg) or (n_clients * k < n_classes and "class slots" in msg) or \
            ("fewer" in msg or "only" in msg)
        if k <= n_classes and n_clients * k >= n_classes:  # then some class had fewer samples than holders
            assert counts.min() < int(np.ceil(n_clients * k / n_classes))
        return
    check_exact_cover(parts, len(labels))
    assert all(len(np.unique(labels[p])) == k for p in parts)
    holders = np.bincount(np.concatenate([np.unique(labels[p]) for p in parts]), minlength=n_classes)
    assert holders.min() >= 1 and holders.max() - holders.min() <= 2  # classes dealt evenly


@settings(max_examples=25, deadline=None)
@given(labelled())
def test_iid_invariants(case):
    labels, n_clients, seed, _ = case
    parts = partition(labels, n_clients, "iid", seed=seed)
    check_exact_cover(parts, len(labels))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_balanced_on_the_fedloge_long_tail():
    """CReFF/FedETF-style split of CIFAR-10-LT (IF 100) over 40 clients: equal sizes, skewed label mixes."""
    labels = np.repeat(np.arange(10), longtail_counts(10, 5000, 100))
    parts = dirichlet_balanced(labels, 40, 0.5, seed=1)
    assert sorted({len(p) for p in parts}) == [310, 311]
    mixes = np.stack([np.bincount(labels[p], minlength=10) for p in parts]) / 310.0
    assert mixes.max(1).mean() > 0.5  # most of a client's data is one class at alpha 0.5


def test_dirichlet_balanced_shuffle_matches_the_reference_list_shuffle():
    """The reference shuffles a Python list of (index, label) tuples; we shuffle an index array: same order."""
    pairs = [(i, i % 7) for i in range(500)]
    np.random.RandomState(11).shuffle(pairs)
    order = np.arange(500)
    np.random.RandomState(11).shuffle(order)
    assert [i for i, _ in pairs] == order.tolist()


def test_dirichlet_per_client_follows_client_priors():
    labels = np.repeat(np.arange(10), 400)
    parts = partition(labels, 20, "dirichlet_per_client", seed=0, alpha=0.05)
    top_share = [np.bincount(labels[p]).max() / len(p) for p in parts]
    assert np.mean(top_share) > 0.5  # small alpha: most of a client's data is one class
    wide = partition(labels, 20, "dirichlet_per_client", seed=0, alpha=100.0)
    assert min(len(np.unique(labels[p])) for p in wide) == 10


@pytest.mark.parametrize("name", ["dirichlet", "dirichlet_balanced", "dirichlet_per_client"])
@pytest.mark.parametrize("alpha", [0, -1, float("nan")])
def test_non_positive_alpha_is_refused(name, alpha):
    with pytest.raises(PartitionError, match="partition.alpha"):
        partition(np.repeat(np.arange(3), 10), 4, name, seed=0, alpha=alpha)


def test_unsatisfiable_constraints_fail_clearly():
    labels = np.repeat(np.arange(10), [50] * 9 + [2])
    with pytest.raises(PartitionError, match="class slots"):
        partition(labels, 4, "shards", seed=0, classes_per_client=2)  # 8 slots < 10 classes
    with pytest.raises(PartitionError, match="has only 2 training samples"):
        partition(labels, 30, "shards", seed=0, classes_per_client=2)  # class 9 held by 6 clients
    with pytest.raises(PartitionError, match="between 1 and 10"):
        partition(labels, 4, "shards", seed=0, classes_per_client=11)
    with pytest.raises(PartitionError, match="at most 452 clients"):
        partition(labels, 1000, "iid", seed=0)
    with pytest.raises(PartitionError, match="no option classes_per_client"):
        partition(labels, 4, "iid", seed=0, classes_per_client=2)
    with pytest.raises(PartitionError, match="max_redraws=3"):
        partition(np.repeat(np.arange(2), [1000, 1]), 10, "dirichlet_balanced", seed=0, alpha=0.001, max_redraws=3)


def test_dirichlet_balanced_reproduces_the_reference_split():
    """Golden values from the FedDF/CReFF reference ``clients_indices`` (n_auxi_workers=10, labels in class
    order, same seed), run on the same long-tailed label vectors: our port gives the identical split."""
    labels = np.repeat(np.arange(10), longtail_counts(10, 5000, 100))
    parts = dirichlet_balanced(labels, 40, 0.5, seed=1)
    assert [np.bincount(labels[p], minlength=10).tolist() for p in parts[:3]] == [
        [148, 3, 6, 82, 22, 25, 1, 18, 6, 0], [192, 42, 77, 0, 0, 0, 0, 0, 0, 0], [67, 83, 24, 13, 26, 61, 37, 0, 0, 0]]
    labels = np.repeat(np.arange(100), longtail_counts(100, 500, 100))
    parts = dirichlet_balanced(labels, 40, 0.5, seed=3407)
    assert [len(np.unique(labels[p])) for p in parts[:10]] == [23, 48, 25, 42, 44, 66, 46, 43, 31, 78]
