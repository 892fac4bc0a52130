"""Client losses, selectable for any strategy with ``loss=NAME`` (configs/loss/). Each is built once per local
update on the client's per-class training ``counts`` (a float tensor, one entry per class; zero for classes the
client does not hold) and returns ``fn(logits, targets) -> scalar``.

Classes with zero local count never occur as targets; where a loss needs a per-class quantity that is undefined
for them (log n, n^(-1/4), effective numbers) they are *excluded* (log n = -inf, i.e. the class gets no
probability mass in the training softmax) or given a neutral value; each builder says which. Strategies whose
method is defined by a loss (FedRoD, FedETF: balanced softmax; FedLC: logit calibration) call the builders here.

Notation: n_c local counts, pi_c = n_c / sum(n), z logits, y targets.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _counts(counts: torch.Tensor | None, name: str) -> torch.Tensor:
    if counts is None:
        raise ValueError(f"loss {name!r} needs the client's per-class counts")
    return torch.as_tensor(counts, dtype=torch.float32)


def log_prior(counts: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """tau * log(n_c / sum n) per class, -inf for classes with no samples (and 0 everywhere when tau == 0, so
    that 0 * log 0 does not become NaN)."""
    n = _counts(counts, "log_prior")
    if tau == 0:
        return torch.zeros_like(n)
    out = torch.full_like(n, float("-inf"))
    present = n > 0
    out[present] = tau * torch.log(n[present] / n.sum())
    return out


def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al. (2019): w_c = (1 - beta) / (1 - beta^n_c), normalised so that the classes present sum to their
    number (beta = 0 gives 1 for every present class). Absent classes get weight 0 (they are never targets)."""
    n = _counts(counts, "class_balanced")
    present = n > 0
    w = torch.zeros_like(n)
    w[present] = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta), n[present])) if beta > 0 else 1.0
    if present.any():
        w[present] = w[present] / w[present].sum() * present.sum()
    return w


# ------------------------------------------------------------------------------------------------- losses
def cross_entropy(**_) -> LossFn:
    """Plain softmax cross-entropy."""
    return F.cross_entropy


def logit_adjustment(counts: torch.Tensor | None = None, tau: float = 1.0, **_) -> LossFn:
    """Logit-adjusted loss (Menon et al., 2021), loss form: CE(z + tau * log pi, y). Classes absent locally get
    -inf (excluded from the softmax). At test time the plain logits z are used."""
    adjust = log_prior(counts, float(tau))

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + adjust.to(logits.device), y)

    return loss


def balanced_softmax(counts: torch.Tensor | None = None, **_) -> LossFn:
    """Balanced softmax (Ren et al., 2020): CE(z + log n, y) -- identical to logit adjustment with tau = 1 (the
    constant log sum(n) cancels in the softmax). Used with local counts by FedRoD and FedETF."""
    return logit_adjustment(counts, tau=1.0)


def focal(counts: torch.Tensor | None = None, gamma: float = 2.0, weights: torch.Tensor | None = None,
          **_) -> LossFn:
    """Focal loss (Lin et al., 2017): -(1 - p_y)^gamma log p_y, averaged over the batch (optionally weighted
    per class, see ``class_balanced``). gamma = 0 is cross-entropy."""
    gamma = float(gamma)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp_y = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
        per_sample = -((1.0 - logp_y.exp()).clamp(min=0) ** gamma) * logp_y if gamma else -logp_y
        if weights is not None:
            per_sample = per_sample * weights.to(logits.device)[y]
        return per_sample.mean()

    return loss


def class_balanced(counts: torch.Tensor | None = None, beta: float = 0.999, base: str = "ce", gamma: float = 2.0,
                   **_) -> LossFn:
    """Class-balanced loss (Cui et al., 2019): the per-sample ``base`` loss (ce or focal) times the
    effective-number weight of its class, averaged over the batch (weights sum to the number of classes present,
    as in the paper)."""
    weights = effective_number_weights(counts, float(beta))
    return focal(gamma=float(gamma) if base == "focal" else 0.0, weights=weights)


