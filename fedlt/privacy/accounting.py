"""(epsilon, delta) from Google's ``dp-accounting`` library: the events of one run and their composition.

Central DP (DP-FedAvg): one round releases the noised sum of the sampled clients' clipped updates, a sampled
Gaussian mechanism.

* ``sampling=poisson``: every client is in the round independently with probability q = participation. The
  neighbouring relation is add/remove-one client; one client moves the sum by at most C, so the Gaussian's
  noise multiplier is z = std / C. Event: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` (RDP or PLD).
* ``sampling=fixed``: m clients drawn without replacement. dp-accounting handles this only under the
  replace-one relation (N is public; Wang, Balle and Kasiviswanathan 2019, Theorem 27), where one client swapped
  for another moves the sum by up to 2C: the Gaussian's multiplier with respect to that sensitivity is z / 2.
  Event: ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`` (RDP only).

``rounds`` such events compose (``SelfComposedDpEvent``). With adaptive clipping the second query (the noised
count of unclipped updates) is folded into the effective z (see :mod:`fedlt.privacy.server`).

Sample-level DP-SGD (``privacy=dp_sgd``): every local step of client k is a Poisson-subsampled Gaussian over its
own samples (rate q_k, multiplier sigma_k), so its steps compose exactly like Poisson-sampled rounds above
(:func:`dp_sgd_epsilon`).

Local DP: every upload of a client is a Gaussian mechanism with multiplier std / sensitivity; a client's uploads
compose over the rounds it took part in (no amplification: the server sees who sent what).

Everything here is a pure function of its arguments, so a resumed run recomputes the same epsilon from the
checkpointed (z, rounds, participations)."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from functools import lru_cache

import dp_accounting
from dp_accounting import NeighboringRelation
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from fedlt.privacy.clipping import local_noise_std  # noqa: F401 -- the local calibration, re-exported

POISSON, FIXED = "poisson", "fixed"


@contextmanager
def quiet():
    """dp-accounting logs (through absl) every fractional RDP order whose series does not converge; the order is
    then left out of the minimum, which only makes epsilon larger (safe). Not a message for the user."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def relation(sampling: str) -> NeighboringRelation:
    return NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == POISSON else NeighboringRelation.REPLACE_ONE


def fresh_accountant(kind: str, sampling: str = POISSON) -> dp_accounting.PrivacyAccountant:
    if kind == "pld":
        if sampling != POISSON:
            raise ValueError("the PLD accountant supports Poisson sampling only; use accountant=rdp with "
                             "sampling=fixed")
        return dp_accounting.pld.PLDAccountant(relation(sampling))
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation(sampling))


def round_event(z: float, sampling: str, num_clients: int, sample_size: int, q: float) -> dp_accounting.DpEvent:
    """One round of central DP-FedAvg (see the module docstring for the sensitivity under each relation)."""
    if sampling == POISSON:
        return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, sample_size,
                                                          dp_accounting.GaussianDpEvent(z / 2))


@lru_cache(maxsize=256)
def _round_rdp(z: float, sampling: str, num_clients: int, sample_size: int, q: float):
    """dp-accounting's RDP curve (orders, values) of ONE round; r rounds compose to r times it, exactly what
    ``RdpAccountant.compose(event, r)`` computes, without recomputing the curve every round."""
    accountant = fresh_accountant("rdp", sampling)
    with quiet():
        accountant.compose(round_event(z, sampling, num_clients, sample_size, q))
    return accountant._orders, accountant._rdp.copy()  # noqa: SLF001 -- the accountant's own curve


@lru_cache(maxsize=4096)
def central_epsilon(z: float, rounds: int, delta: float, sampling: str, num_clients: int, sample_size: int,
                    q: float, kind: str = "rdp") -> float:
    """epsilon after ``rounds`` rounds of noise multiplier ``z`` (0 rounds: 0; z = 0: infinite). RDP: the curve
    of one round times ``rounds`` (cheap every round); PLD: the self-composed event (about a second a call)."""
    if rounds <= 0:
        return 0.0
    if z <= 0:
        return math.inf
    if kind == "rdp":
        orders, rdp = _round_rdp(z, sampling, num_clients, sample_size, q)
        return float(compute_epsilon(orders, rounds * rdp, delta)[0])
    event = dp_accounting.SelfComposedDpEvent(round_event(z, sampling, num_clients, sample_size, q), rounds)
    return float(fresh_accountant(kind, sampling).compose(event).get_epsilon(delta))


def calibrate_noise(target_epsilon: float, rounds: int, delta: float, sampling: str, num_clients: int,
                    sample_size: int, q: float, kind: str = "rdp") -> float:
    """The smallest z (within dp-accounting's tolerance) whose ``rounds`` rounds spend at most ``target_epsilon``
    (``dp_accounting.calibrate_dp_mechanism``, which guarantees epsilon <= target)."""
    def gap(z: float) -> float:
        return central_epsilon(z, rounds, delta, sampling, num_clients, sample_size, q, kind) - target_epsilon

    hi = 1.0
    while gap(hi) > 0:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon} in {rounds} rounds")
    lo = hi / 2
    while gap(lo) <= 0:  # the bracket's lower end must be over budget (and finite)
        lo /= 2
        if lo < 1e-4:
            return lo  # almost no noise is needed
    with quiet():
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: fresh_accountant(kind, sampling),
            lambda z: dp_accounting.SelfComposedDpEvent(round_event(z, sampling, num_clients, sample_size, q),
                                                        rounds),
            target_epsilon, delta, dp_accounting.ExplicitBracketInterval(lo, hi)))


@lru_cache(maxsize=4096)
def local_epsilon(multiplier: float, uploads: int, delta: float, kind: str = "rdp") -> float:
    """epsilon of a client after ``uploads`` Gaussian uploads of noise multiplier std/sensitivity."""
    if uploads <= 0:
        return 0.0
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(multiplier), uploads)
    with quiet():
        return float(fresh_accountant(kind).compose(event).get_epsilon(delta))


def dp_sgd_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Sample-level DP-SGD (``privacy=dp_sgd``): epsilon of one client after ``steps`` local steps, each a
    Poisson-subsampled Gaussian (rate q, noise multiplier sigma = noise std / clip norm) under add/remove-one
    sample: ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``, RDP. The same
    event as one round of Poisson-sampled DP-FedAvg, so :func:`central_epsilon` computes it."""
    return central_epsilon(float(sigma), int(steps), float(delta), POISSON, 0, 0, float(q), "rdp")


def calibrate_dp_sgd(target_epsilon: float, q: float, steps: int, delta: float) -> float:
    """The smallest sigma whose ``steps`` DP-SGD steps at rate q spend at most ``target_epsilon`` (RDP)."""
    return calibrate_noise(float(target_epsilon), int(steps), float(delta), POISSON, 0, 0, float(q), "rdp")


def adaptive_update_multiplier(z: float, count_stddev: float) -> float:
    """Andrew et al. 2021: the update sum gets multiplier z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), so that it and
    the noised count of unclipped updates (sensitivity 1/2, noise sigma_b, i.e. multiplier 2 sigma_b) together
    are one Gaussian mechanism of multiplier z. Needs z < 2 sigma_b."""
    if z <= 0:
        return 0.0
    if z >= 2 * count_stddev:
        raise ValueError(f"adaptive clipping needs noise_multiplier < 2 * clipped_count_stddev, got z={z:g} and "
                         f"sigma_b={count_stddev:g}")
    return (z ** -2 - (2 * count_stddev) ** -2) ** -0.5
