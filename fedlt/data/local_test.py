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
