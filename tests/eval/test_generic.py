"""Generic evaluation (server side) and the SADE test-agnostic re-sampling."""

import numpy as np
import pytest
import torch

from fedlt.config import ConfigError
from fedlt.validate import validate
from fedlt.data.longtail import longtail_counts
from fedlt.eval.generic import GenericEvaluation
from fedlt.eval.groups import local_shot_groups, shot_groups
from fedlt.eval.shifted_tests import resampled_test_sets

K = 5
LABELS = np.repeat(np.arange(K), 100)  # a balanced test set, 100 per class
TRAIN = [500, 200, 100, 20, 5]


def test_resampled_sets_follow_the_long_tail_and_its_reverse():
    sets = resampled_test_sets(LABELS, [10, 50], seed=3, train_counts=TRAIN)
    assert list(sets) == ["forward_50", "forward_10", "uniform", "backward_10", "backward_50"]
    for f in (10, 50):
        want = longtail_counts(K, 100, f)
        np.testing.assert_array_equal(np.bincount(LABELS[sets[f"forward_{f}"]], minlength=K), want)
        np.testing.assert_array_equal(np.bincount(LABELS[sets[f"backward_{f}"]], minlength=K), want[::-1])
    np.testing.assert_array_equal(sets["uniform"], np.arange(len(LABELS)))
    for idx in sets.values():
        assert len(np.unique(idx)) == len(idx)  # without replacement


def test_forward_follows_the_training_order_not_the_class_ids():
    sets = resampled_test_sets(LABELS, [10], seed=0, train_counts=[5, 20, 100, 200, 500])
    fwd = np.bincount(LABELS[sets["forward_10"]], minlength=K)
    assert fwd.argmax() == 4 and fwd.argmin() == 0


def test_resampling_is_seeded_and_independent_of_the_other_factors():
    a = resampled_test_sets(LABELS, [10], seed=3, train_counts=TRAIN)
    b = resampled_test_sets(LABELS, [50, 10], seed=3, train_counts=TRAIN)
    c = resampled_test_sets(LABELS, [10], seed=4, train_counts=TRAIN)
    np.testing.assert_array_equal(a["forward_10"], b["forward_10"])
    assert not np.array_equal(a["forward_10"], c["forward_10"])


def make_eval(enabled=True):
    return GenericEvaluation(torch.tensor(LABELS), K, TRAIN, seed=1,
                             test_agnostic={"enabled": enabled, "imbalance_factors": [10]})


def test_generic_keys_primary_and_several_predictors():
    ev = make_eval()
    rng = np.random.default_rng(0)
    good = torch.tensor(np.eye(K)[LABELS] * 3 + rng.normal(size=(len(LABELS), K)), dtype=torch.float32)
    bad = torch.zeros(len(LABELS), K)
    bad[:, 0] = 1  # always predicts class 0: the other classes are never predicted
    s, d = ev.evaluate([("sse_c", good), ("psi", bad)], several=True)
    primary_acc = float((good.argmax(1).numpy() == LABELS).mean())
    assert s["generic/accuracy"] == pytest.approx(primary_acc) == s["generic/sse_c/accuracy"]
    assert s["generic/psi/accuracy"] == pytest.approx(0.2)
    assert s["generic/psi/worst_class_accuracy"] == 0.0 and s["generic/psi/gmean"] == 0.0
    assert s["generic/psi/macro_f1"] == pytest.approx((2 * 100 / 600) / K)
    assert s["generic/psi/confusion_spectral_norm"] == pytest.approx(2.0)  # 4 rows of e_0: ||.|| = sqrt(4)
    # head/mid/tail under every rule, from the global training counts
    for rule in ("cumulative_75_95", "count_100_20", "fraction_50_30_20"):
        head = shot_groups(TRAIN, rule)["head"]
        want = 1.0 if head == [0] else 100 / (100 * len(head))
        assert s[f"generic/psi/{rule}/head_accuracy"] == pytest.approx(want)
    # test-agnostic only for the primary predictor, sliced from the same logits
    idx = ev.test_sets["backward_10"]
    assert s["generic/test_agnostic/backward_10/accuracy"] == pytest.approx(
        float((good.argmax(1).numpy()[idx] == LABELS[idx]).mean()))
    assert s["generic/test_agnostic/uniform/accuracy"] == pytest.approx(primary_acc)
    assert not any(k.startswith("generic/psi/test_agnostic") for k in s)
    assert d["psi/per_class_accuracy"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert d["groups"]["count_100_20"] == {"head": [0, 1], "mid": [2, 3], "tail": [4]}


def test_one_predictor_has_no_named_keys_and_test_agnostic_can_be_disabled():
    s, _ = make_eval(enabled=False).evaluate([("model", torch.randn(len(LABELS), K))], several=False)
    assert not any(k.startswith(("generic/model/", "generic/test_agnostic/")) for k in s)
    assert {"generic/auroc", "generic/auprc", "generic/ece", "generic/balanced_accuracy"} <= set(s)


def test_local_shot_groups_use_the_clients_own_classes():
    assert local_shot_groups([0, 7, 0], "fraction_50_30_20") == {"head": [1], "mid": [], "tail": []}
    assert local_shot_groups([0, 0, 0], "cumulative_75_95") == {"head": [], "mid": [], "tail": []}
    g = local_shot_groups([50, 0, 40, 30, 0, 20], "fraction_50_30_20")  # 4 held classes: 2 / 1 / 1
    assert g == {"head": [0, 2], "mid": [3], "tail": [5]}


@pytest.mark.parametrize("bad", [[0.5], "10", [10, True]])
def test_bad_test_agnostic_config_is_a_config_error(bad):
    import yaml

    from tests.conftest import ROOT

    cfg = yaml.safe_load((ROOT / "configs" / "config.yaml").read_text())
    cfg.pop("defaults"), cfg.pop("hydra")  # Hydra's own keys: never in a composed config
    for group in ("dataset/fmnist_lt", "partition/dirichlet", "model/cnn", "strategy/fedavg", "backend/local"):
        cfg[group.split("/")[0]] = yaml.safe_load((ROOT / "configs" / f"{group}.yaml").read_text())
    cfg["eval"]["test_agnostic"]["imbalance_factors"] = bad
    with pytest.raises(ConfigError, match="eval.test_agnostic.imbalance_factors"):
        validate(cfg)
