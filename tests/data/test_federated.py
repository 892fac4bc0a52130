"""The prepared federated data set, composed from the real config tree (synthetic data: fast, no files)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fedlt.data.federated as federated
from fedlt.config import ConfigError
from fedlt.validate import validate
from fedlt.data_cli import compose_config
from fedlt.data.federated import client_data, prepare, summary
from fedlt.data.sources import DataError
from fedlt.eval.groups import SHOT_RULES

SYNTH = ["dataset=synthetic_lt", "dataset.num_classes=12", "dataset.train_per_class=40", "dataset.test_per_class=10",
         "dataset.image_size=8", "dataset.imbalance_factor=10", "num_clients=6", "seed=5"]


def config(tmp_path, *overrides) -> dict:
    return validate(compose_config([*SYNTH, f"cache_dir={tmp_path / 'cache'}", *overrides]))


def test_proportional_split_summary(tmp_path):
    cfg = config(tmp_path)
    plan, split, source = prepare(cfg)
    s = summary(split, source, cfg)
    assert s["global_class_counts"][0] == 40 and s["global_class_counts"][-1] == 4
    assert sum(s["client_train_sizes"]) == s["train_size"] == sum(s["global_class_counts"])
    assert np.array_equal(np.sum(s["client_class_counts"], axis=0), s["global_class_counts"])
    assert s["local_test"]["rule"] == "proportional" and s["test_size"] == 120
    assert set(s["shot_groups"]) == set(SHOT_RULES)
    for rule, groups in s["shot_groups"].items():
        assert sorted(c for g in groups.values() for c in g) == list(range(12)), rule
    assert s["imbalance_convention"].startswith("imbalance_factor = n_max / n_min")
    assert s["local_test_overlap"]["total_size"] == sum(s["client_test_sizes"])
    json.dumps(s)  # partition.json is plain JSON
    # the proportional rule draws from the test split: train and test never share an image
    assert split.local_test_split == "test" and plan.local_test_split == "test"


def test_holdout_split_trains_and_tests_on_disjoint_images(tmp_path):
    cfg = config(tmp_path, "eval.local_test=holdout", "eval.holdout_fraction=0.3")
    plan, split, source = prepare(cfg)
    assert plan.local_test_split == "train"
    all_test = np.concatenate(split.client_test)
    assert np.intersect1d(np.concatenate(split.client_train), all_test).size == 0
    assert np.array_equal(np.sort(np.concatenate([*split.client_train, all_test])), np.sort(split.lt_indices))
    s = summary(split, source, cfg)
    assert s["local_test_overlap"]["images_in_several_clients"] == 0
    assert s["local_test"]["holdout_fraction"] == 0.3
    assert sum(s["client_train_sizes"]) + sum(s["client_test_sizes"]) == s["train_size"]
    data = client_data(plan, 2)  # the held-out images come from the training split
    te = split.client_test[2]
    assert data.test_y.tolist() == np.asarray(source.train_y)[te].tolist()
    assert data.train_counts.tolist() == split.class_counts[2].tolist()


def test_split_is_cached_and_reused(tmp_path, monkeypatch):
    cfg = config(tmp_path, "partition=shards", "partition.classes_per_client=3")
    _, first, _ = prepare(cfg)

    def boom(*a, **k):
        raise AssertionError("split drawn again")

    monkeypatch.setattr(federated, "build_split", boom)
    _, second, _ = prepare(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(first.client_train, second.client_train, strict=True))
    with pytest.raises(AssertionError):  # anything that changes the split changes the key
        prepare(config(tmp_path, "partition=shards", "partition.classes_per_client=4"))


def test_every_partition_config_prepares(tmp_path):
    for name in ("dirichlet", "dirichlet_balanced", "dirichlet_per_client", "shards", "iid"):
        cfg = config(tmp_path, f"partition={name}")
        _, split, _ = prepare(cfg)
        assert sum(len(t) for t in split.client_train) == int(split.global_counts.sum()), name


def test_profile_asking_for_more_images_than_exist(tmp_path):
    with pytest.raises(DataError, match=r"asks for 50 training images of class 0 .* has only 40"):
        prepare(config(tmp_path, "dataset.n_max=50"))
    cfg = config(tmp_path, "dataset.profile=natural")
    _, split, _ = prepare(cfg)
    assert split.global_counts.tolist() == [40] * 12


def test_too_many_clients(tmp_path):
    from fedlt.experiment import prepare_run  # the check runs once, before the split is drawn

    with pytest.raises(ConfigError, match="num_clients=500"):
        prepare_run(config(tmp_path, "num_clients=500"), None)


def test_prepare_run_writes_summary_and_figure(tmp_path):
    from fedlt.experiment import prepare_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prepare_run(config(tmp_path), run_dir)
    assert json.loads((run_dir / "partition.json").read_text())["num_clients"] == 6
    assert (run_dir / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_damaged_split_file_is_drawn_again_and_equals_a_fresh_one(tmp_path, caplog):
    import logging
    from pathlib import Path

    from fedlt.data.federated import FederatedSplit

    cfg = config(tmp_path)
    plan, _, _ = prepare(cfg)
    path = Path(plan.split_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    federated.open_plan.cache_clear()
    with pytest.raises(DataError, match=f"the split file {path} is damaged .*delete {path}"):
        client_data(plan, 0)  # a client never guesses: it names the file
    with caplog.at_level(logging.WARNING, logger="fedlt"):
        _, again, _ = prepare(cfg)
    assert f"the split file {path} is damaged" in caplog.text and "drawing the split again" in caplog.text
    _, fresh, _ = prepare(config(tmp_path / "fresh"))
    for a, b in ((again, fresh), (FederatedSplit.load(path), fresh)):
        assert all(np.array_equal(x, y) for x, y in zip(a.client_train + a.client_test,
                                                         b.client_train + b.client_test, strict=True))
        assert np.array_equal(a.class_counts, b.class_counts) and np.array_equal(a.lt_indices, b.lt_indices)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_run_writes_its_split_files_with_the_usual_modes(tmp_path):
    """partition.png was 0600 (a private temporary file renamed into place); every file is 0666 minus the umask."""
    from fedlt.experiment import prepare_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prepare_run(config(tmp_path), run_dir)
    for name in ("partition.json", "partition.png"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name
    assert sorted(p.name for p in run_dir.iterdir()) == ["partition.json", "partition.png"]
