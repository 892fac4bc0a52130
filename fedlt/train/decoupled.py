"""Decoupled classifier re-training on frozen features (``eval.decoupled``): extra personalized predictors logged
beside every strategy's own, which stays unchanged and primary (Kang et al., ICLR 2020, "Decoupling
Representation and Classifier for Long-Tailed Recognition"), plus feature-space SMOTE for the head.

At every evaluation each client takes its model as the strategy loaded it (``ctx.model``: the global arrays plus
its personal parts), computes the features ``model.features(x)`` of its own training images once (eval mode, no
augmentation, no gradient), and trains on them:

* ``crt`` (classifier re-training): a re-initialised linear head (PyTorch's default ``nn.Linear`` init, seeded),
  trained with class-aware sampling: classes visited in a shuffled cycle, ``samples_per_class`` consecutive
  samples of one class at a time from its own shuffled cycle, C * max n_c samples per epoch (the official
  ``ClassAwareSampler``, ``num_samples_cls`` = 4).
* ``lws`` (learnable weight scaling): the model's own head frozen, one scale per class s_c (initialised to 1)
  multiplying that class's logit (weight and bias), trained with the same class-aware sampling. With every
  s_c = 1 it is exactly the unchanged head.
* ``fsmote`` (feature SMOTE, when ``smote_ratio`` is set): a re-initialised head trained with uniform shuffles on
  the features plus synthetic ones: every class below ceil(smote_ratio * max n_c) is raised to it by SMOTE
  (Chawla et al., JAIR 2002) in feature space: a random sample of the class, one of its ``smote_k`` nearest
  same-class neighbours (sklearn ``NearestNeighbors``; imbalanced-learn is not a dependency), a point drawn
  uniformly on the segment between them. A class with a single sample gets copies of it (no segment exists).

Optimisation (each predictor): SGD with ``lr`` 0.2, momentum 0.9, weight decay 5e-4, cosine annealing to 0 over
the epochs, ``crt_epochs`` 10 (cRT, and ``fsmote``) / ``lws_epochs`` 5 (LWS), batches of ``batch_size`` 512:
the defaults of the official code, facebookresearch/classifier-balancing at commit 22370c6 (= HEAD f162ade for
these files): ``config/ImageNet_LT/cls_crt.yaml``, ``cls_lws.yaml``, ``models/DotProductClassifier.py`` (cRT
head re-initialised: ``run_networks.py`` ``load_model`` skips it), ``models/TauNormClassifier.py`` (LWS:
``fc`` frozen, ``scales`` = ones, logits * scales), ``data/ClassAwareSampler.py``.

Deviations, and why:
* Frozen features are computed once per evaluation in eval mode without augmentation; the official stage 2 runs
  the frozen backbone on augmented images in train mode (its BatchNorm uses batch statistics and updates its
  running ones). Here the backbone (and its BatchNorm statistics) stays exactly the client's, re-training costs
  one forward pass over the client's data, and training and test features come from the same network.
* The official cosine scheduler is stepped before each epoch, so its epochs run at t = 1..E (the last one at lr 0);
  here epoch e (0-based) uses lr * (1 + cos(pi e / E)) / 2.
* Only the classes the client holds are sampled (a client's data is all it has); the official sampler's classes
  are the data set's classes, all of which are present.
* tau-normalisation stays the generic ``eval.posthoc.norm_tau`` predictor (fedlt.eval.posthoc).
* No hyper-parameter is tuned, so no validation split is drawn (LWS and cRT have none to choose here).

**Generic (federated) cRT and LWS** (``generic/crt/*``, ``generic/lws/*``, also with ``eval.decoupled.enabled``).
Kang et al.'s stage 2 needs the training data, which only the clients hold, so the generic predictors are their
federated form, one FedAvg round of head-only training at every evaluation: every client (sampled or not), in its
evaluate step and before any of its predictors runs, computes the features of its training images with the
GLOBAL model (:func:`generic_uploads`) and trains (a) a cRT head from the SAME re-initialised head for every client
(seeded by (seed, round) only, so that the average is an average of one model's updates) and (b) LWS scales on the
global head starting from 1, both with the class-aware sampling, optimiser and epochs above (its own sampling
stream per client). It returns the head and the scales in its evaluate reply (``decoupled.*``); the server averages
them weighted by the clients' training sizes n_k (:func:`average_heads`, float64) and scores global backbone +
averaged cRT head, and global model x averaged scales, on the balanced test set beside the strategy's own generic
predictors, which stay unchanged and primary (logged like the post-hoc ones: ``generic/<name>/<metric>``).
Deviations from the centralised method: the head is trained in one federated round (each client on its own
classes, then averaged) rather than on the pooled data, so a class's row is trained only by the clients holding
it and pulled by all others' softmax; an LWS scale is the n_k-weighted mean of the clients' scales (clients without
the class included). Applies only where every client's features and head ARE the global ones: a strategy whose
personal state changes ``head(features(x))`` (FedPer, FedRep, FedBN, FedProto, local) gets no generic cRT/LWS,
and neither does a run with privacy (the heads are uploads besides the model update that no DP mechanism
covers); the run logs the reason once (:func:`generic_problem`). Uploads besides weights: a d x K head, its bias
and K scales per client per evaluation round, trained on the client's data (a function of its features and label
histogram). Cost per client and evaluation: one more forward pass over its training data, one more cRT and LWS
training on features.

The model must be a backbone with ``features(x)`` followed by a plain linear ``head`` (``model(x) ==
head(features(x))``); fedlt.validate refuses ``eval.decoupled`` for strategies whose model is not (FedETF,
FedLoGe, a cosine head, ...). Everything is seeded from (seed, round, client); nothing leaves the client."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.config import param
from fedlt.seeding import EVAL, torch_generator

CRT, LWS, FSMOTE = "crt", "lws", "fsmote"
STREAM = 17  # the generator stream of the decoupled predictors (beside the client's own EVAL generator)
GENERIC_STREAM = 19  # the generic (federated) cRT/LWS: the common head init (seed, round), sampling per client
CRT_WEIGHT, CRT_BIAS, LWS_SCALES = "decoupled.crt.weight", "decoupled.crt.bias", "decoupled.lws.scales"
GENERIC_KEYS = (CRT_WEIGHT, CRT_BIAS, LWS_SCALES)  # what a client's evaluate reply carries for them


@dataclass(frozen=True)
class DecoupledParams:
    enabled: bool = param(False, "log crt and lws predictors (heads re-trained on frozen features) beside every "
                                 "strategy's own: personalized (each client's) and generic (their n_k-weighted "
                                 "average, federated)")
    crt_epochs: int = param(10, "epochs of cRT (and fsmote) head training (official ImageNet-LT cls_crt: 10)", lo=1)
    lws_epochs: int = param(5, "epochs of LWS scale training (official cls_lws: 5)", lo=1)
    lr: float = param(0.2, "SGD lr, cosine-annealed to 0 (official 0.2)", lo=0.0, lo_open=True)
    momentum: float = param(0.9, "SGD momentum (official 0.9)", lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = param(5e-4, "SGD weight decay (official 5e-4)", lo=0.0)
    batch_size: int = param(512, "batch size (official 512)", lo=1)
    samples_per_class: int = param(4, "class-aware sampling: consecutive samples per visited class (official "
                                      "num_samples_cls 4)", lo=1)
    smote_ratio: float | None = param(None, "feature SMOTE predictor fsmote: classes raised to ceil(ratio * max n_c) "
                                            "by SMOTE on features; null = off", lo=0.0, hi=1.0, lo_open=True)
    smote_k: int = param(5, "SMOTE: nearest same-class neighbours to interpolate with (SMOTE's k = 5)", lo=1)


def options(cfg: dict) -> DecoupledParams | None:
    """``eval.decoupled`` when enabled, else None (a config without it -- older run directories -- is off)."""
    node = ((cfg or {}).get("eval") or {}).get("decoupled") or {}
    return DecoupledParams(**node) if node.get("enabled") else None


def applies(model: nn.Module) -> bool:
    """A backbone with ``features`` and a plain linear ``head`` (the check of fedlt.validate adds that
    ``model(x) == head(features(x))``)."""
    return callable(getattr(model, "features", None)) and type(getattr(model, "head", None)) is nn.Linear


def model_check(model: nn.Module, in_shape: tuple[int, ...]) -> str:
    """Why ``eval.decoupled`` cannot use ``model`` ("" = it can): structure, then one forward pass."""
    if not callable(getattr(model, "features", None)):
        return f"its model ({type(model).__name__}) has no features(x) to re-train a classifier on"
    head = getattr(model, "head", None)
    if head is None:
        return f"its model ({type(model).__name__}) has no `head` to re-train or re-scale"
    if type(head) is not nn.Linear:
        return (f"its classifier is not a plain linear head (model.head is {type(head).__name__}), so there is no "
                f"head to re-train or re-scale")
    model = model.eval()
    with torch.no_grad():
        x = torch.randn(2, *in_shape, generator=torch.Generator().manual_seed(0))
        if not torch.allclose(model(x), head(model.features(x)), atol=1e-5):
            return "its predictions are not head(features(x)) (the head is not the whole classifier)"
    return ""


# ------------------------------------------------------------------------------------------ features
@torch.no_grad()
def train_features(model: nn.Module, data, device: str = "cpu", batch_size: int = 512
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.features`` of the client's training images (normalised, not augmented), eval mode; on the CPU."""
    model.eval()
    out = []
    for start in range(0, data.num_train, batch_size):
        x = data.normalise(data.train_x[start : start + batch_size]).to(device)
        out.append(model.features(x).float().cpu())
    return torch.cat(out), data.train_y.long().clone()


