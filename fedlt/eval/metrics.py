"""Metrics from per-class counts (personalized and generic) and from full logits (generic only)."""

from __future__ import annotations

import numpy as np


def count_metrics(correct, total) -> dict[str, float]:
    """Overall, balanced and worst-class accuracy from per-class correct/total counts (classes with no test
    samples are left out of the class-wise numbers)."""
    correct, total = np.asarray(correct, dtype=np.float64), np.asarray(total, dtype=np.float64)
    present = total > 0
    per_class = np.where(present, correct / np.maximum(total, 1), np.nan)
    return {
        "accuracy": float(correct.sum() / total.sum()) if total.sum() else float("nan"),
        "balanced_accuracy": float(np.nanmean(per_class)) if present.any() else float("nan"),
        "worst_class_accuracy": float(np.nanmin(per_class)) if present.any() else float("nan"),
    }


def per_class_accuracy(correct, total) -> list[float | None]:
    correct, total = np.asarray(correct, dtype=np.float64), np.asarray(total, dtype=np.float64)
    return [float(c / t) if t > 0 else None for c, t in zip(correct, total, strict=True)]


def client_spread(values, weights) -> dict[str, float]:
    """Summary of per-client accuracies: unweighted mean over ALL clients (the Fed-LT convention), the
    sample-weighted mean, std, min and 10th percentile."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if v.size == 0:
        return {}
    return {
        "accuracy": float(v.mean()),
        "accuracy_weighted": float((v * w).sum() / w.sum()) if w.sum() else float("nan"),
        "accuracy_std": float(v.std()),
        "accuracy_min": float(v.min()),
        "accuracy_p10": float(np.percentile(v, 10)),
    }
