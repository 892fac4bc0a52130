"""Generic evaluation (server side): every generic predictor of a strategy on the balanced test set.

Which model: each predictor returned by the strategy's ``generic_predictors`` (the first is the primary one),
on the global model after the round's aggregation. Which test set: the dataset's full balanced test split.
Which groups: head/mid/tail from the global long-tailed TRAINING counts, under every rule in ``SHOT_RULES``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedlt.eval.groups import SHOT_RULES, shot_groups
from fedlt.eval.metrics import count_metrics, group_accuracy, per_class_accuracy, score_metrics
from fedlt.eval.predict import class_counts
from fedlt.eval.shifted_tests import resampled_test_sets


def predictor_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      groups: dict[str, dict[str, list[int]]] | None = None) -> tuple[dict, dict]:
    """All metrics of one predictor on one test set -> (scalars by metric name, per-class detail)."""
    counts = class_counts(logits, labels, num_classes)
    scalars = count_metrics(counts["correct"], counts["total"], counts["predicted"])
    scalars.update(score_metrics(logits.numpy(), labels.numpy(), num_classes))
    for rule, g in (groups or {}).items():
        for name, acc in group_accuracy(counts["correct"], counts["total"], g).items():
            scalars[f"{rule}/{name}_accuracy"] = acc
    detail = {"per_class_accuracy": per_class_accuracy(counts["correct"], counts["total"]),
              "per_class_predicted": counts["predicted"]}
    return scalars, detail


class GenericEvaluation:
    """Set up once per run (groups, test-agnostic index sets); ``evaluate`` is called every evaluated round."""

    def __init__(self, labels: torch.Tensor, num_classes: int, train_counts=None, seed: int = 0,
                 test_agnostic: dict | None = None):
        self.labels = labels
        self.num_classes = int(num_classes)
        self.train_counts = None if train_counts is None else [int(c) for c in train_counts]
        self.groups = ({rule: shot_groups(self.train_counts, rule) for rule in SHOT_RULES}
                       if self.train_counts is not None else {})
        ta = test_agnostic or {}
        self.test_sets = (resampled_test_sets(labels.numpy(), ta.get("imbalance_factors") or [], seed,
                                              self.train_counts) if ta.get("enabled") else {})

    @classmethod
    def for_run(cls, cfg: dict, plan, labels: torch.Tensor) -> "GenericEvaluation":
        """From a run config and its data plan: groups from the global long-tailed training counts."""
        from fedlt.data.federated import FederatedSplit

        train_counts = FederatedSplit.load(plan.split_path).global_counts
        return cls(labels, plan.num_classes, train_counts, int(cfg["seed"]),
                   (cfg.get("eval") or {}).get("test_agnostic"))

    def test_agnostic_metrics(self, logits: torch.Tensor) -> dict[str, float]:
        """Accuracy on each re-sampled test set (slices of the balanced-set logits)."""
        out = {}
        for name, idx in self.test_sets.items():
            t = torch.from_numpy(idx)
            pred = logits[t].argmax(1)
            out[f"test_agnostic/{name}/accuracy"] = float((pred == self.labels[t]).double().mean())
        return out

    def evaluate(self, logits_by_predictor: Iterable[tuple[str, torch.Tensor]], several: bool,
                 primary: bool = True) -> tuple[dict, dict]:
        """Scalars ``generic/<metric>`` for the primary (first) predictor and ``generic/<name>/<metric>`` for
        every predictor when there are several; detail per predictor plus the groups used. ``primary=False``:
        predictors scored beside an earlier call's primary one (only ``generic/<name>/<metric>``)."""
        scalars, detail = {}, {}
        for i, (name, logits) in enumerate(logits_by_predictor):
            m, d = predictor_metrics(logits, self.labels, self.num_classes, self.groups)
            if i == 0 and primary:
                m.update(self.test_agnostic_metrics(logits))
                scalars.update({f"generic/{k}": v for k, v in m.items()})
            if several:
                scalars.update({f"generic/{name}/{k}": v for k, v in m.items() if not k.startswith("test_agnostic/")})
            detail.update({f"{name}/{k}": v for k, v in d.items()})
        detail["groups"] = self.groups
        detail["train_counts"] = self.train_counts
        if self.test_sets:
            detail["test_agnostic_sizes"] = {k: int(len(v)) for k, v in self.test_sets.items()}
        return scalars, detail
