"""fedlt's partitioners as flwr-datasets ``Partitioner``s, for Flower users outside fedlt::

    from flwr_datasets import FederatedDataset
    from fedlt.data.flower import FedLTPartitioner

    part = FedLTPartitioner("dirichlet", num_partitions=40, seed=3407, alpha=0.5)
    fds = FederatedDataset(dataset="uoft-cs/cifar10", partitioners={"train": part})
    client0 = fds.load_partition(0)

Kept out of :mod:`fedlt.data.partition` because importing flwr-datasets imports Hugging Face ``datasets``
(seconds), which fedlt's own runs never need.
"""

from __future__ import annotations

import numpy as np
from flwr_datasets.partitioner import Partitioner

from fedlt.data.partition import PARTITIONERS, partition


class FedLTPartitioner(Partitioner):
    """Partition an HF ``datasets.Dataset`` with fedlt partitioner ``name`` (``dirichlet``,
    ``dirichlet_balanced``, ``dirichlet_per_client``, ``shards``, ``iid``).

    Labels are read from column ``partition_by`` and mapped to ``0..C-1`` in sorted order (integer labels
    ``0..C-1`` stay as they are, so ``dirichlet`` with the same labels and seed gives fedlt's -- and the official
    FedLoGe -- split). The whole split is computed once, on the first ``load_partition``; ``params`` are the
    partitioner's options (``alpha``, ``classes_per_client``, ...), ``min_samples_per_client`` / ``max_attempts``
    the bounded re-draw guard.
    """

    def __init__(self, name: str, num_partitions: int, seed: int = 0, partition_by: str = "label",
                 min_samples_per_client: int = 0, max_attempts: int = 100, **params) -> None:
        super().__init__()
        if name not in PARTITIONERS:
            raise ValueError(f"unknown fedlt partitioner {name!r}; allowed: {', '.join(sorted(PARTITIONERS))}")
        if num_partitions < 1:
            raise ValueError("num_partitions must be >= 1")
        self._name = name
        self._num_partitions = int(num_partitions)
        self._seed = int(seed)
        self._partition_by = partition_by
        self._guard = {"min_samples_per_client": int(min_samples_per_client), "max_attempts": int(max_attempts)}
        self._params = params
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def partition_indices(self) -> list[np.ndarray]:
        """Row indices of every partition (computed once)."""
        if self._indices is None:
            column = np.asarray(self.dataset[self._partition_by])
            _, labels = np.unique(column, return_inverse=True)
            self._indices = partition(labels.astype(np.int64), self._num_partitions, self._name, seed=self._seed,
                                      **self._guard, **self._params)
        return self._indices

    def load_partition(self, partition_id: int) -> "Dataset":  # noqa: F821
        if not 0 <= partition_id < self._num_partitions:
            raise KeyError(f"partition_id {partition_id} is out of range 0..{self._num_partitions - 1}")
        return self.dataset.select(self.partition_indices()[partition_id].tolist())
