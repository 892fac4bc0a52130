"""Noisy long tails (dataset.label_noise): the realised noise matches the request, only training labels change,
the clean labels are kept, and a run without noise is exactly what it was."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlt.config import ConfigError
from fedlt.data.federated import client_data, prepare, split_key, summary
from fedlt.data.noise import flip_labels, head_tail, noise_report, transition_matrix
from fedlt.data_cli import compose_config
from fedlt.validate import validate

SYNTH = ["dataset=synthetic_lt", "dataset.num_classes=12", "dataset.train_per_class=40", "dataset.test_per_class=10",
         "dataset.image_size=8", "dataset.imbalance_factor=10", "num_clients=6", "seed=5"]


def config(tmp_path, *overrides) -> dict:
    return validate(compose_config([*SYNTH, f"cache_dir={tmp_path / 'cache'}", *overrides]))


def within_sampling_error(realised: np.ndarray, expected: np.ndarray, n_rows: np.ndarray, sigmas: float = 5.0):
    """|realised - expected| <= sigmas binomial standard errors (+ a hair), entry by entry."""
    se = np.sqrt(expected * (1 - expected) / n_rows[:, None])
    return np.abs(realised - expected) <= sigmas * se + 1e-9


@pytest.mark.parametrize("kind", ["symmetric", "pairflip", "tail_to_head"])
def test_realised_rate_and_transition_matrix_match_the_request(kind):
    counts = (2000 * 0.5 ** np.arange(6)).astype(int)  # a long tail: 2000 ... 62
    clean = np.repeat(np.arange(6), counts)
    parts = np.array_split(np.random.default_rng(0).permutation(clean), 5)  # five "clients"
    noisy = flip_labels(parts, 6, kind, 0.4, seed=11, counts=counts)
    rep = noise_report(parts, noisy, 6, kind, 0.4, counts)
    expected = transition_matrix(kind, 0.4, 6, counts)
    realised = np.asarray(rep["transition_matrix_realised"])
    assert np.allclose(expected.sum(1), 1) and np.allclose(realised.sum(1), 1)
    assert within_sampling_error(realised, expected, counts).all(), (realised.round(3), expected.round(3))
    flips = 1 - np.diag(expected)
    want = float((flips * counts).sum() / counts.sum())  # the expected overall rate
    se = np.sqrt(want * (1 - want) / counts.sum())
    assert abs(rep["realised_rate"] - want) <= 5 * se + 1e-9
    if kind != "tail_to_head":
        assert want == pytest.approx(0.4)
    else:  # only tail labels move, and only to head classes
        head, tail = head_tail(counts)
        assert rep["tail_classes"] == tail and rep["head_classes"] == head and len(tail) and len(head)
        moved = np.concatenate([np.asarray(y)[np.asarray(y) != z] for y, z in zip(parts, noisy)])
        to = np.concatenate([z[np.asarray(y) != z] for y, z in zip(parts, noisy)])
        assert set(moved.tolist()) <= set(tail) and set(to.tolist()) <= set(head)
    # per-client rates are each client's own fraction of changed labels
    for y, z, r in zip(parts, noisy, rep["client_noise_rates"]):
        assert r == pytest.approx(np.mean(y != z), abs=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(noisy, flip_labels(parts, 6, kind, 0.4, 11, counts)))  # seeded
    assert not all(np.array_equal(a, b) for a, b in zip(noisy, flip_labels(parts, 6, kind, 0.4, 12, counts)))


def test_symmetric_noise_never_keeps_a_flipped_label_and_pairflip_goes_to_the_next_class():
    y = [np.repeat(np.arange(4), 500)]
    z = flip_labels(y, 4, "pairflip", 0.3, seed=1)[0]
    changed = y[0] != z
    assert np.array_equal(z[changed], (y[0][changed] + 1) % 4)
    assert transition_matrix("symmetric", 0.3, 4)[0].tolist() == pytest.approx([0.7, 0.1, 0.1, 0.1])


def test_noise_changes_only_the_training_labels_and_keeps_the_clean_ones(tmp_path):
    clean_cfg = config(tmp_path)
    plan, split, source = prepare(clean_cfg)
    cfg = config(tmp_path, "dataset.label_noise.rate=0.4", "dataset.label_noise.kind=symmetric")
    nplan, nsplit, _ = prepare(cfg)
    assert nplan.split_path != plan.split_path  # its own cached split
    # same images, same clients, same local tests: only the labels the clients train on differ
    for a, b in zip(split.client_train, nsplit.client_train):
        assert np.array_equal(a, b)
    for a, b in zip(split.client_test, nsplit.client_test):
        assert np.array_equal(a, b)
    changed = 0
    for k in range(6):
        c, n = client_data(plan, k), client_data(nplan, k)
        assert n.test_y.tolist() == c.test_y.tolist()  # evaluation on clean labels
        clean = np.asarray(source.train_y)[split.client_train[k]].tolist()
        assert n.train_y_clean.tolist() == c.train_y.tolist() == clean
        assert n.train_counts.tolist() == np.bincount(n.train_y.numpy(), minlength=12).tolist()
        changed += int((n.train_y != n.train_y_clean).sum())
        assert c.train_y_clean is None
    assert changed > 0
    s = summary(nsplit, source, cfg)
    json.dumps(s)
    rep = s["label_noise"]
    assert rep["kind"] == "symmetric" and rep["rate"] == 0.4 and len(rep["client_noise_rates"]) == 6
    assert rep["realised_rate"] == pytest.approx(changed / sum(s["client_train_sizes"]))
    assert np.array_equal(np.asarray(rep["transition_counts"]).sum(1), np.sum(s["client_clean_class_counts"], 0))
    assert s["client_clean_class_counts"] == split.class_counts.tolist()
    # the partition's own description (classes held, imbalance factors) is the clean one: noise moves labels, not
    # images, so a client holding 2 classes must not look like one holding 10
    clean_summary = summary(split, source, clean_cfg)
    for key in ("client_num_classes", "client_imbalance_factors", "regime"):
        assert s[key] == clean_summary[key], key
    assert "label_noise" not in clean_summary


def test_without_noise_the_split_and_its_cache_key_are_what_they_were(tmp_path):
    cfg = config(tmp_path)
    plan, split, source = prepare(cfg)
    assert split.noisy_labels is None
    old = {**cfg, "dataset": {k: v for k, v in cfg["dataset"].items() if k != "label_noise"}}  # before the option
    assert split_key(source, cfg) == split_key(source, old)
    with np.load(plan.split_path) as z:
        assert not any(f.startswith("noisy_") for f in z.files)


@pytest.mark.parametrize("override,named", [
    ("dataset.label_noise.rate=1.0", "dataset.label_noise.rate=1.0"),
    ("dataset.label_noise.rate=-0.1", "dataset.label_noise.rate=-0.1"),
    ("dataset.label_noise.kind=asymmetric", "dataset.label_noise.kind='asymmetric'"),
])
def test_bad_noise_options_are_refused(tmp_path, override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config(tmp_path, override)


def test_a_noisy_run_trains_on_the_noisy_labels_and_rate_zero_is_the_run_without_the_option(tmp_path):
    """The real round loop in this process: noise off is bit-identical to a config without dataset.label_noise;
    noise on (with a robust loss) changes training, and the run still evaluates on the clean test labels."""
    from tests.core.probe import compose, run_inprocess
    from tests.strategies._inprocess import without_time

    tiny = ("experiment=smoke", *SYNTH, "dataset.image_size=8", "model.width=8", "model.feature_dim=16",
            "num_rounds=2", "eval.every=1", "eval.test_agnostic.enabled=false", f"cache_dir={tmp_path / 'cache'}")
    base = compose(*tiny)
    assert base["dataset"]["label_noise"] == {"rate": 0.0, "kind": "symmetric"}
    before = {**base, "dataset": {k: v for k, v in base["dataset"].items() if k != "label_noise"}}
    off, _ = run_inprocess(base, tmp_path / "off")
    old, _ = run_inprocess(before, tmp_path / "old")
    assert without_time(off.rows) == without_time(old.rows)
    noisy, _ = run_inprocess(compose(*tiny, "loss=sce", "dataset.label_noise.rate=0.6",
                                     "dataset.label_noise.kind=pairflip"), tmp_path / "noisy")
    assert without_time(noisy.rows) != without_time(off.rows)
    assert noisy.rows[-1]["generic/accuracy"] >= 0  # evaluated (on the clean balanced test split)


def test_the_report_shows_the_noise_and_the_per_client_rates():
    from types import SimpleNamespace

    from fedlt.eval.report import run_info

    part = {"partition": {"name": "dirichlet", "alpha": 0.5},
            "label_noise": {"kind": "symmetric", "rate": 0.4, "realised_rate": 0.3987,
                            "client_noise_rates": [0.31, 0.45, 0.4]}}
    run = SimpleNamespace(config={}, partition=part, final={}, finished=True, label="r", rounds_done=1, results={})
    assert run_info(run)["partition"] == "dirichlet α=0.5, noise symmetric 0.4 (realised 0.399, clients 0.31-0.45)"
    run.partition = {"partition": {"name": "dirichlet", "alpha": 0.5}}
    assert run_info(run)["partition"] == "dirichlet α=0.5"


def test_config_yaml_holds_the_typed_defaults():
    from pathlib import Path

    import yaml

    from fedlt.config import param_defaults
    from fedlt.data.noise import LabelNoiseParams

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "config.yaml").read_text())
    assert cfg["dataset"]["label_noise"] == param_defaults(LabelNoiseParams) == {"rate": 0.0, "kind": "symmetric"}
