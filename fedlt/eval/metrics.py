"""Metrics, one function each, used identically for the generic model (server, balanced test set) and the
personalized models (clients' local test sets).

Two kinds:

* **count metrics** -- from per-class ``correct`` / ``total`` / ``predicted`` counts, which is all a client has to
  send for them: accuracy, per-class / balanced / worst-class accuracy, macro-F1, G-mean, head/mid/tail accuracy.
* **score metrics** -- need the full logits: macro one-vs-rest AUROC and AUPRC, expected calibration error and
  the spectral norm of the frequency-weighted confusion matrix. The server computes them for the generic model;
  each client computes them for its own model on its own test set (predictions never leave the client) with the
  same functions and sends the scalars.

Classes without test samples are left out of every class-wise number (a personalized test set usually covers
only some classes), and a metric that is undefined on a test set is NaN (``null`` in JSON), never 0.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

ECE_BINS = 15


def _arrays(*xs):
    return [np.asarray(x, dtype=np.float64) for x in xs]


def per_class_accuracy(correct, total) -> list[float | None]:
    """Recall of each class; None for classes with no test samples."""
    correct, total = _arrays(correct, total)
    return [float(c / t) if t > 0 else None for c, t in zip(correct, total, strict=True)]


def macro_f1(correct, total, predicted) -> float:
    """Macro-F1 from counts: F1_c = 2 TP_c / (|true c| + |predicted c|), averaged over the classes that occur
    as a label or as a prediction -- exactly ``sklearn.metrics.f1_score(average="macro")`` with its default
    labels (a class predicted but never present scores 0; a class never predicted scores 0)."""
    correct, total, predicted = _arrays(correct, total, predicted)
    seen = (total + predicted) > 0
    if not seen.any():
        return float("nan")
    return float(np.mean(2 * correct[seen] / (total[seen] + predicted[seen])))


def gmean(correct, total) -> float:
    """Geometric mean of the per-class recalls over the classes present in the test set (0 as soon as one
    present class is never recognised -- the point of the metric)."""
    correct, total = _arrays(correct, total)
    present = total > 0
    if not present.any():
        return float("nan")
    recall = correct[present] / total[present]
    return 0.0 if (recall == 0).any() else float(np.exp(np.mean(np.log(recall))))


def count_metrics(correct, total, predicted=None) -> dict[str, float]:
    """Overall, balanced and worst-class accuracy and G-mean from per-class correct/total counts, plus macro-F1
    when the per-class prediction counts are given."""
    correct, total = _arrays(correct, total)
    present = total > 0
    recall = correct[present] / total[present]
    out = {
        "accuracy": float(correct.sum() / total.sum()) if total.sum() else float("nan"),
        "balanced_accuracy": float(recall.mean()) if present.any() else float("nan"),
        "worst_class_accuracy": float(recall.min()) if present.any() else float("nan"),
        "gmean": gmean(correct, total),
    }
    if predicted is not None:
        out["macro_f1"] = macro_f1(correct, total, predicted)
    return out


def group_accuracy(correct, total, groups: dict[str, list[int]]) -> dict[str, float]:
    """Accuracy over the test samples of each class group (FedLoGe's ``shot_split`` accuracy: correct / total
    pooled over the group's classes); NaN for an empty group or one without test samples."""
    correct, total = _arrays(correct, total)
    out = {}
    for g, classes in groups.items():
        idx = np.asarray(classes, dtype=np.int64)
        n = total[idx].sum() if idx.size else 0.0
        out[g] = float(correct[idx].sum() / n) if n > 0 else float("nan")
    return out


# ------------------------------------------------------------------------------------------ score metrics
def softmax(logits) -> np.ndarray:
    """Row-wise softmax in float64; masked logits (-inf) get probability 0."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_matrix(labels, pred, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class (``sklearn.metrics.confusion_matrix`` with
    ``labels=range(K)``; a bincount is the same thing without its per-call label validation)."""
    labels, pred = np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    return np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def confusion_spectral_norm(confusion) -> float:
    """Spectral norm ||C||_2 (largest singular value) of the frequency-weighted confusion matrix C.

    Definition (the quantity the CAR paper -- Zhu et al., "Confusion-Aware Spectral Regularizer for Long-Tailed
    Recognition", CVPR 2026 -- bounds the worst-class error with, and its code estimates):

        C_ij = #{y = i, y_hat = j} / #{y = i}   for i != j,      C_ii = 0,

    i.e. the raw confusion counts with each true-class row divided by that class's frequency in the test set
    (so a head class cannot dominate the matrix by its size) and the diagonal removed (only errors count).
    Rows of classes without test samples are 0. Row i sums to the error rate of class i, hence

        worst-class error = max_i ||C^T e_i||_1 <= sqrt(K - 1) * ||C||_2,

    and ||C||_2 <= sqrt(worst-class error * max_j sum_i C_ij): a small spectral norm means no class is confused
    much and no class absorbs many others' samples. 0 for a perfect classifier.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    n = cm.sum(axis=1, keepdims=True)
    c = np.divide(cm, n, out=np.zeros_like(cm), where=n > 0)
    np.fill_diagonal(c, 0.0)
    # torch, not numpy: it honours the process's torch thread setting, where numpy's BLAS threads can make
    # this 100x slower on a busy machine
    return float(torch.linalg.matrix_norm(torch.from_numpy(c), ord=2)) if c.size else float("nan")


def expected_calibration_error(probs, labels, pred=None, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (Guo et al. 2017) with ``n_bins`` equal-width confidence bins (lo, hi]:
    sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|. (sklearn's ``calibration_curve`` is binary-only,
    hence this short function.) ``pred`` defaults to the arg-max of ``probs``."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return float("nan")
    pred = probs.argmax(1) if pred is None else np.asarray(pred, dtype=np.int64)
    conf = probs[np.arange(len(labels)), pred]
    hit = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    gap = np.abs(np.bincount(b, hit, minlength=n_bins) - np.bincount(b, conf, minlength=n_bins))
    return float(gap.sum() / len(labels))  # sum_b n_b/n * |acc_b - conf_b| = sum_b |hits_b - conf_b| / n


def average_precision(scores, positive) -> float:
    """Average precision of one binary problem, sklearn's definition (``average_precision_score``):
    sum over distinct score thresholds, in decreasing order, of (R_t - R_{t-1}) * P_t -- no interpolation;
    tied scores form one threshold."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    tp = np.cumsum(y)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last sample of each group of tied scores
    tp = tp[last]
    precision = tp / (last + 1.0)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def ovr_auroc_auprc(probs, labels) -> tuple[float, float]:
    """Macro one-vs-rest AUROC and AUPRC (average precision): each class's binary problem (y == c vs. p_c),
    averaged over the classes that are defined on this test set -- those with at least one positive and one
    negative sample. (sklearn's ``multi_class="ovr"`` would raise as soon as one class is absent, which is the
    normal case on a client.) NaN when no class qualifies (e.g. a test set with a single class).

    The values are sklearn's ``roc_auc_score`` / ``average_precision_score`` per class (the tests check this
    against sklearn, ties included); they are computed vectorised here -- AUROC as the Mann-Whitney statistic
    on average ranks -- because sklearn's per-class calls cost about a second per client per predictor at
    K = 100, every evaluated round."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    k = probs.shape[1] if probs.ndim == 2 else 0
    n_pos = np.bincount(labels, minlength=k)[:k] if n else np.zeros(k, dtype=np.int64)
    valid = np.flatnonzero((n_pos > 0) & (n_pos < n))
    if valid.size == 0:
        return float("nan"), float("nan")
    positive = labels[:, None] == valid[None, :]
    scores = probs[:, valid]
    pos = n_pos[valid].astype(np.float64)
    ranks = rankdata(scores, axis=0)  # average ranks: a tie counts 1/2, as in the ROC trapezoid
    auroc = ((ranks * positive).sum(0) - pos * (pos + 1) / 2) / (pos * (n - pos))
    auprc = [average_precision(scores[:, j], positive[:, j]) for j in range(valid.size)]
    return float(auroc.mean()), float(np.mean(auprc))


def score_metrics(logits, labels, num_classes: int | None = None) -> dict[str, float]:
    """Every metric that needs the logits, not just counts: macro OvR AUROC / AUPRC on the softmax
    probabilities, ECE, and the spectral norm of the frequency-weighted confusion matrix."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return {k: float("nan") for k in ("auroc", "auprc", "ece", "confusion_spectral_norm")}
    k = int(num_classes or logits.shape[1])
    probs = softmax(logits)
    pred = logits.argmax(1)  # the same prediction the counts use
    auroc, auprc = ovr_auroc_auprc(probs, labels)
    return {
        "auroc": auroc,
        "auprc": auprc,
        "ece": expected_calibration_error(probs, labels, pred),
        "confusion_spectral_norm": confusion_spectral_norm(confusion_matrix(labels, pred, k)),
    }


# ---------------------------------------------------------------------------------------- across clients
def client_spread(values, weights) -> dict[str, float]:
    """Summary of per-client accuracies: unweighted mean over ALL clients (the Fed-LT convention), the
    sample-weighted mean, std, min and 10th percentile."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    keep = np.isfinite(v)  # a client without test samples has no accuracy
    v, w = v[keep], w[keep]
    if v.size == 0:
        return {}
    return {
        "accuracy": float(v.mean()),
        "accuracy_weighted": float((v * w).sum() / w.sum()) if w.sum() else float("nan"),
        "accuracy_std": float(v.std()),
        "accuracy_min": float(v.min()),
        "accuracy_p10": float(np.percentile(v, 10)),
    }


def mean_defined(values) -> float:
    """Mean over the clients where a metric is defined (NaN entries skipped); NaN if none."""
    v = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")
