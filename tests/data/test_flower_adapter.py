"""fedlt's partitioners as flwr-datasets Partitioners over an in-memory HF Dataset (no network)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
datasets = pytest.importorskip("datasets")

from fedlt.data.flower import FedLTPartitioner  # noqa: E402
from fedlt.data.longtail import longtail_counts  # noqa: E402
from fedlt.data.partition import partition  # noqa: E402


@pytest.mark.parametrize("name,params", [("dirichlet", {"alpha": 0.5}), ("dirichlet_balanced", {"alpha": 0.5}),
                                         ("dirichlet_per_client", {"alpha": 0.5}),
                                         ("shards", {"classes_per_client": 3}), ("iid", {})])
def test_partitioner_adapter_gives_fedlt_splits(name, params):
    labels = np.repeat(np.arange(10), longtail_counts(10, 60, 10))
    ds = datasets.Dataset.from_dict({"label": labels.tolist(), "x": np.arange(len(labels)).tolist()})
    part = FedLTPartitioner(name, num_partitions=7, seed=3, **params)
    part.dataset = ds
    assert part.num_partitions == 7
    loaded = [part.load_partition(i) for i in range(7)]
    expected = partition(labels, 7, name, seed=3, **params)
    for got, idx in zip(loaded, expected, strict=True):
        assert got["x"] == idx.tolist()
    assert sorted(x for p in loaded for x in p["x"]) == list(range(len(labels)))
    with pytest.raises(KeyError):
        part.load_partition(7)


def test_string_labels_and_official_split_through_flower():
    """String labels map to sorted class ids; the official FedLoGe sizes come out through the Flower API."""
    counts = longtail_counts(10, 5000, 100)
    names = [f"c{c}" for c in range(10)]  # sorted order == label order
    ds = datasets.Dataset.from_dict({"fine": [names[c] for c in np.repeat(np.arange(10), counts)]})
    part = FedLTPartitioner("dirichlet", num_partitions=40, seed=3407, partition_by="fine", alpha=0.5)
    part.dataset = ds
    assert [part.load_partition(i).num_rows for i in range(5)] == [215, 141, 207, 171, 243]
