"""Post-hoc predictors (``eval.posthoc``): corrections applied at prediction time to a trained model, with no
retraining, logged as EXTRA predictors beside each strategy's own (which stay unchanged and primary).

* **Prior correction** (``<primary>+prior``, generic and personalized): argmax_c z_c - tau * log pi_c, i.e. the
  logits of the strategy's primary predictor shifted by the log class prior. tau = 1 divides the predicted class
  probabilities by the prior ("thresholding that compensates for prior class probabilities", Buda et al., Neural
  Networks 2018; the post-hoc logit adjustment of Menon et al., ICLR 2021, with their scaling tau). tau = 0 gives
  exactly the unchanged logits. Which prior: the global long-tailed training counts for the generic predictor (the
  counts that also define the head/mid/tail groups: the simulator's server knows the split; a deployed server
  would need the clients' label counts, as FedLC- or CReFF-style methods assume), the client's own training
  counts for its personalized predictor. Classes with no count (absent from a client's training data) get the
  prior of the rarest class present, so an unseen class is never boosted more than the rarest seen one (log 0
  would make it win every prediction). Note that subtracting the local prior targets a class-balanced error on
  the client: on local test sets drawn like its training data (``eval.local_test``) the plain accuracy may drop
  while balanced accuracy and tail accuracy rise -- that trade-off is what the extra predictor measures.
* **tau-normalisation** (``taunorm``, generic only): the head's class vectors rescaled w_c / |w_c|^norm_tau
  (Kang et al., ICLR 2020; official code facebookresearch/classifier-balancing at 22370c6, ``tau_norm.py``
  ``pnorm``). Only for a plain backbone + linear head model (``fedlt.models.Classifier``) whose head is shared
  (averaged by the server): personal or frozen heads have no global head to normalise. Kang et al. pick tau on
  a validation split; the server holds no training data, so here ``norm_tau`` is a FIXED value set in the config
  (never tuned on the test set), documented as such in results. The bias is kept (the official script scores
  without it), so norm_tau = 0 is exactly the unchanged head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.config import param

PRIOR_SUFFIX = "+prior"
TAUNORM = "taunorm"


@dataclass(frozen=True)
class PosthocParams:
    enabled: bool = param(False, "log post-hoc predictors beside every strategy's own (no retraining)")
    tau: float = param(1.0, "prior correction argmax z - tau*log(pi); 0 = unchanged", lo=0.0)
    norm_tau: float | None = param(None, "tau-normalisation w_c/|w_c|^norm_tau of a shared linear head (generic "
                                         "only); a fixed value, null = off", lo=0.0)


def options(cfg: dict) -> dict | None:
    """``eval.posthoc`` when enabled, else None (a config without it -- older run directories -- is off)."""
    node = ((cfg or {}).get("eval") or {}).get("posthoc") or {}
    return node if node.get("enabled") else None


def log_prior_for_correction(counts) -> torch.Tensor:
    """log(n_c / sum n), with classes of zero count given the smallest log prior of the classes present."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    present = n > 0
    if not present.any():
        return torch.zeros_like(n)
    out = torch.log(n.clamp(min=0) / n[present].sum())
    return torch.where(present, out, out[present].min())


def prior_corrected(fn, counts, tau: float):
    """The predictor ``x -> fn(x) - tau * log pi`` (tau = 0: exactly ``fn(x)``)."""
    shift = float(tau) * log_prior_for_correction(counts)

    def predict(x: torch.Tensor) -> torch.Tensor:
        z = fn(x)
        return z - shift.to(device=z.device, dtype=z.dtype)

    return predict


def with_prior_correction(predictors: dict, counts, cfg: dict) -> dict:
    """``predictors`` plus ``<primary>+prior`` when ``eval.posthoc`` is enabled and counts are known."""
    opts = options(cfg)
    if opts is None or counts is None or not predictors:
        return predictors
    name, fn = next(iter(predictors.items()))
    return {**predictors, f"{name}{PRIOR_SUFFIX}": prior_corrected(fn, counts, float(opts.get("tau", 1.0)))}


def tau_normalised(model: nn.Module, tau: float):
    """The predictor ``x -> features(x) . (w_c / |w_c|^tau) + b_c`` of a ``Classifier`` with a linear head."""
    head = model.head
    weight = head.weight.detach()
    scaled = weight / weight.norm(dim=1, keepdim=True).clamp(min=1e-12).pow(float(tau))
    bias = None if head.bias is None else head.bias.detach()

    def predict(x: torch.Tensor) -> torch.Tensor:
        return F.linear(model.features(x), scaled.to(x.device), None if bias is None else bias.to(x.device))

    return predict


def tau_norm_applies(model: nn.Module, head_shared: bool) -> bool:
    from fedlt.models import Classifier

    return head_shared and isinstance(model, Classifier) and type(model.head) is nn.Linear


def with_tau_norm(predictors: dict, model: nn.Module, cfg: dict, head_shared: bool) -> dict:
    """``predictors`` plus ``taunorm`` when ``eval.posthoc.norm_tau`` is set and the model has a shared linear
    head (silently absent otherwise: the run's results say which predictors exist)."""
    opts = options(cfg)
    if opts is None or opts.get("norm_tau") is None or not tau_norm_applies(model, head_shared):
        return predictors
    return {**predictors, TAUNORM: tau_normalised(model, float(opts["norm_tau"]))}
