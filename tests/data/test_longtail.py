import numpy as np
import pytest

from fedlt.data.longtail import longtail_counts, select_longtail


@pytest.mark.parametrize("k,n_max,IF,total", [(10, 5000, 100, 12406), (10, 5000, 50, 13996), (100, 500, 100, 10847),
                                              (100, 500, 50, 12608)])
def test_exp_profile_matches_official_training_set_sizes(k, n_max, IF, total):
    counts = longtail_counts(k, n_max, IF, "exp")
    assert counts.sum() == total
    assert counts[0] == n_max and counts[-1] == n_max // IF
    assert np.all(np.diff(counts) <= 0)


def test_if_one_is_balanced_and_step_profile():
    assert set(longtail_counts(10, 100, 1, "exp").tolist()) == {100}
    assert longtail_counts(4, 100, 10, "step").tolist() == [100, 100, 10, 10]


def test_imbalance_factor_below_one_rejected():
    with pytest.raises(ValueError, match="imbalance_factor"):
        longtail_counts(10, 100, 0.5)


def test_select_longtail_keeps_requested_counts_without_repeats():
    labels = np.repeat(np.arange(5), 100)
    counts = longtail_counts(5, 100, 10)
    idx = select_longtail(labels, counts, seed=0)
    assert len(np.unique(idx)) == len(idx)
    assert np.bincount(labels[idx], minlength=5).tolist() == counts.tolist()
    assert np.array_equal(idx, select_longtail(labels, counts, seed=0))