def ldam_drw(counts: torch.Tensor | None = None, max_margin: float = 0.5, scale: float = 30.0,
             drw_start: float = 0.8, drw_beta: float = 0.9999, round: int | None = None,
             num_rounds: int | None = None, **_) -> LossFn:
    """LDAM (Cao et al., 2019) with deferred re-weighting: subtract the margin C / n_y^(1/4) from the true-class
    logit (C such that the largest margin over the classes present is ``max_margin``), scale the logits by
    ``scale`` and apply CE. Checked against the official code, kaidic/LDAM-DRW at commit
    2536330f2afdaa65618323cb5a5850efccce762a: ``losses.py`` (``LDAMLoss``: max_m 0.5, s 30) and ``cifar_train.py``.

    The logits must be cosines: the official code builds the model with ``use_norm=True`` whenever the loss is
    LDAM (``NormedLinear``, logits in [-1, 1]), and s = 30 is chosen for that range. On the raw logits of a
    linear head s = 30 makes the loss explode, so a run needs ``model.head=cosine`` (validate_loss refuses
    anything else).

    DRW: the official schedule switches the class weights on at ``epoch // 160`` (0-based epoch 160, i.e. the
    161st of 200 epochs). Here round r (1-based) is re-weighted when its 0-based index r - 1 >= drw_start *
    num_rounds, i.e. from round ceil(drw_start * num_rounds) + 1 on (161 of 200 for the official drw_start =
    0.8; round 18 of 21, since 0.8 * 21 = 16.8). Weighted rounds use effective-number class weights (beta
    ``drw_beta``) in the CE, normalised by the batch's total weight as ``F.cross_entropy(weight=...)`` does in
    the official code. drw_start >= 1 never re-weights.

    Deviations: the counts are the client's own (a federated client knows no others), and the margins and
    weights are computed over the classes the client holds (absent classes are never targets)."""
    n = _counts(counts, "ldam_drw")
    margins = ldam_margins(n, float(max_margin))
    weights = ldam_weights(n, float(drw_start), float(drw_beta), round, num_rounds)
    s = float(scale)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = margins.to(logits.device)[y]
        adjusted = logits - F.one_hot(y, logits.shape[1]).to(logits.dtype) * m[:, None]
        return F.cross_entropy(s * adjusted, y, weight=None if weights is None else weights.to(logits.device))

    return loss


def ldam_margins(n: torch.Tensor, max_margin: float) -> torch.Tensor:
    """LDAM's per-class margins C / n_c^(1/4), scaled so the largest over the classes present is ``max_margin``
    (0 for absent classes)."""
    present = n > 0
    margins = torch.zeros_like(n)
    margins[present] = n[present] ** -0.25
    if present.any():
        margins = margins * (max_margin / margins[present].max())
    return margins


def ldam_weights(n: torch.Tensor, drw_start: float, drw_beta: float, round: int | None,
                 num_rounds: int | None) -> torch.Tensor | None:
    """DRW's class weights for this round (None before the deferred re-weighting starts)."""
    drw = round is not None and num_rounds is not None and (round - 1) >= drw_start * num_rounds
    return effective_number_weights(n, drw_beta) if drw else None


def calibration_offsets(counts: torch.Tensor, tau: float) -> torch.Tensor:
    """FedLC's per-class offsets tau * n_c^(-1/4); +inf for classes with no samples (the limit of "the rarer
    the class, the larger the offset"), so those classes are excluded from the calibrated softmax. tau = 0
    gives no offsets. FL-bench (``src/client/fedlc.py``) counts an absent class as 1e-8 instead, i.e. an offset
    of 100 * tau, which leaves it a softmax weight of about e^-100: numerically the same exclusion. PFLlib
    (``system/flcore/servers/serverlc.py``) uses the counts summed over all clients, where pow(0, -1/4) = inf
    only for classes no client holds."""
    n = _counts(counts, "logit_calibration")
    if tau == 0:
        return torch.zeros_like(n)
    out = torch.full_like(n, float("inf"))
    present = n > 0
    out[present] = tau * n[present] ** -0.25
    return out


