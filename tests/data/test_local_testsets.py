import numpy as np

from fedlt.data.local_testsets import proportional_local_tests


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


def test_holdout_removes_test_images_from_training_and_follows_train_test_split_sizes():
    from fedlt.data.local_testsets import holdout_local_tests, local_test_overlap

    rng = np.random.default_rng(0)
    perm = rng.permutation(1000)
    client_train = [np.sort(perm[:1]), np.sort(perm[1:5]), np.sort(perm[5:405]), np.sort(perm[405:])]
    train, test = holdout_local_tests(client_train, 0.25, seed=3)
    for before, tr, te in zip(client_train, train, test, strict=True):
        assert np.intersect1d(tr, te).size == 0  # never the same image in a client's train and test
        assert np.array_equal(np.sort(np.concatenate([tr, te])), before)  # nothing lost, nothing added
        assert len(tr) == max(int(np.floor(0.75 * len(before))), 1)  # sklearn's train_size rounding
    assert [len(t) for t in test] == [0, 1, 100, 149]
    assert local_test_overlap(test)["images_in_several_clients"] == 0
    again = holdout_local_tests(client_train, 0.25, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(test, again[1], strict=True))


def test_overlap_report_of_proportional_local_tests():
    from fedlt.data.local_testsets import local_test_overlap

    test_labels = np.repeat(np.arange(2), 10)
    tests = proportional_local_tests(np.array([[10, 10], [10, 10], [10, 0]]), test_labels, seed=0)
    o = local_test_overlap(tests)
    assert [len(t) for t in tests] == [8, 8, 4]  # floor(10 * 20 / 50) = 4 per present class
    assert o["total_size"] == 20
    assert o["distinct_images"] == len(np.unique(np.concatenate(tests)))
    assert o["images_in_several_clients"] == sum(np.bincount(np.concatenate(tests)) > 1)
