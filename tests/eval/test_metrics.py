"""Each metric against values computed by hand on small toy predictions, including the edge cases a Fed-LT
evaluation hits all the time: a class never predicted, a class absent from the test set, a single-class client."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from fedlt.eval.metrics import (client_spread, confusion_matrix, confusion_spectral_norm, count_metrics,
                                expected_calibration_error, gmean, group_accuracy, macro_f1, mean_defined,
                                ovr_auroc_auprc, per_class_accuracy, score_metrics, softmax)
from fedlt.eval.predict import class_counts, local_eval_record

# 3 classes; class 2 is never predicted. Per class: 0 -> 3/4 right, 1 -> 1/2, 2 -> 0/2.
Y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
P = np.array([0, 0, 0, 1, 1, 0, 0, 0])


def counts(y, p, k):
    return class_counts(torch.nn.functional.one_hot(torch.tensor(p), k).float(), torch.tensor(y), k)


def test_count_metrics_by_hand_with_a_class_never_predicted():
    c = counts(Y, P, 3)
    assert c == {"correct": [3, 1, 0], "total": [4, 2, 2], "predicted": [6, 2, 0]}
    m = count_metrics(c["correct"], c["total"], c["predicted"])
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert m["worst_class_accuracy"] == 0.0
    assert m["gmean"] == 0.0  # one class never recognised
    # F1_c = 2 TP / (true + predicted): 6/10, 2/4, 0/2
    assert m["macro_f1"] == pytest.approx((0.6 + 0.5 + 0.0) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(Y, P, average="macro", zero_division=0))
    assert per_class_accuracy(c["correct"], c["total"]) == [0.75, 0.5, 0.0]


def test_gmean_by_hand():
    assert gmean([1, 4], [2, 5]) == pytest.approx(math.sqrt(0.5 * 0.8))
    assert gmean([1, 0, 4], [2, 0, 5]) == pytest.approx(math.sqrt(0.5 * 0.8))  # absent class left out
    assert math.isnan(gmean([0, 0], [0, 0]))


def test_class_absent_from_the_test_set_is_left_out():
    # a client holding classes 0 and 2 only; it wrongly predicts class 1 once
    y, p = np.array([0, 0, 2, 2, 2]), np.array([0, 1, 2, 2, 2])
    c = counts(y, p, 3)
    m = count_metrics(c["correct"], c["total"], c["predicted"])
    assert per_class_accuracy(c["correct"], c["total"]) == [0.5, None, 1.0]
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["worst_class_accuracy"] == pytest.approx(0.5)
    # class 1 is predicted but never present: it counts in macro-F1 with F1 = 0, as sklearn does
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 1.0) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))


def test_single_class_client():
    m = count_metrics([3, 0, 0], [4, 0, 0], [3, 1, 0])
    assert m["accuracy"] == m["balanced_accuracy"] == m["worst_class_accuracy"] == m["gmean"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 * 3 / 7 + 0) / 2)
    s = score_metrics(np.log([[0.9, 0.1, 1e-9]] * 4), np.zeros(4, dtype=int))
    assert math.isnan(s["auroc"]) and math.isnan(s["auprc"])  # no negatives: undefined, not 0 or 1


def test_empty_test_set_is_nan_not_zero():
    m = count_metrics([0, 0], [0, 0], [0, 0])
    assert all(math.isnan(v) for v in m.values())
    assert all(math.isnan(v) for v in score_metrics(np.zeros((0, 2)), np.zeros(0, dtype=int)).values())


def test_macro_f1_matches_sklearn_on_random_predictions():
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(2, 8))
        y, p = rng.integers(0, k, 50), rng.integers(0, k, 50)
        c = counts(y, p, k)
        assert macro_f1(c["correct"], c["total"], c["predicted"]) == pytest.approx(
            f1_score(y, p, average="macro", zero_division=0))


def test_group_accuracy_pools_samples_and_empty_group_is_nan():
    correct, total = [3, 1, 0, 0], [4, 2, 2, 0]
    g = group_accuracy(correct, total, {"head": [0, 1], "mid": [3], "tail": []})
    assert g["head"] == pytest.approx(4 / 6)  # pooled, not the mean of 0.75 and 0.5
    assert math.isnan(g["mid"])  # classes without test samples
    assert math.isnan(g["tail"])  # empty group


def test_ece_by_hand():
    # confidences 0.9, 0.9 (one right) -> bin (0.867, 0.933]: |0.5 - 0.9| = 0.4
    # confidences 0.65, 0.65 (both right) -> bin (0.6, 0.667]: |1 - 0.65| = 0.35
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.35, 0.65], [0.65, 0.35]])
    labels = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.35)
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)  # sure and right
    # a bin edge: confidence exactly 1/15*k belongs to the lower bin (lo, hi]; 2 classes so conf >= 0.5
    assert expected_calibration_error(np.array([[0.6, 0.4]]), np.array([1])) == pytest.approx(0.6)


def test_confusion_spectral_norm_by_hand():
    assert confusion_spectral_norm([[3, 1], [0, 2]]) == pytest.approx(0.25)
    # C = [[0, .5, 0], [0, 0, .5], [0, 0, 0]] -> C^T C = diag(0, .25, .25) -> ||C|| = .5
    assert confusion_spectral_norm([[2, 2, 0], [0, 1, 1], [0, 0, 4]]) == pytest.approx(0.5)
    assert confusion_spectral_norm(np.diag([5, 3, 1])) == 0.0  # perfect
    # rows are normalised per true class: scaling one class's sample count changes nothing
    assert confusion_spectral_norm([[300, 100], [0, 2]]) == pytest.approx(0.25)
    # a class absent from the test set has a zero row
    assert confusion_spectral_norm([[3, 1, 0], [0, 0, 0], [0, 0, 2]]) == pytest.approx(0.25)


def test_confusion_spectral_norm_bounds_the_worst_class_error():
    rng = np.random.default_rng(1)
    for _ in range(50):
        k = int(rng.integers(2, 10))
        cm = rng.integers(0, 20, (k, k)) + np.diag(rng.integers(1, 50, k))
        err = 1 - np.diag(cm) / cm.sum(1)
        norm = confusion_spectral_norm(cm)
        assert err.max() <= math.sqrt(k - 1) * norm + 1e-12
        assert norm <= math.sqrt(err.max() * 1.0 * k) + 1e-12  # <= sqrt(||C||_inf * ||C||_1), cols <= k


def test_confusion_matrix_rows_true_columns_predicted():
    np.testing.assert_array_equal(confusion_matrix(Y, P, 3), [[3, 1, 0], [1, 1, 0], [2, 0, 0]])


def test_auroc_auprc_by_hand():
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9])
    probs = np.stack([1 - p1, p1], 1)
    auroc, auprc = ovr_auroc_auprc(probs, labels)
    assert auroc == pytest.approx(0.75)  # 3 of the 4 (pos, neg) pairs ranked right, for either class
    assert auprc == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # precision 1 at the first positive, 2/3 at the second


def test_auroc_matches_sklearn_ovr_when_all_classes_present():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 1.5 * np.eye(4)[y]
    probs = softmax(logits)
    auroc, auprc = ovr_auroc_auprc(probs, y)
    assert auroc == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert auprc == pytest.approx(average_precision_score(np.eye(4)[y], probs, average="macro"))


def test_auroc_skips_classes_absent_from_the_test_set():
    rng = np.random.default_rng(3)
    y = rng.choice([0, 2], 60)  # class 1 absent, and never the label
    probs = softmax(rng.normal(size=(60, 3)) + np.eye(3)[y])
    auroc, _ = ovr_auroc_auprc(probs, y)
    expected = np.mean([roc_auc_score(y == c, probs[:, c]) for c in (0, 2)])
    assert auroc == pytest.approx(expected)


def test_score_metrics_accept_masked_logits():
    logits = torch.tensor([[2.0, 0.0, -math.inf], [0.0, 1.0, -math.inf], [1.0, 3.0, -math.inf]])
    s = score_metrics(logits.numpy(), np.array([0, 1, 0]))
    assert all(math.isfinite(v) for v in s.values())
    assert s["confusion_spectral_norm"] == pytest.approx(0.5)  # class 0: one of two predicted as 1


def test_local_eval_record_carries_counts_and_scores():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    rec = local_eval_record(logits, torch.tensor([0, 1, 1]), 2, "model/masked")
    assert rec["model/masked/correct"] == [1, 1] and rec["model/masked/predicted"] == [2, 1]
    assert set(rec) >= {f"model/masked/{k}" for k in ("auroc", "auprc", "ece", "confusion_spectral_norm")}


def test_client_spread_by_hand():
    s = client_spread([0.5, 1.0, 0.9, float("nan")], [10, 30, 60, 5])
    assert s["accuracy"] == pytest.approx(0.8)  # unweighted, the client without test samples left out
    assert s["accuracy_weighted"] == pytest.approx((5 + 30 + 54) / 100)
    assert s["accuracy_min"] == 0.5
    assert s["accuracy_std"] == pytest.approx(np.std([0.5, 1.0, 0.9]))
    assert s["accuracy_p10"] == pytest.approx(np.percentile([0.5, 1.0, 0.9], 10))
    assert mean_defined([None, 0.2, float("nan"), 0.4]) == pytest.approx(0.3)
    assert math.isnan(mean_defined([None]))


def test_auroc_auprc_equal_sklearn_per_class_with_ties_and_absent_classes():
    rng = np.random.default_rng(4)
    for trial in range(18):
        k, n = int(rng.integers(2, 7)), int(rng.integers(5, 80))
        y = rng.integers(0, k - (trial % 2), n)  # every other trial: the last class absent
        probs = softmax(rng.normal(size=(n, k)) + np.eye(k)[y])
        if trial % 3 == 0:
            probs = np.round(probs, 1)  # many tied scores
        auroc, auprc = ovr_auroc_auprc(probs, y)
        valid = [c for c in range(k) if 0 < (y == c).sum() < n]
        if not valid:
            assert math.isnan(auroc)
            continue
        assert auroc == pytest.approx(np.mean([roc_auc_score(y == c, probs[:, c]) for c in valid]))
        assert auprc == pytest.approx(np.mean([average_precision_score(y == c, probs[:, c]) for c in valid]))