def logit_calibration(counts: torch.Tensor | None = None, tau: float = 1.0, **_) -> LossFn:
    """FedLC (Zhang et al., 2022) as FL-bench and PFLlib implement it: standard softmax CE on the calibrated
    logits z - tau * n^(-1/4). The paper's pairwise form drops the target class from the denominator; the
    FL-bench maintainer reports that training collapsed with it (note in FL-bench ``src/server/fedlc.py``), and
    neither library uses it. ``counts`` are the client's own unless the caller passes others (strategy=fedlc
    with ``strategy.counts=global``)."""
    offsets = calibration_offsets(counts, float(tau))

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits - offsets.to(logits.device), y)

    return loss


# ------------------------------------------------------------------------------- robust to noisy labels
def generalized_ce(q: float = 0.7, **_) -> LossFn:
    """Generalized cross-entropy L_q (Zhang & Sabuncu, NeurIPS 2018): (1 - p_y^q) / q, averaged over the
    batch; q -> 0 is cross-entropy (the limit is taken: q = 0 gives CE exactly), q = 1 is 1 - p_y (MAE up to the
    factor 2). q = 0.7 is the paper's value for its experiments. The paper's truncated variant (L_trunc, with
    periodic per-sample pruning) is not implemented. No official code was found (only third-party
    ports), so it is checked against the paper's formula and its two limits (tests/train/test_robust_losses.py)."""
    q = float(q)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp_y = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
        if q == 0:
            return (-logp_y).mean()
        return (-torch.expm1(q * logp_y) / q).mean()  # 1 - p_y^q = -expm1(q log p_y): exact for small q and p_y

    return loss


def symmetric_ce(alpha: float = 0.1, beta: float = 1.0, one_hot_floor: float = 1e-4, **_) -> LossFn:
    """Symmetric cross-entropy (Wang et al., ICCV 2019): alpha * CE + beta * RCE, with the reverse
    cross-entropy RCE = -sum_k p_k log q_k of the softmax p (clamped to [1e-7, 1]) against the one-hot label q clamped
    to [one_hot_floor, 1] (log 0 is undefined: it becomes A = log(one_hot_floor)); both terms averaged over the batch.
    For a one-hot label RCE = -A * (sum of the clamped p_k, k != y).

    Checked against the official code, HanxunH/SCELoss-Reproduce: ``loss.py`` at commit 6bfa56d (``SCELoss``: plain
    CE, the softmax clamped to [1e-7, 1], the one-hot clamped to min 1e-4) and ``train.py`` at 07b2adb (CIFAR-10:
    alpha 0.1, beta 1.0; CIFAR-100: alpha 6.0, beta 0.1). Defaults: the CIFAR-10 values and the code's 1e-4. Note:
    the paper states A = -4, while the code's clamp gives A = ln(1e-4) = -9.21; fedlt follows the code
    (one_hot_floor = e^-4 = 0.0183 gives the paper's A)."""
    alpha, beta = float(alpha), float(beta)
    a = math.log(float(one_hot_floor))

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, y)
        p = F.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
        rce = (-a * (p.sum(dim=1) - p.gather(1, y[:, None]).squeeze(1))).mean()  # log q_y = 0, log q_k = A
        return alpha * ce + beta * rce

    return loss


LOSSES: dict[str, Callable[..., LossFn]] = {
    "ce": cross_entropy,
    "balanced_softmax": balanced_softmax,
    "logit_adjustment": logit_adjustment,
    "focal": focal,
    "class_balanced": class_balanced,
    "ldam_drw": ldam_drw,
    "logit_calibration": logit_calibration,
    "gce": generalized_ce,
    "sce": symmetric_ce,
}

# Options a user may set per loss (what configs/loss/<name>.yaml defines); anything else is a config error.
_CONTEXT = ("counts", "round", "num_rounds", "weights")