# -------------------------------------------------------------------------------------------- sampling
class RandomCycle:
    """Endless shuffled passes over ``items`` (reshuffled at every wrap), as the official ``RandomCycleIter``."""

    def __init__(self, items: torch.Tensor, generator: torch.Generator):
        self.items, self.g = items, generator
        self.order, self.i = items, len(items)

    def take(self, m: int) -> torch.Tensor:
        """The next ``m`` items of the cycle."""
        out = []
        while m > 0:
            if self.i >= len(self.items):
                self.order, self.i = self.items[torch.randperm(len(self.items), generator=self.g)], 0
            k = min(m, len(self.items) - self.i)
            out.append(self.order[self.i : self.i + k])
            self.i, m = self.i + k, m - k
        return torch.cat(out) if out else self.items[:0]


def class_aware(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> Callable[[], torch.Tensor]:
    """A function drawing one epoch of class-aware sampling: C * max n_c indices, in groups of ``per_class``
    consecutive samples of one class (the class of each group from a shuffled cycle over the held classes, its
    samples from the class's own shuffled cycle); the cycles persist across epochs."""
    counts = torch.bincount(labels)
    held = torch.nonzero(counts > 0).flatten()
    classes = RandomCycle(held, generator)
    members = {int(c): RandomCycle(torch.nonzero(labels == c).flatten(), generator) for c in held}
    length = int(held.numel() * counts.max())
    groups = -(-length // per_class)

    def epoch() -> torch.Tensor:
        seq = classes.take(groups)
        out = torch.empty(groups, per_class, dtype=torch.long)
        for c, cycle in members.items():
            rows = seq == c
            out[rows] = cycle.take(int(rows.sum()) * per_class).view(-1, per_class)
        return out.flatten()[:length]

    return epoch


def shuffled(n: int, generator: torch.Generator) -> Callable[[], torch.Tensor]:
    return lambda: torch.randperm(n, generator=generator)


# -------------------------------------------------------------------------------------------- training
def fit(params: list[torch.Tensor], logits: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor,
        labels: torch.Tensor, epochs: int, draw: Callable[[], torch.Tensor], p: DecoupledParams) -> None:
    """SGD with cosine-annealed lr on ``params``: cross-entropy of ``logits(features)`` over ``epochs`` epochs."""
    opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    for e in range(epochs):
        for group in opt.param_groups:
            group["lr"] = p.lr * (1.0 + math.cos(math.pi * e / epochs)) / 2.0
        order = draw()
        for start in range(0, order.numel(), p.batch_size):
            idx = order[start : start + p.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(logits(feats[idx]), labels[idx]).backward()
            opt.step()


def fresh_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear``'s default initialisation (U(-1/sqrt(d), 1/sqrt(d)) for weight and bias), seeded."""
    head = nn.Linear(dim, num_classes)
    bound = 1.0 / math.sqrt(dim)
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)
    return head


def crt_head(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, p: DecoupledParams,
             generator: torch.Generator) -> nn.Linear:
    """cRT: a re-initialised linear head trained with class-aware sampling on frozen features."""
    head = fresh_head(feats.shape[1], num_classes, generator)
    fit(list(head.parameters()), head, feats, labels, p.crt_epochs,
        class_aware(labels, p.samples_per_class, generator), p)
    return head.eval()


def lws_scales(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, p: DecoupledParams,
               generator: torch.Generator, epochs: int | None = None) -> torch.Tensor:
    """LWS: one scale per class on the frozen head's logits (weight and bias), trained with class-aware sampling;
    ``epochs=0`` leaves every scale at 1."""
    weight, bias = head.weight.detach().float().cpu(), head.bias.detach().float().cpu()
    scales = torch.ones(weight.shape[0], requires_grad=True)
    n = p.lws_epochs if epochs is None else epochs
    if n > 0:
        fit([scales], lambda f: F.linear(f, weight, bias) * scales, feats, labels, n,
            class_aware(labels, p.samples_per_class, generator), p)
    return scales.detach()


def smote(feats: torch.Tensor, labels: torch.Tensor, ratio: float, k: int, generator: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feature-space SMOTE: every class below ceil(ratio * max n_c) raised to it with synthetic points on segments
    between a sample and one of its k nearest same-class neighbours. Returns (features, labels) of the real and
    synthetic points together, and for each synthetic point the (base, neighbour) indices it was drawn between."""
    from sklearn.neighbors import NearestNeighbors

    counts = torch.bincount(labels)
    target = math.ceil(ratio * int(counts.max()) - 1e-9)
    new_x, new_y, pairs = [feats], [labels], []
    for c in torch.nonzero(counts > 0).flatten().tolist():
        need = target - int(counts[c])
        if need <= 0:
            continue
        idx = torch.nonzero(labels == c).flatten()
        base = idx[torch.randint(idx.numel(), (need,), generator=generator)]
        if idx.numel() == 1:
            nbr = base.clone()  # one sample: no segment, copies
        else:
            kk = min(k, idx.numel() - 1)
            x = feats[idx].double().numpy()
            _, nn_idx = NearestNeighbors(n_neighbors=kk + 1).fit(x).kneighbors(x)
            own = torch.from_numpy(np.asarray(nn_idx[:, 1:], dtype=np.int64))  # column 0: the point itself
            pos = torch.searchsorted(idx, base)
            pick = own[pos, torch.randint(kk, (need,), generator=generator)]
            nbr = idx[pick]
        lam = torch.rand(need, 1, generator=generator)
        new_x.append(feats[base] + lam * (feats[nbr] - feats[base]))
        new_y.append(torch.full((need,), c, dtype=labels.dtype))
        pairs.append(torch.stack([base, nbr], 1))
    pairs_t = torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long)
    return torch.cat(new_x), torch.cat(new_y), pairs_t


def smote_head(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, p: DecoupledParams,
               generator: torch.Generator) -> nn.Linear:
    """A re-initialised head trained with uniform shuffles on the SMOTE-augmented features."""
    x, y, _ = smote(feats, labels, float(p.smote_ratio), p.smote_k, generator)
    head = fresh_head(feats.shape[1], num_classes, generator)
    fit(list(head.parameters()), head, x, y, p.crt_epochs, shuffled(len(y), generator), p)
    return head.eval()


# ------------------------------------------------------------------------------------------ predictors
def lws_predictor(model: nn.Module, scales: torch.Tensor):
    """``x -> head(features(x)) * s`` (weight and bias scaled per class, as the official ``logits * scales``)."""
    return lambda x: model.head(model.features(x)) * scales.to(x.device)


def decoupled_predictors(model: nn.Module, data, cfg: dict, round: int, device: str = "cpu") -> dict:
    """``crt``, ``lws`` (and ``fsmote``) for a client whose model is ``model``, when ``eval.decoupled`` is on."""
    p = options(cfg)
    if p is None or data.num_train == 0:
        return {}
    if not applies(model):
        raise ValueError(f"eval.decoupled: {type(model).__name__} has no features(x) + linear head")
    g = torch_generator(int(cfg["seed"]), EVAL, int(round), int(data.client_id), STREAM)
    feats, labels = train_features(model, data, device, int(cfg["eval"].get("batch_size", 512)))
    k = int(data.plan.num_classes)
    with torch.enable_grad():
        heads = {CRT: crt_head(feats, labels, k, p, g).to(device)}
        scales = lws_scales(model.head, feats, labels, p, g).to(device)
        if p.smote_ratio is not None:
            heads[FSMOTE] = smote_head(feats, labels, k, p, g).to(device)
    out = {}
    out[CRT] = lambda x, h=heads[CRT]: h(model.features(x))
    out[LWS] = lws_predictor(model, scales)
    if FSMOTE in heads:
        out[FSMOTE] = lambda x, h=heads[FSMOTE]: h(model.features(x))
    return out


# ----------------------------------------------------------------------------- generic (federated) cRT/LWS
def generic_problem(cfg: dict, model: nn.Module, is_personal: Callable[[str], bool], x: torch.Tensor) -> str:
    """Why the generic (federated) cRT/LWS cannot run ("" = they can): privacy on, no linear head, or personal
    state that changes ``head(features(x))`` (each personal floating-point entry of a copy of ``model`` is
    perturbed and the outputs on ``x``, a few test images, compared)."""
    node = (cfg or {}).get("privacy") or {}
    privacy = str(node.get("name", "none"))
    if privacy != "none" or node.get("secagg"):
        what = f"privacy={privacy}" if privacy != "none" else "privacy.secagg=true"
        return (f"{what}: the clients' heads would be uploads besides the model update, in the clear, that the "
                f"privacy mechanism does not cover")
    if not applies(model):
        return f"{type(model).__name__} has no features(x) followed by a linear head"
    probe = copy.deepcopy(model).eval()
    personal = [k for k, v in probe.state_dict().items() if is_personal(k) and v.is_floating_point()]
    if not personal:
        return ""
    x = x[:2].to(next(probe.parameters()).device)
    with torch.no_grad():
        before = probe.head(probe.features(x))
        state = probe.state_dict()
        g = torch.Generator().manual_seed(0)
        for k in personal:
            state[k].add_(torch.rand(state[k].shape, generator=g).to(state[k].device) + 0.5)
        after = probe.head(probe.features(x))
    if not torch.allclose(before, after):
        return (f"the clients' personal state ({', '.join(personal[:3])}{', ...' if len(personal) > 3 else ''}) "
                f"changes head(features(x)), so there is no global backbone + head to re-train")
    return ""


def generic_uploads(model: nn.Module, data, cfg: dict, round: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A client's part of the generic cRT/LWS (module docstring): from ``model`` (the global one), the cRT head
    trained from the round's common re-initialisation and the LWS scales of the global head; ``model`` is left
    as it was (weights and train/eval mode)."""
    p = options(cfg)
    seed, cid = int(cfg["seed"]), int(data.client_id)
    was_training = model.training
    feats, labels = train_features(model, data, device, int(cfg["eval"].get("batch_size", 512)))
    model.train(was_training)
    g = torch_generator(seed, EVAL, int(round), cid, GENERIC_STREAM)
    with torch.enable_grad():
        head = fresh_head(feats.shape[1], int(data.plan.num_classes), torch_generator(seed, EVAL, int(round),
                                                                                      GENERIC_STREAM))
        fit(list(head.parameters()), head, feats, labels, p.crt_epochs, class_aware(labels, p.samples_per_class, g),
            p)
        scales = lws_scales(model.head, feats, labels, p, g)
    return {CRT_WEIGHT: head.weight.detach().clone(), CRT_BIAS: head.bias.detach().clone(), LWS_SCALES: scales}


def average_heads(uploads: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """The n_k-weighted mean (float64, returned as float32) of the clients' ``(uploads, n_k)``; {} for none."""
    uploads = [(u, float(n)) for u, n in uploads if n > 0]
    total = sum(n for _, n in uploads)
    if not uploads:
        return {}
    return {k: (sum(u[k].double() * n for u, n in uploads) / total).float() for k in GENERIC_KEYS}


def generic_predictors(model: nn.Module, heads: dict[str, torch.Tensor]) -> dict:
    """``crt`` (global backbone + averaged cRT head) and ``lws`` (global model x averaged scales)."""
    weight, bias, scales = heads[CRT_WEIGHT], heads[CRT_BIAS], heads[LWS_SCALES]
    return {CRT: lambda x: F.linear(model.features(x), weight.to(x.device), bias.to(x.device)),
            LWS: lws_predictor(model, scales)}
