import numpy as np

from fedlt.data.local_test import proportional_local_tests


def test_proportional_rule_counts_and_no_repeats_within_a_client():
    test_labels = np.repeat(np.arange(3), 100)
    counts = np.array([[60, 30, 0], [10, 0, 5]])  # N_train = 105, N_test = 300
    tests = proportional_local_tests(counts, test_labels, seed=1)
    for k, idx in enumerate(tests):
        assert len(np.unique(idx)) == len(idx)
        got = np.bincount(test_labels[idx], minlength=3)
        expect = np.minimum(np.floor(counts[k] * 300 / 105).astype(int), 100)
        assert got.tolist() == expect.tolist()


def test_overflow_takes_all_images_of_the_class():
    test_labels = np.repeat(np.arange(2), 10)
    tests = proportional_local_tests(np.array([[100, 1]]), test_labels, seed=0)
    assert np.bincount(test_labels[tests[0]], minlength=2).tolist() == [10, 0]