def loss_options(name: str) -> tuple[str, ...]:
    params = inspect.signature(LOSSES[name]).parameters
    return tuple(p for p, v in params.items() if p not in _CONTEXT and v.kind is v.POSITIONAL_OR_KEYWORD)


def build_loss(cfg: dict | None, counts: torch.Tensor | None = None, round: int | None = None,
               num_rounds: int | None = None) -> LossFn:
    """The loss ``cfg["name"]`` with its options, on this client's counts (``round``/``num_rounds`` drive
    schedules such as DRW)."""
    cfg = dict(cfg or {"name": "ce"})
    name = cfg.pop("name", "ce")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](counts=counts, round=round, num_rounds=num_rounds, **cfg)


# ---------------------------------------------------------------------- vectorised form (client batching)
def loss_terms(cfg: dict | None, counts: torch.Tensor | None = None, round: int | None = None,
               num_rounds: int | None = None) -> dict[str, torch.Tensor]:
    """The loss ``cfg["name"]`` as per-client tensors for :func:`masked_loss`, the form the vectorised trainer
    of ``backend.client_batching`` stacks over clients and vmaps (``fedlt.core.cohort``): the same per-class
    quantities the builders above compute from the client's counts (the same helpers), as data instead of a
    closure. Which keys are present says which terms apply; it depends only on the config (and the round), so
    it is the same for every client of a round. Every loss in ``LOSSES`` has this form."""
    cfg = dict(cfg or {"name": "ce"})
    name = cfg.pop("name", "ce")
    t = lambda v: torch.tensor(float(v))  # noqa: E731
    if name == "ce":
        return {}
    if name in ("logit_adjustment", "balanced_softmax"):
        return {"offset": log_prior(counts, float(cfg.get("tau", 1.0)) if name == "logit_adjustment" else 1.0)}
    if name == "logit_calibration":
        return {"offset": -calibration_offsets(_counts(counts, name), float(cfg.get("tau", 1.0)))}
    if name in ("focal", "class_balanced"):
        gamma = float(cfg.get("gamma", 2.0))
        if name == "class_balanced" and cfg.get("base", "ce") != "focal":
            gamma = 0.0
        out = {"gamma": t(gamma)} if gamma else {}
        if name == "class_balanced":
            out["class_weight"] = effective_number_weights(counts, float(cfg.get("beta", 0.999)))
        return out
    if name == "ldam_drw":
        n = _counts(counts, name)
        out = {"margin": ldam_margins(n, float(cfg.get("max_margin", 0.5))), "scale": t(cfg.get("scale", 30.0))}
        weights = ldam_weights(n, float(cfg.get("drw_start", 0.8)), float(cfg.get("drw_beta", 0.9999)), round,
                               num_rounds)
        if weights is not None:  # F.cross_entropy(weight=w): sum_i w_y l_i / sum_i w_y
            out["class_weight"] = out["norm_weight"] = weights
        return out
    if name == "gce":
        q = float(cfg.get("q", 0.7))
        return {"q": t(q)} if q else {}
    if name == "sce":
        return {"sce_alpha": t(cfg.get("alpha", 0.1)), "sce_beta": t(cfg.get("beta", 1.0)),
                "sce_a": t(math.log(float(cfg.get("one_hot_floor", 1e-4))))}
    raise ValueError(f"loss {name!r} has no vectorised form (fedlt.train.losses.loss_terms)")


