"""Test-agnostic evaluation (SADE: Zhang et al., "Self-Supervised Aggregation of Diverse Experts for
Test-Agnostic Long-Tailed Recognition", NeurIPS 2022): the generic model is also scored on test sets whose class
distribution is forward long-tailed (the training order: head classes most frequent), uniform, or backward
long-tailed (the order reversed), at several imbalance factors.

The sets are index subsets of the balanced test split, drawn once per run (seeded), so they cost no extra
forward pass: the logits already computed on the balanced set are sliced.
"""

from __future__ import annotations

import numpy as np

from fedlt.data.longtail import longtail_counts
from fedlt.seeding import numpy_rng

# stream purpose for the resampling (distinct from fedlt.seeding's small purpose ids)
TEST_AGNOSTIC_STREAM = 0x5ADE
DIRECTIONS = {"forward": 1, "backward": 2}


def set_name(direction: str, imbalance_factor: float) -> str:
    return f"{direction}_{float(imbalance_factor):g}"


def resampled_test_sets(labels, imbalance_factors, seed: int, train_counts=None) -> dict[str, np.ndarray]:
    """Name -> sorted indices into the balanced test set, in SADE's table order: forward (largest IF first),
    ``uniform`` (the whole balanced set), backward (smallest IF first).

    With n the smallest per-class test count, a forward set at IF keeps ``longtail_counts(K, n, IF)`` images of
    the classes ranked by their global training count (most frequent first; ties by class id), a backward set
    the same counts in the reverse ranking. Images are drawn without replacement, from a stream derived from
    (seed, direction, IF) only, so adding another IF leaves the other sets unchanged."""
    labels = np.asarray(labels, dtype=np.int64)
    k = int(labels.max()) + 1 if labels.size else 0
    if train_counts is not None:
        k = max(k, len(train_counts))
    by_class = [np.flatnonzero(labels == c) for c in range(k)]
    sizes = np.array([len(i) for i in by_class])
    present = np.flatnonzero(sizes > 0)
    if present.size == 0:
        return {}
    n = int(sizes[present].min())
    rank_key = np.zeros(k) if train_counts is None else -np.asarray(train_counts, dtype=np.float64)
    order = present[np.argsort(rank_key[present], kind="stable")]  # head first
    ifs = sorted({float(f) for f in imbalance_factors})
    out: dict[str, np.ndarray] = {}

    def draw(direction: str, imbalance_factor: float) -> np.ndarray:
        counts = longtail_counts(len(order), n, imbalance_factor)
        ranked = order if direction == "forward" else order[::-1]
        rng = numpy_rng(seed, TEST_AGNOSTIC_STREAM, DIRECTIONS[direction], int(round(imbalance_factor * 1000)))
        parts = [rng.choice(by_class[c], size=max(int(m), 1), replace=False) for c, m in zip(ranked, counts)]
        return np.sort(np.concatenate(parts))

    for f in reversed(ifs):
        out[set_name("forward", f)] = draw("forward", f)
    out["uniform"] = np.arange(len(labels))
    for f in ifs:
        out[set_name("backward", f)] = draw("backward", f)
    return out
