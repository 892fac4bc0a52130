"""(epsilon, delta): fedlt's numbers equal an independent computation with dp-accounting's public API for the
same (q, sigma, rounds, delta), grow with the rounds, and target_epsilon calibration stays within the target."""

import math

import dp_accounting
import pytest
from dp_accounting import NeighboringRelation as Rel

from fedlt.privacy.server import RunPrivacy
from tests.privacy.helpers import run_cfg


def after_rounds(priv: RunPrivacy, rounds: int) -> list[float]:
    out = []
    for rnd in range(1, rounds + 1):
        priv.account(rnd)
        out.append(priv.metrics()["privacy/epsilon"])
    return out


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_poisson_epsilon_equals_dp_accounting_and_grows(accountant):
    q, z, delta, rounds = 0.1, 1.1, 1e-5, 12
    priv = RunPrivacy(run_cfg(num_clients=100, participation=q, noise_multiplier=z, delta=delta,
                              sampling="poisson", accountant=accountant))
    eps = after_rounds(priv, rounds)
    fresh = (dp_accounting.rdp.RdpAccountant if accountant == "rdp" else dp_accounting.pld.PLDAccountant)
    for k in (1, 5, rounds):
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        independent = fresh().compose(event, k).get_epsilon(delta)
        assert eps[k - 1] == pytest.approx(independent, rel=1e-9)
    assert all(b > a for a, b in zip(eps, eps[1:]))
    assert priv.metrics()["privacy/noise_multiplier"] == z and priv.metrics()["privacy/delta"] == delta


def test_fixed_size_sampling_uses_replace_one_and_twice_the_sensitivity():
    """m of N clients without replacement: dp-accounting's replace-one analysis; swapping one client moves the sum
    of C-clipped updates by up to 2C, so the Gaussian's multiplier is z/2."""
    n, p, z, delta = 40, 0.25, 2.0, 1e-5
    priv = RunPrivacy(run_cfg(num_clients=n, participation=p, noise_multiplier=z, delta=delta, sampling="fixed"))
    eps = after_rounds(priv, 6)
    event = dp_accounting.SampledWithoutReplacementDpEvent(n, 10, dp_accounting.GaussianDpEvent(z / 2))
    independent = dp_accounting.rdp.RdpAccountant(neighboring_relation=Rel.REPLACE_ONE).compose(event, 6)
    assert eps[-1] == pytest.approx(independent.get_epsilon(delta), rel=1e-9)
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert priv.summary()["neighbouring_relation"] == "replace one client"


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_target_epsilon_calibration_stays_within_the_target(sampling):
    target, rounds, delta = 3.0, 40, 1e-5
    cfg = run_cfg(num_clients=50, participation=0.2, num_rounds=rounds, target_epsilon=target,
                  on_budget="calibrate", sampling=sampling, delta=delta)
    priv = RunPrivacy(cfg)
    assert priv.calibrated and priv.z != cfg["privacy"]["noise_multiplier"]
    spent = after_rounds(priv, rounds)[-1]
    assert spent <= target
    assert spent > 0.97 * target  # not wastefully noisy
    assert priv.affordable(rounds) and not priv.affordable(rounds + 5)
    # independently: a fresh dp-accounting accountant with the calibrated z spends at most the target
    q, m = 0.2, 10
    if sampling == "poisson":
        event, acc = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(priv.z)), \
            dp_accounting.rdp.RdpAccountant()
    else:
        event = dp_accounting.SampledWithoutReplacementDpEvent(50, m, dp_accounting.GaussianDpEvent(priv.z / 2))
        acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=Rel.REPLACE_ONE)
    assert acc.compose(event, rounds).get_epsilon(delta) <= target


def test_adaptive_clipping_costs_exactly_the_effective_multiplier():
    """Andrew et al.: the noised update sum (multiplier z_delta) and the noised count of unclipped updates
    (sensitivity 1/2, std sigma_b: multiplier 2 sigma_b) on the same sample compose to one Gaussian of the
    configured z, which is what fedlt accounts."""
    q, z, sigma_b, delta = 0.5, 0.8, 1.0, 1e-5
    priv = RunPrivacy(run_cfg(num_clients=100, participation=q, noise_multiplier=z, adaptive_clipping=True,
                              clipped_count_stddev=sigma_b))
    both = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(priv.update_multiplier), dp_accounting.GaussianDpEvent(2 * sigma_b)]))
    independent = dp_accounting.rdp.RdpAccountant().compose(both, 7).get_epsilon(delta)
    assert after_rounds(priv, 7)[-1] == pytest.approx(independent, rel=1e-6)
    assert priv.update_multiplier > z


def test_local_dp_composes_each_clients_uploads():
    """dp_local: per upload the Gaussian of Flower's LocalDpMod; epsilon = composition over the most uploads."""
    priv = RunPrivacy(run_cfg("dp_local", num_clients=10, participation=0.3, clip_norm=1.0, epsilon=0.5,
                              delta=1e-5))
    std = 2.0 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    assert priv.local_std == pytest.approx(std)
    for rnd in (1, 2, 3):
        priv.sample(rnd, lambda r: [0, 1, 2] if r < 3 else [0, 5, 6])
        priv.account(rnd)
    assert priv.metrics()["privacy/max_uploads"] == 3  # client 0
    independent = dp_accounting.rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(std / 2.0), 3)
    assert priv.epsilon() == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
    assert priv.epsilon() > dp_accounting.rdp.RdpAccountant().compose(
        dp_accounting.GaussianDpEvent(std / 2.0), 2).get_epsilon(1e-5)


def test_state_dict_round_trip_reproduces_epsilon():
    cfg = run_cfg(num_clients=30, participation=0.2, num_rounds=20, target_epsilon=2.0, adaptive_clipping=True,
                  clipped_count_stddev=2.0)
    a = RunPrivacy(cfg)
    after_rounds(a, 4)
    a.clip = 1.7
    b = RunPrivacy(cfg, a.state_dict())
    assert b.z == a.z and b.clip == 1.7 and b.rounds == 4
    assert b.metrics() == a.metrics() and b.summary() == a.summary()