def masked_loss(terms: dict[str, torch.Tensor], logits: torch.Tensor, y: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
    """The loss of :func:`loss_terms` on a batch padded to a fixed size: ``weight`` is 1 for real samples and 0
    for padding, and the result equals the builder's loss on the real samples alone (up to float rounding).
    Written without data-dependent control flow, so it runs under ``torch.func.vmap`` over clients."""
    z = logits
    if "offset" in terms:
        z = z + terms["offset"]
    if "margin" in terms:
        one_hot = (y[:, None] == torch.arange(z.shape[-1], device=y.device)).to(z.dtype)  # F.one_hot: .item()
        z = terms["scale"] * (z - one_hot * terms["margin"][y][:, None])
    logp = F.log_softmax(z, dim=-1)
    logp_y = logp.gather(1, y[:, None]).squeeze(1)
    if "gamma" in terms:
        per = -((1.0 - logp_y.exp()).clamp(min=0) ** terms["gamma"]) * logp_y
    elif "q" in terms:
        per = -torch.expm1(terms["q"] * logp_y) / terms["q"]
    elif "sce_alpha" in terms:
        p = logp.exp().clamp(min=1e-7, max=1.0)
        rce = -terms["sce_a"] * (p.sum(dim=-1) - p.gather(1, y[:, None]).squeeze(1))
        per = terms["sce_alpha"] * -logp_y + terms["sce_beta"] * rce
    else:
        per = -logp_y
    w = weight.to(per.dtype)
    if "class_weight" in terms:
        per = per * terms["class_weight"][y]
    norm = w * terms["norm_weight"][y] if "norm_weight" in terms else w
    return (per * w).sum() / norm.sum()


# (lo, hi, lo_open, hi_open) of options whose range differs from the shared table in validate_loss
LOSS_BOUNDS = {"gce": {"q": (0.0, 1.0, False, False)},
               "sce": {"alpha": (0.0, None, False, False), "beta": (0.0, None, False, False),
                       "one_hot_floor": (0.0, 1.0, True, True)}}


def validate_loss(cfg: dict) -> None:
    """Config checks for the ``loss`` group (called by fedlt.config.validate)."""
    from fedlt.config import ConfigError, check_choice, check_float

    loss = cfg.get("loss") or {"name": "ce"}
    if not isinstance(loss, dict) or "name" not in loss:
        raise ConfigError(f"invalid value loss={loss!r}: choose a loss with loss=NAME, one of "
                          f"{', '.join(sorted(LOSSES))}.")
    name = check_choice(cfg, "loss.name", sorted(LOSSES))
    allowed = loss_options(name)
    unknown = sorted(set(loss) - {"name", *allowed})
    if unknown:
        raise ConfigError(f"invalid option loss.{unknown[0]} for loss={name}: its options are "
                          f"{', '.join(allowed) or 'none'}.")
    bounds = {"tau": (0.0, None, False, False), "gamma": (0.0, None, False, False),
              "beta": (0.0, 1.0, False, True), "drw_beta": (0.0, 1.0, False, True),
              "max_margin": (0.0, None, True, False), "scale": (0.0, None, True, False),
              "drw_start": (0.0, None, False, False)}
    bounds.update(LOSS_BOUNDS.get(name, {}))
    for key in allowed:
        if key in loss and key in bounds:
            lo, hi, lo_open, hi_open = bounds[key]
            check_float(cfg, f"loss.{key}", lo, hi, lo_open=lo_open, hi_open=hi_open)
    if "base" in loss:
        check_choice(cfg, "loss.base", ("ce", "focal"))
    if name == "ldam_drw":
        _check_cosine_head(cfg)


def _check_cosine_head(cfg: dict) -> None:
    """LDAM's scale s is meant for cosine logits in [-1, 1] (the official code always pairs LDAM with its
    ``NormedLinear`` classifier); on a linear head's raw logits s = 30 blows the loss up and nothing trains."""
    from fedlt.config import ConfigError, check_choice
    from fedlt.models import HEADS, head_name

    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    if "head" in model:
        check_choice(cfg, "model.head", HEADS)
    head = head_name(model)
    if head != "cosine":
        raise ConfigError(
            f"invalid combination loss=ldam_drw with model.head={head}: LDAM scales the logits by loss.scale "
            f"(official s = 30), which is meant for the cosine logits in [-1, 1] of a cosine classifier (the official "
            f"LDAM-DRW code always uses its NormedLinear head with LDAM); on the raw logits of a {head} head the loss "
            f"explodes and the model does not train. Add model.head=cosine (allowed heads: {', '.join(HEADS)}).")
