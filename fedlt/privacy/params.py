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
class SecAggParams:
    """Secure aggregation, an option of every mode (:mod:`fedlt.privacy.secagg`): SecAgg+ (Bell et al. 2020) as
    Flower 1.42 implements it. Defaults: Flower's ``SecAggPlusWorkflow`` (clipping_range 8, quantization_range 2^22;
    modulus 2^32, fixed), the largest client instead of its max_weight 1000 (a client of 4,000 images would have its
    weighted update clipped at 8 / 4), and, for the two values Flower leaves to the user, its secure-aggregation
    example's num_shares=3, reconstruction_threshold=2 of 5 clients as fractions."""

    secagg: bool = param(False, "SecAgg+ secure aggregation: the server learns only the sum of the round's masked, "
                                "quantized client updates, never one client's update (with dp_central the server "
                                "adds its noise to that sum)")
    secagg_share_fraction: float = param(0.6, "each client secret-shares its keys with round(fraction x sampled "
                                              "clients) neighbours, itself included (made odd; all clients if that "
                                              "is <= 2; Flower's float num_shares); 1.0 = all clients (SecAgg)",
                                         lo=0.0, hi=1.0, lo_open=True)
    secagg_reconstruction_threshold: float = param(0.67, "fraction of a client's shares needed to rebuild its "
                                                         "secrets (Flower's float reconstruction_threshold; at least "
                                                         "2): higher = more privacy, fewer dropouts tolerated",
                                                   lo=0.0, hi=1.0, lo_open=True)
    secagg_clipping_range: float = param(8.0, "every entry of a client's weighted update is clipped to "
                                              "[-range, range] before quantization (Flower's clipping_range)",
                                         lo=0.0, lo_open=True)
    secagg_quantization_range: int = param(4194304, "entries are stochastically rounded to integers in [0, range] "
                                                    "(Flower's quantization_range, 2^22); clients per round x range "
                                                    "must stay below the modulus 2^32", lo=2, hi=2**31)
    secagg_max_weight: float | None = param(None, "a client's update is multiplied by its weight num_examples / "
                                                  "max_weight before quantization (Flower's max_weight, default 1000 "
                                                  "there); null = the largest client training set of the split, so "
                                                  "no weight exceeds 1 (dp_central: every weight is 1); a round's "
                                                  "weights must sum to less than 2^32 / quantization_range",
                                            lo=0.0, lo_open=True)


@dataclass(frozen=True)
class NoPrivacy(SecAggParams):
    """``privacy=none``: nothing is clipped or noised; the run is exactly the run without a privacy group (unless
    ``secagg=true``)."""


@dataclass(frozen=True)
class CentralParams(SecAggParams):
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
class LocalParams(SecAggParams):
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
class DpSgdParams(SecAggParams):
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


def secagg_enabled(cfg: dict) -> bool:
    """``privacy.secagg``: SecAgg+ secure aggregation (any mode; false when absent, e.g. an old run)."""
    node = cfg.get("privacy") or {}
    return isinstance(node, dict) and bool(node.get("secagg", False))
