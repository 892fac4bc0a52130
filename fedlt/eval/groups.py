"""Head / mid / tail ("many / medium / few") class groups under the three named rules Fed-LT papers use
(landscape.md §4.4); every run logs all three so numbers from different papers can be matched."""

from __future__ import annotations

import numpy as np

SHOT_RULES = ("cumulative_75_95", "count_100_20", "fraction_50_30_20")
GROUPS = ("head", "mid", "tail")


def shot_groups(train_counts, rule: str) -> dict[str, list[int]]:
    """Class indices of each group, from per-class training counts.

    * ``cumulative_75_95`` (official FedLoGe ``shot_split``): sort classes by count (descending); head = the
      classes up to and including the one where the cumulative share reaches 75 %, mid = up to 95 %, tail = rest.
    * ``count_100_20`` (OLTR / ImageNet-LT): many > 100, medium 20-100, few < 20 training images.
    * ``fraction_50_30_20`` (FedLTLib): the first 50 % of classes by count are head, the next 30 % mid, the rest tail
      (class numbers rounded half up, so a single-class client's class is head).
    """
    counts = np.asarray(train_counts, dtype=np.float64)
    k = len(counts)
    order = np.argsort(-counts, kind="stable")
    if rule == "cumulative_75_95":
        share = np.cumsum(counts[order]) / max(counts.sum(), 1.0)
        h = min(int(np.searchsorted(share, 0.75)) + 1, k)
        m = min(int(np.searchsorted(share, 0.95)) + 1, k)
        parts = (order[:h], order[h:m], order[m:])
    elif rule == "count_100_20":
        idx = np.arange(k)
        parts = (idx[counts > 100], idx[(counts <= 100) & (counts >= 20)], idx[counts < 20])
    elif rule == "fraction_50_30_20":
        h, m = int(np.floor(0.5 * k + 0.5)), int(np.floor(0.8 * k + 0.5))  # half up: 1 class -> head
        parts = (order[:h], order[h:m], order[m:])
    else:
        raise ValueError(f"unknown shot rule {rule!r}; allowed: {', '.join(SHOT_RULES)}")
    return {g: sorted(int(c) for c in p) for g, p in zip(GROUPS, parts, strict=True)}


def local_shot_groups(train_counts, rule: str) -> dict[str, list[int]]:
    """A client's own groups (PM shot accuracy, fedloge-protocol.md §5.5): the rule applied to the classes the
    client holds (training count > 0). Classes it does not hold have no local test samples either; leaving them
    out matters only for ``fraction_50_30_20``, whose fractions are of the client's classes, not of all K."""
    counts = np.asarray(train_counts, dtype=np.float64)
    held = np.flatnonzero(counts > 0)
    if held.size == 0:
        return {g: [] for g in GROUPS}
    sub = shot_groups(counts[held], rule)
    return {g: sorted(int(held[i]) for i in idx) for g, idx in sub.items()}
