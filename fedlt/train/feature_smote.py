"""Feature-space SMOTE inside the local SGD step (``feature_smote.ratio``): the head's loss of every local batch
sees the client's tail classes raised to a ratio of the batch's largest class by synthetic backbone features.

SMOTE (Chawla, Bowyer, Hall & Kegelmeyer, JAIR 2002) creates a minority sample on the segment between a sample of
the class and one of its k nearest same-class neighbours, x + lambda (x_nn - x), lambda ~ U[0, 1). DeepSMOTE
(Dablain, Krawczyk & Chawla, IEEE TNNLS 2022) applies the same rule to the codes of a trained encoder and decodes
the new codes into images; here, as in the feature-space (classifier-level) variants, the new points are features
of the strategy's own backbone and go straight to its linear head, with no decoder.

What one local step does (``smote_step``, a ``step(x, y)`` callback of :func:`fedlt.train.local.run_local_epochs`,
used by :meth:`fedlt.api.client.ClientAlgorithm.local_epochs` when the option is on):

1. h = model.features(x) on the real batch (train mode, with gradients, as without the option).
2. A per-class feature memory is updated: for every class c the client holds, the n_c most recent DETACHED
   features of class c seen in this local update (a ring buffer of the client's own count n_c; after one epoch of
   the default sampler it holds a feature of every class-c image, from at most one epoch ago). The memory starts
   empty at every local update (every round): features of an older backbone are never used.
3. Target t = ceil(ratio * max_c b_c), b_c the batch's real count of class c. Every class the client holds whose
   memory is not empty and with b_c < t gets t - b_c synthetic features, each by SMOTE inside the class's memory:
   a base drawn uniformly (with replacement), one of its min(k, m - 1) nearest neighbours in the memory (Euclidean,
   the base itself excluded) drawn uniformly, lambda ~ U[0, 1). A class with one remembered feature gets copies.
4. Two terms of the run's loss, one per part: the backbone's, loss_fn(head(h), y) on the real batch with the
   head's weights detached, and the head's, loss_fn(head([h; synthetic]), [y; synthetic labels]) with the features
   detached (+ the strategy's ``extra`` term). So the backbone gets exactly the gradient it gets without the option
   (over-sampling inside the batch mean would scale its gradient by b / (b + s), i.e. slow it down several-fold at
   ratio 1), and the head is trained on the augmented batch. ``train/loss`` is the backbone's term (the real batch's
   loss, comparable with runs without the option).

So, once a class has been seen in the round, every batch's head loss holds at least ratio x the batch's largest
class count of it (exactly that many when b_c < t); summed over an epoch, every held class reaches at least ratio
x the largest class's count. Before a class is first seen in a round (its first batch), it gets no synthetic
features.

What was checked: the generation rule against imbalanced-learn (scikit-learn-contrib/imbalanced-learn at commit
aae4f04, ``imblearn/over_sampling/_smote/base.py``: ``NearestNeighbors(k + 1)`` fitted on the class, the first
column (the point itself) dropped, (base, neighbour) pairs drawn uniformly, step U[0, 1), default k = 5) and
DeepSMOTE's official code (dd1github/DeepSMOTE at da01fb5, ``GenerateSamples.py`` ``G_SM1``: the same rule on
encoder codes, k = 5, bases uniform with replacement, every class raised to the largest class's count, i.e.
ratio 1). The k nearest neighbours are found with ``torch.cdist`` + ``topk`` on the training device (one call per
class and step; the test checks them against sklearn's ``NearestNeighbors``), not sklearn, so the step stays on
the GPU.

Deviations, and why: neighbours come from the per-class memory of recent features rather than from one fixed
feature set (the backbone changes every step; the memory is the current round's, as DOS, Ando & Huang 2017,
recomputes its embedding neighbours each epoch); the target is per batch (the head's loss is per batch); classes
are raised to a ratio of the batch's largest class, the ``sampling_strategy`` float of imbalanced-learn.

Needs a model ``model(x) == head(features(x))`` with a linear head trained by the strategy's ONE
``ClientAlgorithm.local_epochs`` call (the ``dp_sgd_ready`` rule); fedlt.validate refuses other strategies, a
cosine head, DP-SGD (a synthetic feature mixes two samples, so no per-sample gradient exists) and client batching
(its vectorised trainer has no step callback). Every draw uses a generator seeded from (seed, round, client) in its
own stream, so the batches drawn are exactly those of the same run without the option."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedlt.config import param
from fedlt.seeding import TRAIN, torch_generator

STREAM = 18  # the generator stream of feature SMOTE (beside the client's TRAIN generator)


@dataclass(frozen=True)
class FeatureSmoteParams:
    ratio: float | None = param(None, "raise every class the client holds to ceil(ratio * the batch's largest class "
                                      "count) in the head's loss with SMOTE features (0 < ratio <= 1; 1 = balanced); "
                                      "null = off", lo=0.0, hi=1.0, lo_open=True)
    k: int = param(5, "nearest same-class neighbours to interpolate with (SMOTE's k = 5)", lo=1)


def options(cfg: dict) -> FeatureSmoteParams | None:
    """``feature_smote`` when on (``ratio`` set), else None (a config without the section -- older run
    directories -- is off)."""
    node = (cfg or {}).get("feature_smote") or {}
    return FeatureSmoteParams(**node) if node.get("ratio") is not None else None


def generator(cfg: dict, rnd: int, client: int) -> torch.Generator:
    """Feature SMOTE's own stream of (seed, round, client): the client's batch draws stay untouched."""
    return torch_generator(int(cfg["seed"]), TRAIN, int(rnd), int(client), STREAM)


class FeatureMemory:
    """Per class c, the ``counts[c]`` most recent detached features of class c (a ring buffer)."""

    def __init__(self, counts: torch.Tensor):
        self.size = [int(n) for n in counts.tolist()]
        self.bank: dict[int, torch.Tensor] = {}
        self.filled = [0] * len(self.size)
        self.pos = [0] * len(self.size)

    def add(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        feats = feats.detach()
        for c in torch.unique(labels).tolist():
            size = self.size[c] if c < len(self.size) else 0
            if size <= 0:
                continue
            rows = feats[labels == c][-size:]
            if c not in self.bank:
                self.bank[c] = torch.empty(size, feats.shape[1], dtype=feats.dtype, device=feats.device)
            slots = (self.pos[c] + torch.arange(len(rows))) % size
            self.bank[c][slots.to(feats.device)] = rows
            self.pos[c] = (self.pos[c] + len(rows)) % size
            self.filled[c] = min(size, self.filled[c] + len(rows))

    def features(self, c: int) -> torch.Tensor:
        return self.bank[c][: self.filled[c]]


def nearest(pool: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """For each index in ``base``, its ``k`` nearest rows of ``pool`` (Euclidean, itself excluded), nearest first."""
    d = torch.cdist(pool[base].float(), pool.float())
    d[torch.arange(len(base), device=d.device), base.to(d.device)] = math.inf
    return d.topk(k, dim=1, largest=False).indices


def smote_points(pool: torch.Tensor, need: int, k: int, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``need`` SMOTE points inside ``pool`` (m x d): (points, base indices, neighbour indices)."""
    m = len(pool)
    base = torch.randint(m, (need,), generator=g)
    if m == 1:
        nbr = base.clone()  # one remembered feature: no segment, copies
    else:
        kk = min(k, m - 1)
        pick = torch.randint(kk, (need,), generator=g)
        nbr = nearest(pool, base.to(pool.device), kk).cpu()[torch.arange(need), pick]
    lam = torch.rand(need, 1, generator=g).to(device=pool.device, dtype=pool.dtype)
    b, n = base.to(pool.device), nbr.to(pool.device)
    return pool[b] + lam * (pool[n] - pool[b]), base, nbr


