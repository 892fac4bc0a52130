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
