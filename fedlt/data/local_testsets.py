"""Per-client local test sets (the personalized-evaluation data)."""

from __future__ import annotations

import numpy as np


def proportional_local_tests(
    client_train_counts: np.ndarray, test_labels: np.ndarray, seed: int
) -> list[np.ndarray]:
    """FedLoGe's rule (fedloge-protocol.md §5.4): client k gets t_kc = floor(n_kc * N_test / N_train) test
    images of class c, drawn without replacement from the balanced test split, independently per client (so
    local test sets may overlap each other, but never share an image with any training set). If t_kc exceeds
    the class's test images, all of them are used (the official code's overflow draws collapse the same way).

    ``client_train_counts`` is the (clients x classes) matrix of training counts.
    """
    counts = np.asarray(client_train_counts)
    test_labels = np.asarray(test_labels)
    n_train = counts.sum()
    n_test = len(test_labels)
    by_class = [np.where(test_labels == c)[0] for c in range(counts.shape[1])]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E57]))
    out = []
    for k in range(counts.shape[0]):
        picked = []
        for c in range(counts.shape[1]):
            t = int(np.floor(counts[k, c] * n_test / n_train)) if n_train else 0
            t = min(t, len(by_class[c]))
            if t > 0:
                picked.append(rng.choice(by_class[c], size=t, replace=False))
        out.append(np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64))
    return out


def holdout_local_tests(client_train: list[np.ndarray], fraction: float, seed: int
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """PFLlib's rule (also FL-bench, FedLTLib, FedETF): each client holds out a random ``fraction`` of its own
    training share as its local test set, and trains on the rest. Split sizes follow scikit-learn's
    ``train_test_split(train_size=1 - fraction)`` (``floor((1 - fraction) * n)`` images kept for training), except
    that a client always keeps at least one training image (a client with one image has no local test set).
    Not stratified, as in PFLlib. Returns ``(train, test)`` per client; the two never share an image and the test
    sets of different clients are disjoint.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    train, test = [], []
    for k, idx in enumerate(client_train):
        idx = np.asarray(idx)
        n = len(idx)
        n_train = max(int(np.floor((1.0 - fraction) * n + 1e-9)), min(n, 1))
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x401D, k]))
        perm = rng.permutation(n)
        train.append(np.sort(idx[perm[:n_train]]))
        test.append(np.sort(idx[perm[n_train:]]))
    return train, test


LOCAL_TESTS = ("proportional", "holdout")  # eval.local_test


def local_test_overlap(client_test: list[np.ndarray]) -> dict:
    """How much the local test sets share images (the official proportional rule draws them independently per
    client from one test split, so they overlap; holdout sets never do)."""
    sizes = [len(t) for t in client_test]
    allidx = np.concatenate([np.asarray(t, dtype=np.int64) for t in client_test]) if client_test else np.zeros(0, int)
    _, mult = np.unique(allidx, return_counts=True)
    return {
        "total_size": int(sum(sizes)),
        "distinct_images": int(len(mult)),
        "images_in_several_clients": int((mult > 1).sum()),
        "max_clients_per_image": int(mult.max()) if len(mult) else 0,
    }