def synthesise(memory: FeatureMemory, labels: torch.Tensor, ratio: float, k: int, g: torch.Generator
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The synthetic features (and labels) that raise every remembered class of the batch ``labels`` to
    ceil(ratio * the batch's largest class count); (None, None) when none is needed."""
    batch = torch.bincount(labels.cpu(), minlength=len(memory.size))
    target = math.ceil(ratio * int(batch.max()) - 1e-9)
    xs, ys = [], []
    for c in range(len(memory.size)):
        need = target - int(batch[c])
        if need <= 0 or memory.filled[c] == 0:
            continue
        pts, _, _ = smote_points(memory.features(c), need, k, g)
        xs.append(pts)
        ys.append(torch.full((need,), c, dtype=labels.dtype, device=labels.device))
    if not xs:
        return None, None
    return torch.cat(xs), torch.cat(ys)


def smote_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn, counts: torch.Tensor,
               p: FeatureSmoteParams, g: torch.Generator, extra: Callable[[], torch.Tensor] | None = None
               ) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The local step with feature SMOTE (module docstring): the backbone's loss on the real batch, the head's on
    [features; SMOTE features]."""
    if not callable(getattr(model, "features", None)) or type(getattr(model, "head", None)) is not torch.nn.Linear:
        raise ValueError(f"feature_smote: {type(model).__name__} is not a backbone with features(x) followed by a "
                         f"linear head")
    memory = FeatureMemory(counts)
    ratio, k = float(p.ratio), int(p.k)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        h = model.features(x)
        memory.add(h, y)
        head = model.head
        # the backbone's loss: the real batch through the head's current weights (no gradient to the head)
        loss = loss_fn(F.linear(h, head.weight.detach(), None if head.bias is None else head.bias.detach()), y)
        sx, sy = synthesise(memory, y, ratio, k, g)
        hx, hy = (h.detach(), y) if sx is None else (torch.cat([h.detach(), sx.to(h.dtype)]), torch.cat([y, sy]))
        total = loss + loss_fn(head(hx), hy)  # the head's loss: real + SMOTE features (no gradient to the backbone)
        if extra is not None:
            total = total + extra()
        total.backward()
        optimizer.step()
        return loss.detach().item()

    return step
