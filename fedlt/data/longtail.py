"""Global long-tail profiles.

Convention: ``imbalance_factor`` (IF) = n_max / n_min >= 1, as in FedLTLib. The official FedLoGe / LDAM
code writes the reciprocal (``imb_factor = 0.01`` for IF = 100); runs record which convention they used in
``partition.json`` so numbers from both worlds can be matched.
"""

from __future__ import annotations

import numpy as np

PROFILES = ("exp", "step", "natural")  # natural: keep every training image (the data set's own distribution)
IF_CONVENTION = "imbalance_factor = n_max / n_min (official FedLoGe code passes 1 / imbalance_factor)"


def longtail_counts(num_classes: int, n_max: int, imbalance_factor: float, profile: str = "exp") -> np.ndarray:
    """Per-class training counts, class 0 the head.

    ``exp`` is Cao et al. (2019): n_c = int(n_max * (1/IF) ** (c / (C - 1))) -- the same float expression
    as the official code, so counts match it exactly. ``step`` keeps the first half of the classes at n_max
    and the rest at int(n_max / IF).
    """
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor must be >= 1, got {imbalance_factor}")
    ratio = 1.0 / float(imbalance_factor)
    if profile == "exp":
        if num_classes == 1:
            return np.array([n_max], dtype=np.int64)
        return np.array(
            [int(n_max * (ratio ** (c / (num_classes - 1.0)))) for c in range(num_classes)], dtype=np.int64
        )
    if profile == "step":
        half = num_classes // 2
        return np.array([n_max] * half + [int(n_max * ratio)] * (num_classes - half), dtype=np.int64)
    raise ValueError(f"unknown long-tail profile {profile!r}; allowed: {', '.join(PROFILES)}")


def select_longtail(labels: np.ndarray, counts: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices of the long-tailed subset: for each class in label order, shuffle its indices and keep the
    first n_c. Uses the legacy global ``np.random`` stream seeded once, as the LDAM/FedLoGe code does
    (``np.random.seed(0)`` then one ``shuffle`` per class), so the kept images are the official ones."""
    labels = np.asarray(labels)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        keep = []
        for c, n_c in enumerate(counts):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            if n_c > len(idx):
                raise ValueError(f"class {c} has {len(idx)} images but the profile asks for {n_c}")
            keep.append(idx[: int(n_c)])
    finally:
        np.random.set_state(state)
    return np.concatenate(keep).astype(np.int64) if keep else np.zeros(0, dtype=np.int64)
