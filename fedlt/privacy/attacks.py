"""Membership inference by thresholding a model's loss or confidence (the scoring half of ``fedlt-attack``).

Two attacks, both black-box and both a single threshold on one number per example:

* **loss** (Yeom et al., "Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting", CSF 2018):
  an example is called a member when the model's cross-entropy loss on it (with the label it was trained on) is
  low; the score is ``-loss``. Yeom et al.'s own threshold is the model's expected training loss; we report the
  advantage at that threshold (the attacker knows the mean loss on members) and at the best threshold.
* **confidence** (Salem et al., "ML-Leaks", NDSS 2019, the threshold variant "Adversary 3"): the score is the
  highest softmax probability (label-free).

What is reported: the ROC AUC (``sklearn.metrics.roc_auc_score``; 0.5 = no leakage), the membership advantage
``max_t TPR(t) - FPR(t)`` at the best threshold (Yeom et al.'s advantage, chosen on the attacked examples
themselves, so an optimistic upper bound for an attacker who has to pick t beforehand), per-class AUC and the
AUC over each head/mid/tail group's examples. Members and non-members must have the same class profile
(``fedlt.attack`` matches them class by class), else AUC partly measures class, not membership.

Checked against the official code (facts only, nothing copied): Yeom et al.'s samuel-yeom/ml-privacy-csf18 at
5b176c3025b02ce5853448dbe6365ce7f0eecbf4, ``code/inclusion.py`` (``sklearn_decide``: "member" iff the error is
below the model's empirical training error; their code is for regression, RMSE; the paper's classification
version uses the expected training loss, which is what ``yeom_advantage`` thresholds at, estimated by the mean
loss of the attacked members); Salem et al.'s AhmedSalem2/ML-Leaks at 548b44b41f088abdd4146b9ec8db2d7ef129597e,
``mlLeaks.py`` (``attackerThree``: the top-1 posterior of members vs non-members, scored by
``roc_auc_score``, as here). Deviations: none in the scores; added are the best-threshold advantage (from
``roc_curve``), per-class and per-group AUC. Neither paper's threshold-selection procedure beyond these (Salem et
al.'s percentile of random inputs' posteriors) is implemented: AUC is threshold-free.

A library module: torch, numpy and scikit-learn only (the run-loading CLI is :mod:`fedlt.attack`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

ATTACKS = ("loss", "confidence")


@torch.no_grad()
def example_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-example membership scores (higher = more likely a member) from logits and the trained-on labels."""
    logits = logits.float()
    loss = F.cross_entropy(logits, labels.long(), reduction="none")
    confidence = F.softmax(logits, dim=1).max(dim=1).values
    return {"loss": (-loss).cpu().numpy().astype(np.float64),
            "confidence": confidence.cpu().numpy().astype(np.float64)}


def null_auc_std(n_members: int, n_non_members: int) -> float:
    """Standard deviation of the AUC of an attack that cannot tell members from non-members (Mann-Whitney U
    under H0, no ties): sqrt((n1 + n0 + 1) / (12 n1 n0)). An observed |AUC - 0.5| of a few of these is noise."""
    if n_members < 1 or n_non_members < 1:
        return math.nan
    return math.sqrt((n_members + n_non_members + 1) / (12.0 * n_members * n_non_members))


def _finite(s: np.ndarray) -> np.ndarray:
    """Scores scikit-learn accepts: a non-finite loss (an overflowing model) ranks as the least member-like."""
    big = np.finfo(np.float64).max
    return np.nan_to_num(np.asarray(s, dtype=np.float64), nan=-big, posinf=big, neginf=-big)


def auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """ROC AUC of separating members (positives) from non-members by score; NaN when either side is empty."""
    from sklearn.metrics import roc_auc_score

    if len(member_scores) == 0 or len(non_member_scores) == 0:
        return math.nan
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    s = _finite(np.r_[member_scores, non_member_scores])
    return float(roc_auc_score(y, s))


def best_advantage(member_scores: np.ndarray, non_member_scores: np.ndarray) -> tuple[float, float]:
    """(max_t TPR - FPR, that threshold t): "member" iff score >= t."""
    from sklearn.metrics import roc_curve

    if len(member_scores) == 0 or len(non_member_scores) == 0:
        return math.nan, math.nan
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    s = _finite(np.r_[member_scores, non_member_scores])
    fpr, tpr, thr = roc_curve(y, s)
    i = int(np.argmax(tpr - fpr))
    return float(tpr[i] - fpr[i]), float(thr[i])


def advantage_at(member_scores: np.ndarray, non_member_scores: np.ndarray, threshold: float) -> float:
    """TPR - FPR of "member" iff score >= threshold."""
    if len(member_scores) == 0 or len(non_member_scores) == 0:
        return math.nan
    return float(np.mean(member_scores >= threshold) - np.mean(non_member_scores >= threshold))


def evaluate(members: dict[str, np.ndarray], non_members: dict[str, np.ndarray], member_labels: np.ndarray,
             non_member_labels: np.ndarray, num_classes: int, groups: dict[str, dict[str, list[int]]]) -> dict:
    """Everything reported for one attacked model (or pool of models). ``members`` / ``non_members``: the
    :func:`example_scores` of each side; ``*_labels``: the class of each example (for per-class / group AUC);
    ``groups``: shot rule -> group -> class indices (:func:`fedlt.eval.groups.shot_groups`)."""
    n1, n0 = len(member_labels), len(non_member_labels)
    out: dict = {"n_members": n1, "n_non_members": n0, "auc_null_std": null_auc_std(n1, n0)}
    for name in ATTACKS:
        m, nm = members[name], non_members[name]
        adv, thr = best_advantage(m, nm)
        res = {"auc": auc(m, nm), "advantage": adv, "threshold": thr}
        if name == "loss":  # Yeom et al.'s threshold: the mean training loss (score = -loss)
            res["yeom_threshold_loss"] = float(-np.mean(m)) if n1 else math.nan
            res["yeom_advantage"] = advantage_at(m, nm, float(np.mean(m))) if n1 else math.nan
        res["per_class_auc"] = [auc(m[member_labels == c], nm[non_member_labels == c]) for c in range(num_classes)]
        res["groups"] = {rule: {g: auc(m[np.isin(member_labels, cls)], nm[np.isin(non_member_labels, cls)])
                                for g, cls in gs.items()} for rule, gs in groups.items()}
        out[name] = res
    out["per_class_n"] = [[int(np.sum(member_labels == c)), int(np.sum(non_member_labels == c))]
                          for c in range(num_classes)]
    return out
