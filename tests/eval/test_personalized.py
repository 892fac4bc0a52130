"""Personalized aggregation: per-client records (what clients send) -> the keys users read, by hand."""

import math

import numpy as np
import pytest

from fedlt.eval.personalized import personalized_metrics


def record(cid, train, total, correct, predicted, pred="model", scores=None, variants=("unmasked", "masked")):
    r = {"client-id": cid, "num-examples": sum(total), "total": total, "train-total": train}
    for v in variants:
        r[f"{pred}/{v}/correct"] = correct
        r[f"{pred}/{v}/predicted"] = predicted
        for k, x in (scores or {}).items():
            r[f"{pred}/{v}/{k}"] = x
    return r


# client 0 holds one class only; client 1 holds three classes (counts 100 / 30 / 5)
A = record(0, [10, 0, 0], [5, 0, 0], [4, 0, 0], [4, 1, 0], scores={"auroc": float("nan"), "ece": 0.1})
B = record(1, [100, 30, 5], [10, 3, 1], [9, 1, 0], [11, 3, 0], scores={"auroc": 0.8, "ece": 0.3})


def test_mean_over_all_clients_unweighted_and_spread():
    s, d = personalized_metrics([B, A], mask_default=False)
    acc_a, acc_b = 4 / 5, 10 / 14
    assert s["personalized/accuracy"] == pytest.approx((acc_a + acc_b) / 2)
    assert s["personalized/accuracy_weighted"] == pytest.approx((4 + 10) / (5 + 14))
    assert s["personalized/accuracy_min"] == pytest.approx(acc_b)
    assert s["personalized/accuracy_std"] == pytest.approx(np.std([acc_a, acc_b]))
    assert s["personalized/accuracy_p10"] == pytest.approx(np.percentile([acc_a, acc_b], 10))
    assert s["personalized/balanced_accuracy"] == pytest.approx((0.8 + (0.9 + 1 / 3 + 0) / 3) / 2)
    assert s["personalized/worst_class_accuracy"] == pytest.approx((0.8 + 0.0) / 2)
    assert s["personalized/ece"] == pytest.approx(0.2)
    assert s["personalized/auroc"] == pytest.approx(0.8)  # undefined for the single-class client: skipped
    assert d["client_ids"] == [0, 1]  # sorted by client id
    assert d["model/unmasked/per_client_accuracy"] == pytest.approx([acc_a, acc_b])
    assert d["model/masked/per_client"]["macro_f1"][0] == pytest.approx((2 * 4 / 9 + 0) / 2)


def test_per_client_shot_groups_averaged_over_clients_having_the_group():
    s, d = personalized_metrics([A, B], mask_default=False)
    # cumulative_75_95 on B's counts (100, 30, 5): 100/135 < 75 % so head = {0, 1}; 130/135 > 95 % so mid = {};
    # tail = {2}. A (one class): head = {0}, mid = tail = {}.
    assert s["personalized/cumulative_75_95/head_accuracy"] == pytest.approx((4 / 5 + 10 / 13) / 2)
    assert math.isnan(s["personalized/cumulative_75_95/mid_accuracy"])  # no client has a mid group
    assert s["personalized/cumulative_75_95/tail_accuracy"] == pytest.approx(0.0)  # B only
    assert d["model/unmasked/group_clients"]["cumulative_75_95/head"] == 2
    assert d["model/unmasked/group_clients"]["cumulative_75_95/tail"] == 1
    # count_100_20 (head > 100, few < 20): B: head {}, mid {0 (=100), 1}, tail {2}; A: tail {0}
    assert math.isnan(s["personalized/count_100_20/head_accuracy"])
    assert s["personalized/count_100_20/mid_accuracy"] == pytest.approx(10 / 13)
    assert s["personalized/count_100_20/tail_accuracy"] == pytest.approx((4 / 5 + 0) / 2)
    # fraction_50_30_20 over each client's own classes: B: head = round(1.5) = 2 -> {0, 1}, mid {}, tail {2}
    assert s["personalized/fraction_50_30_20/head_accuracy"] == pytest.approx((4 / 5 + 10 / 13) / 2)


def test_default_variant_and_several_predictors():
    masked = record(0, [5, 5], [2, 2], [2, 2], [2, 2], variants=("masked",))
    unmasked = record(0, [5, 5], [2, 2], [1, 2], [1, 3], variants=("unmasked",))
    rec = {**unmasked, **masked}
    s, _ = personalized_metrics([rec], mask_default=True)
    assert s["personalized/accuracy"] == 1.0 and s["personalized/unmasked/accuracy"] == 0.75
    s, _ = personalized_metrics([rec], mask_default=False)
    assert s["personalized/accuracy"] == 0.75 and s["personalized/masked/accuracy"] == 1.0
    assert not any(k.startswith("personalized/model/") for k in s)  # one predictor: no per-predictor keys
    two = {**rec, **{k.replace("model/", "head/"): v for k, v in rec.items() if k.startswith("model/")}}
    s, _ = personalized_metrics([two], mask_default=False)
    assert s["personalized/model/masked/accuracy"] == 1.0 and s["personalized/head/unmasked/accuracy"] == 0.75
    assert s["personalized/accuracy"] == 0.75  # the primary (first) predictor


def test_no_records():
    assert personalized_metrics([], mask_default=False)[0] == {}
