"""Client partitioners: map the long-tailed training labels to per-client index arrays.

Every partitioner returns ``list[np.ndarray]`` (one sorted index array per client, indices into the label
array it was given). Every index is used exactly once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class PartitionError(ValueError):
    """A partitioner could not satisfy its constraints (reported to the user, no traceback)."""


def dirichlet_official(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Per-class Dirichlet over clients, each sample assigned independently (FedLoGe's
    ``non_iid_dirichlet_sampling``).

    Written by hand because flwr-datasets' ``DirichletPartitioner`` splits by cumulative proportions with a
    resampling loop, which gives different client sizes. This reproduces the official draw order on the legacy
    ``np.random`` stream: ``seed``, one ``binomial(1, 1, (N, C))`` call (the all-ones class-eligibility matrix of
    the official code, which still consumes RNG state), then per class in label order ``dirichlet([alpha]*N)``
    followed by ``choice(N, size=n_c, p=...)``. With seed 3407 it gives the official client sizes exactly.
    """
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    rng = np.random.RandomState(seed)  # same stream as np.random.seed(seed), without touching global state
    rng.binomial(1, 1.0, size=(num_clients, num_classes))
    owner = np.empty(len(labels), dtype=np.int64)
    clients = list(range(num_clients))
    for c in range(num_classes):
        idx = np.where(labels == c)[0]
        p = rng.dirichlet([alpha] * num_clients)
        owner[idx] = rng.choice(clients, size=len(idx), p=p.tolist())
    return [np.where(owner == k)[0] for k in range(num_clients)]


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniform random split into near-equal client sizes."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "dirichlet": dirichlet_official,
    "iid": iid,
}


def partition(
    labels: np.ndarray,
    num_clients: int,
    name: str,
    seed: int,
    min_samples_per_client: int = 0,
    max_attempts: int = 100,
    **params,
) -> list[np.ndarray]:
    """Run partitioner ``name``; if a client gets fewer than ``min_samples_per_client`` samples, re-draw with
    the next seed, at most ``max_attempts`` times, then fail with a clear message (never loop forever).
    The first draw always uses ``seed`` itself, so the official split is reproduced when the guard is off."""
    if name not in PARTITIONERS:
        raise PartitionError(f"unknown partitioner {name!r}; allowed: {', '.join(sorted(PARTITIONERS))}")
    fn = PARTITIONERS[name]
    smallest = 0
    for attempt in range(max(1, max_attempts)):
        parts = fn(labels, num_clients, seed=seed + attempt, **params)
        smallest = min(len(p) for p in parts)
        if smallest >= min_samples_per_client:
            return parts
    raise PartitionError(
        f"partition={name} could not give every one of the {num_clients} clients at least "
        f"min_samples_per_client={min_samples_per_client} samples in {max_attempts} attempts (the smallest client "
        f"had {smallest}); lower min_samples_per_client or num_clients, or raise partition.alpha"
    )
