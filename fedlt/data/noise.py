"""Noisy long tails (``dataset.label_noise``): flip a seeded fraction of the clients' TRAINING labels.

Applied in :func:`fedlt.data.federated.build_split` after the long-tail sampling, the partition and the local test
sets are drawn (so with the same seed a noisy run has exactly the images, clients and local tests of the clean run;
only the labels its clients train on change). Local and generic test labels are never touched, and the clean labels
stay in the source arrays (``ClientData.train_y_clean`` on the client, ``client_clean_class_counts`` and the realised
transition matrix in ``partition.json``).

Kinds (T: the C x C transition matrix, T[i, j] = P(noisy label j | clean label i), r = ``rate``):

* ``symmetric`` -- with probability r the label is replaced by one of the other C - 1 classes, uniformly:
  T[i, i] = 1 - r, T[i, j] = r / (C - 1). (The "symmetric" / "uniform" noise of Zhang & Sabuncu 2018 and Wang et al.
  2019; some codes draw from all C classes instead, which flips only r (C - 1) / C of the labels.)
* ``pairflip`` -- with probability r the label becomes the next class, (i + 1) mod C (Han et al. 2018's pair flip).
* ``tail_to_head`` -- class-dependent: a label of a *tail* class is replaced, with probability r, by a *head* class
  drawn uniformly; head and mid labels are kept. Head / tail are the ``cumulative_75_95`` groups (official FedLoGe
  rule: classes sorted by count, head up to 75 % of the samples, tail after 95 %) of the federation's clean training
  counts (the sum over clients). The overall rate is therefore r times the tail's share of the data.

Every client's labels are flipped independently per sample, from one generator seeded by (``seed``, a fixed
stream id), clients in order: the same seed gives the same noisy labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlt.config import param
from fedlt.eval.groups import shot_groups
from fedlt.seeding import LABEL_NOISE

KINDS = ("symmetric", "pairflip", "tail_to_head")


@dataclass(frozen=True)
class LabelNoiseParams:
    """``dataset.label_noise`` (configs/config.yaml): off by default."""

    rate: float = param(0.0, "flip probability of a training label, in [0, 1); 0 = clean labels (off)",
                        lo=0.0, hi=1.0, hi_open=True)
    kind: str = param("symmetric", "symmetric (to any other class), pairflip (to class c+1) or tail_to_head (tail "
                                   "labels to a head class)", choices=KINDS)


def noise_config(dataset_cfg: dict) -> dict | None:
    """The ``dataset.label_noise`` section when noise is on (rate > 0), else None (absent, null or rate 0)."""
    node = dataset_cfg.get("label_noise") if isinstance(dataset_cfg, dict) else None
    if not isinstance(node, dict) or not float(node.get("rate") or 0.0) > 0:
        return None
    return {"rate": float(node["rate"]), "kind": str(node.get("kind", "symmetric"))}


def head_tail(counts: np.ndarray) -> tuple[list[int], list[int]]:
    """Head and tail classes of per-class ``counts`` under the cumulative 75 % / 95 % rule (the evaluation's
    ``cumulative_75_95`` groups; ``fedlt.eval.groups`` is a numpy-only leaf)."""
    groups = shot_groups(counts, "cumulative_75_95")
    return sorted(int(c) for c in groups["head"]), sorted(int(c) for c in groups["tail"])


def transition_matrix(kind: str, rate: float, num_classes: int, counts: np.ndarray | None = None) -> np.ndarray:
    """The requested (expected) T, row-stochastic, C x C. ``counts``: the clean per-class training counts
    (``tail_to_head`` needs them for its head and tail classes)."""
    c, r = int(num_classes), float(rate)
    t = np.eye(c)
    if c < 2 or r == 0:
        return t
    if kind == "symmetric":
        t = np.full((c, c), r / (c - 1))
        np.fill_diagonal(t, 1 - r)
    elif kind == "pairflip":
        t = (1 - r) * np.eye(c)
        t[np.arange(c), (np.arange(c) + 1) % c] += r
    elif kind == "tail_to_head":
        head, tail = head_tail(np.ones(c) if counts is None else counts)
        tail = [x for x in tail if x not in head]
        for i in tail:
            t[i, i] = 1 - r
            t[i, head] += r / len(head)
    else:
        raise ValueError(f"unknown label noise kind {kind!r}; allowed: {', '.join(KINDS)}")
    return t


def flip_labels(labels: list[np.ndarray], num_classes: int, kind: str, rate: float, seed: int,
                counts: np.ndarray | None = None) -> list[np.ndarray]:
    """Noisy copies of each client's clean ``labels`` (one array per client, order kept), drawn row by row from
    :func:`transition_matrix`; ``counts`` as there. Seeded: one generator for the whole split, clients in order."""
    t = transition_matrix(kind, rate, num_classes, counts)
    cum = np.cumsum(t, axis=1)
    cum[:, -1] = 1.0  # guard against rounding: every draw lands in a class
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), LABEL_NOISE]))
    out = []
    for y in labels:
        y = np.asarray(y, dtype=np.int64)
        u = rng.random(len(y))
        noisy = (u[:, None] >= cum[y]).sum(axis=1).astype(np.int64)
        out.append(np.minimum(noisy, num_classes - 1))
    return out


def noise_report(clean: list[np.ndarray], noisy: list[np.ndarray], num_classes: int, kind: str, rate: float,
                 counts: np.ndarray | None = None) -> dict:
    """What ``partition.json`` records: the request, the per-client and overall realised noise rates, and the
    requested and realised transition matrices (realised: row-normalised clean x noisy counts over all clients;
    ``transition_counts`` the raw counts)."""
    k = int(num_classes)
    joint = np.zeros((k, k), dtype=np.int64)
    rates = []
    for y, z in zip(clean, noisy, strict=True):
        np.add.at(joint, (np.asarray(y, dtype=np.int64), np.asarray(z, dtype=np.int64)), 1)
        rates.append(float(np.mean(np.asarray(y) != np.asarray(z))) if len(y) else 0.0)
    rows = joint.sum(axis=1, keepdims=True)
    realised = np.divide(joint, rows, out=np.zeros((k, k)), where=rows > 0)
    total = int(joint.sum())
    report = {
        "kind": kind, "rate": float(rate),
        "realised_rate": float((total - np.trace(joint)) / total) if total else 0.0,
        "client_noise_rates": [round(r, 6) for r in rates],
        "client_flipped": [int(np.sum(np.asarray(y) != np.asarray(z))) for y, z in zip(clean, noisy, strict=True)],
        "transition_matrix_requested": np.round(transition_matrix(kind, rate, k, counts), 6).tolist(),
        "transition_matrix_realised": np.round(realised, 6).tolist(),
        "transition_counts": joint.tolist(),
    }
    if kind == "tail_to_head":
        head, tail = head_tail(np.ones(k) if counts is None else counts)
        report["head_classes"], report["tail_classes"] = head, tail
    return report
