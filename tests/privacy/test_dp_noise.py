"""The server's half of dp_central: the noise on the sum has std z*C (a statistical test with a fixed seed), the
server re-clips what it receives and divides by the expected number of clients, and the clients are sampled as
the accountant assumes."""

import math

import numpy as np
import pytest
import torch

from fedlt.privacy.clipping import UNCLIPPED, WITHHELD
from fedlt.privacy.server import PrivacyBudgetError, RunPrivacy
from tests.privacy.helpers import arrays, delta_norm, reply, run_cfg

D = 250_000  # entries: the sample std of D normal draws is within 4 * std / sqrt(2D) = 0.6 % of the true one


def sent_arrays() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {"w": torch.randn(D, generator=gen), "bn.num_batches_tracked": torch.tensor(3, dtype=torch.int64)}


def released(priv: RunPrivacy, rnd: int, sent: dict, replies: list) -> dict[str, torch.Tensor]:
    priv.train_config()
    (out,) = priv.noised_replies(rnd, arrays(sent), replies)
    assert float(next(iter(out.content.metric_records.values()))["num-examples"]) == 1  # one reply, weight 1
    return out.content["arrays"].to_torch_state_dict()


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_server_noise_has_the_configured_std(sampling):
    z, clip = 1.3, 0.7
    priv = RunPrivacy(run_cfg(num_clients=20, participation=0.3, noise_multiplier=z, clip_norm=clip,
                              sampling=sampling))
    sent = sent_arrays()
    # three clients that did not move: what is released is sent + noise / expected clients
    out = released(priv, 1, sent, [reply(c, sent) for c in range(3)])
    expected = 0.3 * 20 if sampling == "poisson" else 6  # qN, or m = int(0.3 * 20)
    noise = (out["w"].double() - sent["w"].double()) * expected  # the noise added to the SUM
    assert noise.std().item() == pytest.approx(z * clip, rel=4 / math.sqrt(2 * D))
    assert abs(noise.mean().item()) < 4 * z * clip / math.sqrt(D)
    assert int(out["bn.num_batches_tracked"]) == 3  # integer buffers are not part of the mechanism
    assert torch.equal(released(priv, 1, sent, [])["w"], out["w"])  # seeded by (seed, round), also with no replies
    assert not torch.equal(released(priv, 2, sent, [])["w"], out["w"])


def test_sum_of_reclipped_updates_over_expected_clients():
    """Without noise the release is sent + (sum of updates, each re-clipped to C in float64) / expected: a reply
    that exceeds C (a client that did not clip) is scaled onto the sphere."""
    priv = RunPrivacy(run_cfg(num_clients=10, participation=0.4, noise_multiplier=0.0, clip_norm=1.0,
                              sampling="poisson"))
    sent = {"w": torch.zeros(4)}
    big = {"w": torch.tensor([30.0, 40.0, 0.0, 0.0])}  # norm 50 -> (0.6, 0.8, 0, 0)
    small = {"w": torch.tensor([0.0, 0.0, 0.3, 0.0])}
    out = released(priv, 1, sent, [reply(0, big), reply(1, small)])
    torch.testing.assert_close(out["w"], torch.tensor([0.6, 0.8, 0.3, 0.0]) / 4.0)  # expected = 0.4 * 10
    assert delta_norm(out, sent) <= 2 * 1.0 / 4.0 + 1e-7


def test_adaptive_clipping_moves_C_toward_the_target_quantile():
    cfg = run_cfg(num_clients=100, participation=0.5, noise_multiplier=0.5, clip_norm=1.0, adaptive_clipping=True,
                  clipped_count_stddev=1.0)
    sent = {"w": torch.zeros(3)}
    up = RunPrivacy(cfg)  # every update clipped: C grows (exp(0.2 * 0.5) at most)
    released(up, 1, sent, [reply(c, {"w": torch.ones(3) * 10}, **{UNCLIPPED: 0.0}) for c in range(50)])
    assert 1.0 < up.clip <= math.exp(0.2 * 0.5) + 1e-9
    down = RunPrivacy(cfg)  # every update unclipped: C shrinks
    released(down, 1, sent, [reply(c, {"w": torch.ones(3) * 1e-3}, **{UNCLIPPED: 1.0}) for c in range(50)])
    assert math.exp(-0.2 * 0.5) - 1e-9 <= down.clip < 1.0
    # the update noise multiplier leaves room for the count's noise: 1/z^2 = 1/z_delta^2 + 1/(2 sigma_b)^2
    assert up.update_multiplier ** -2 + (2 * 1.0) ** -2 == pytest.approx(0.5 ** -2)


def test_poisson_sampling_has_rate_participation_and_is_seeded_by_round():
    priv = RunPrivacy(run_cfg(num_clients=50, participation=0.2, sampling="poisson"))
    never = lambda rnd: pytest.fail("Poisson sampling must not use the strategy's sampler")  # noqa: E731
    draws = [priv.sample(rnd, never) for rnd in range(1, 401)]
    sizes = np.array([len(d) for d in draws])
    assert sizes.mean() == pytest.approx(10, abs=0.5) and sizes.std() > 1  # Binomial(50, 0.2): sd 2.8
    counts = np.bincount(np.concatenate(draws), minlength=50) / 400
    assert np.abs(counts - 0.2).max() < 0.1
    assert draws[6] == RunPrivacy(run_cfg(num_clients=50, participation=0.2)).sample(7, never)  # no history
    fixed = RunPrivacy(run_cfg(num_clients=50, participation=0.2, sampling="fixed"))
    assert fixed.sample(3, lambda rnd: [rnd, 9]) == [3, 9]  # the strategy's uniform sample of m clients


def test_reply_with_withheld_uploads_stops_the_run():
    sent = {"w": torch.zeros(2)}
    with pytest.raises(PrivacyBudgetError, match="ctx.uploads"):
        RunPrivacy.check_replies([reply(0, sent), reply(1, sent, **{WITHHELD: 2.0})], "scaffold")
    priv = RunPrivacy(run_cfg())
    with pytest.raises(PrivacyBudgetError, match="not model arrays"):
        released(priv, 1, sent, [reply(0, {"w": torch.zeros(2), "upload": torch.ones(1)})])


def test_negative_running_variances_are_clamped_after_noise():
    out = RunPrivacy.postprocess(arrays({"bn.running_var": torch.tensor([-0.5, 2.0]), "w": torch.tensor([-1.0])}))
    sd = out.to_torch_state_dict()
    assert sd["bn.running_var"].tolist() == [0.0, 2.0] and sd["w"].tolist() == [-1.0]
