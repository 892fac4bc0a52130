"""The ``privacy:`` config group as typed sections (``configs/privacy/<name>.yaml`` holds the same defaults): one
dataclass of :func:`fedlt.config.param` fields per mode, checked by :mod:`fedlt.validate` with ``check_params``.

No dependency beyond :mod:`fedlt.config`: the client step imports :func:`enabled` on every message."""

from __future__ import annotations

from dataclasses import dataclass

from fedlt.config import param

NONE, CENTRAL, LOCAL, DPSGD = "none", "dp_central", "dp_local", "dp_sgd"
SAMPLINGS = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "pld")
ON_BUDGET = ("calibrate", "stop")
BN_STATS = ("clip", "unprotected")
_BN_DOC = ("floating-point buffers (BatchNorm running statistics): clip = part of the clipped, noised update "
           "(protected; they can dominate its norm); unprotected = left out of the update and averaged in the clear "
           "(NOT covered by epsilon; recorded in results.json)")


@dataclass(frozen=True)
class NoPrivacy:
    """``privacy=none``: nothing is clipped or noised; the run is exactly the run without a privacy group."""


@dataclass(frozen=True)
class CentralParams:
    """``privacy=dp_central``: DP-FedAvg with a trusted server (McMahan et al. 2018; adaptive clipping: Andrew et
    al. 2021)."""

    clip_norm: float = param(1.0, "C: every client's update (all floating-point shared arrays, BatchNorm statistics "
                                  "included) is clipped to L2 norm C; with adaptive_clipping the initial C",
                             lo=0.0, lo_open=True)
    noise_multiplier: float = param(1.0, "z: the server adds N(0, (z*C)^2) to the SUM of clipped updates (with "
                                         "adaptive clipping, z is the effective multiplier of both noised sums); "
                                         "replaced by the calibrated value when target_epsilon is set with "
                                         "on_budget=calibrate", lo=0.0)
    delta: float = param(1.0e-5, "the delta of the reported (epsilon, delta); keep it below 1/num_clients",
                         lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    target_epsilon: float | None = param(None, "null: report epsilon only; a number: the privacy budget (see "
                                               "on_budget)", lo=0.0, lo_open=True)
    on_budget: str = param("calibrate", "with target_epsilon: calibrate = choose z so that num_rounds rounds spend "
                                        "at most the budget; stop = keep noise_multiplier and end the run (with a "
                                        "checkpoint) after the last round the budget affords", choices=ON_BUDGET)
    sampling: str = param("poisson", "client sampling the accountant assumes: poisson = each client independently "
                                     "with probability participation (add/remove-one neighbours); fixed = "
                                     "max(int(participation*N), 1) clients without replacement (replace-one "
                                     "neighbours)", choices=SAMPLINGS)
    accountant: str = param("rdp", "dp-accounting's RdpAccountant or PLDAccountant (pld: poisson sampling only)",
                            choices=ACCOUNTANTS)
    adaptive_clipping: bool = param(False, "track a quantile of the update norms with a noised count (Andrew et "
                                           "al. 2021, geometric update); its privacy cost is in the accounting")
    target_unclipped_quantile: float = param(0.5, "adaptive: the fraction of updates that should stay unclipped "
                                                  "(the paper: 0.5, the median)", lo=0.0, hi=1.0)
    clip_learning_rate: float = param(0.2, "adaptive: eta_C of C <- C*exp(-eta_C*(unclipped_fraction - quantile)) "
                                           "(the paper: 0.2)", lo=0.0, lo_open=True)
    clipped_count_stddev: float | None = param(None, "adaptive: sigma_b, the std of the noise on the count of "
                                                     "unclipped updates; null = expected clients per round / 20 "
                                                     "(the paper's recommendation)", lo=0.0, lo_open=True)
    batchnorm_stats: str = param("clip", _BN_DOC, choices=BN_STATS)


@dataclass(frozen=True)
class LocalParams:
    """``privacy=dp_local``: each client clips its update and adds Gaussian noise before the update leaves it, as
    Flower's ``LocalDpMod`` (noise std = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon on every entry)."""

    clip_norm: float = param(1.0, "C: the client's update is clipped to L2 norm C before the noise is added",
                             lo=0.0, lo_open=True)
    epsilon: float = param(1.0, "the epsilon of ONE upload (the classic Gaussian-mechanism calibration that "
                                "Flower's LocalDpMod uses, valid for epsilon < 1)", lo=0.0, lo_open=True)
    delta: float = param(1.0e-5, "the delta of one upload and of the composed (epsilon, delta)",
                         lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    sensitivity: float | None = param(None, "L2 sensitivity of one upload; null = 2*clip_norm (any two clipped "
                                            "updates of a client differ by at most 2C)", lo=0.0, lo_open=True)
    accountant: str = param("rdp", "accountant that composes a client's uploads over the rounds it took part in",
                            choices=ACCOUNTANTS)
    batchnorm_stats: str = param("clip", _BN_DOC, choices=BN_STATS)


@dataclass(frozen=True)
class DpSgdParams:
    """``privacy=dp_sgd``: sample-level DP inside every client (DP-SGD, Abadi et al. 2016, as Opacus implements
    it): Poisson-sampled batches, every per-sample gradient clipped to ``clip_norm``, Gaussian noise of std
    noise_multiplier * clip_norm on their sum, divided by the expected batch size (:mod:`fedlt.privacy.dp_sgd`).
    One client's (epsilon, delta) is for adding or removing one of ITS training samples."""

    clip_norm: float = param(1.0, "C: every per-sample gradient (all trained parameters together) is clipped to "
                                  "L2 norm C", lo=0.0, lo_open=True)
    noise_multiplier: float = param(1.0, "sigma: N(0, (sigma*C)^2) is added to the sum of a batch's clipped "
                                         "gradients; replaced by each client's calibrated value when target_epsilon "
                                         "is set", lo=0.0)
    delta: float = param(1.0e-5, "the delta of every client's (epsilon, delta); keep it below 1/(client's "
                                 "training samples)", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    target_epsilon: float | None = param(None, "null: report each client's epsilon; a number: every client's sigma "
                                               "is calibrated so that training in ALL num_rounds rounds spends at "
                                               "most this epsilon (holds whoever is sampled)", lo=0.0, lo_open=True)
    physical_batch: int | None = param(None, "per-sample gradients are computed this many samples at a time "
                                             "(memory only; the result is the same); null = the whole batch", lo=1)


MODES = {NONE: NoPrivacy, CENTRAL: CentralParams, LOCAL: LocalParams, DPSGD: DpSgdParams}


def mode(cfg: dict) -> str:
    """The privacy mode of a run config (``none`` when the config has no privacy group, e.g. an old run)."""
    node = cfg.get("privacy") or {}
    return str(node.get("name", NONE)) if isinstance(node, dict) else NONE


def enabled(cfg: dict) -> bool:
    return mode(cfg) != NONE
