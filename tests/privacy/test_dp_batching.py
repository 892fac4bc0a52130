"""Client-level DP with client batching (``backend.client_batching=true``): every client of a cohort is clipped
(and, under dp_local, noised) exactly as when it trains alone, so a batched run releases the same global model as
the one-client-at-a-time run (float tolerance); dp_sgd stays refused (no per-sample gradients when vectorised)."""

import pytest
import torch

from fedlt.config import ConfigError
from fedlt.core.cohort import cohorts
from fedlt.privacy import clipping
from fedlt.privacy.clipping import UNCLIPPED
from fedlt.privacy.server import RunPrivacy
from tests.conftest import needs_fmnist
from tests.core.probe import compose, run_inprocess
from tests.privacy.helpers import arrays, reply, run_cfg

# 6 clients, 3 sampled per round (fixed: the same clients in both runs), cohorts of 2 and 1, 2 rounds. A small
# plain-SGD step: the vectorised trainer then matches the sequential one to ~1e-6 (with lr 0.05 and momentum 0.9
# float rounding grows over 85 local steps to ~0.1 with or without DP, tests/core/test_cohort.py's tolerance)
RUN = ("experiment=smoke", "model.width=8", "model.feature_dim=16", "num_rounds=2", "eval.every=0",
       "checkpoint.every=0", "checkpoint.keep=0", "backend.batching_group=2", "optimizer.lr=0.001",
       "optimizer.momentum=0")
C = 0.05  # below every client's update norm (with BatchNorm statistics, ~4, far below): every client is clipped
CENTRAL = ("privacy=dp_central", "privacy.sampling=fixed", "privacy.noise_multiplier=0", f"privacy.clip_norm={C}")
UNPROTECTED = "privacy.batchnorm_stats=unprotected"  # updates of norms 0.07-0.24 that point different ways
BATCHED = "backend.client_batching=true"


def final_model(run_dir, *overrides: str) -> dict[str, torch.Tensor]:
    outcome, _ = run_inprocess(compose(*RUN, *overrides), run_dir)
    assert outcome.finished and outcome.last_round == 2
    return outcome.final_arrays.to_torch_state_dict()


def max_gap(a: dict, b: dict) -> float:
    """Largest difference of a float entry, relative above 1 (BatchNorm variances ~1 keep float32 rounding)."""
    return max(float(((a[k].double() - b[k].double()).abs() / b[k].double().abs().clamp(min=1)).max())
               for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The one-client-at-a-time run of these overrides (each computed once per module)."""
    done = {}

    def run(*overrides: str) -> dict[str, torch.Tensor]:
        if overrides not in done:
            done[overrides] = final_model(tmp_path_factory.mktemp("seq"), *overrides)
        return done[overrides]

    return run


@needs_fmnist
@pytest.mark.parametrize("stats", ["privacy.batchnorm_stats=clip", UNPROTECTED])
def test_batched_dp_central_clips_each_client_and_releases_the_sequential_model(tmp_path, monkeypatch, sequential,
                                                                                  stats):
    """No noise, only clipping: the batched run's global model after 2 rounds equals the sequential run's, and
    protect_update ran once per sampled client (with its id), leaving every update of norm <= C."""
    seq = sequential(*CENTRAL, stats)
    calls = []
    real = clipping.protect_update

    def spy(cfg, sent, shared, uploads, config, rnd, cid, buffers=frozenset()):
        start = sent.to_torch_state_dict()
        before = {k: v.clone() for k, v in shared.items()}
        out = real(cfg, sent, shared, uploads, config, rnd, cid, buffers)
        protected = [k for k in shared if shared[k].is_floating_point() and not (stats == UNPROTECTED and k in buffers)]
        norm = lambda sd: clipping.flat_norm(sd[k].double() - start[k].double() for k in protected)  # noqa: E731
        calls.append((rnd, cid, norm(before), norm(shared)))
        return out

    monkeypatch.setattr("fedlt.core.client_step.protect_update", spy)
    batched = final_model(tmp_path, *CENTRAL, stats, BATCHED)
    assert max_gap(batched, seq) <= 1e-5
    assert [r for r, *_ in calls] == [1, 1, 1, 2, 2, 2]  # 3 clients x 2 rounds, each protected on its own
    assert all(len({c for r, c, *_ in calls if r == rnd}) == 3 for rnd in (1, 2))
    assert all(after <= C + 1e-6 for *_, after in calls)
    assert all(before > C for _, _, before, _ in calls)  # the clipping acted


@needs_fmnist
def test_batched_dp_central_without_per_client_clipping_differs(tmp_path, monkeypatch, sequential):
    """The defining step: were the cohort's updates not clipped one by one (the server re-clips only their sum,
    at m*C), the batched model would differ from the sequential one far beyond the tolerance above."""
    seq = sequential(*CENTRAL, UNPROTECTED)
    monkeypatch.setattr("fedlt.core.client_step.protect_update", lambda *a, **k: {})
    assert max_gap(final_model(tmp_path, *CENTRAL, UNPROTECTED, BATCHED), seq) > 1e-3


@needs_fmnist
def test_batched_dp_local_releases_the_sequential_model(tmp_path):
    """dp_local: each client's clipped update gets the same seeded noise (stream of (seed, round, client)) in
    both runs, so the global models agree."""
    local = ("privacy=dp_local", f"privacy.clip_norm={C}", "privacy.epsilon=50")
    seq = final_model(tmp_path / "seq", *local)
    assert max_gap(seq, final_model(tmp_path / "bat", *local, BATCHED)) <= 1e-5


def test_cohort_reply_counts_as_its_clients():
    """noised_replies: a cohort reply (sent + SUM of m clipped updates, sum of bits) releases what m single
    replies release, and is re-clipped at m*C (a longer sum, e.g. a faulty one, is scaled down to m*C)."""
    priv = lambda: RunPrivacy(run_cfg(num_clients=10, participation=0.4, noise_multiplier=0.0,  # noqa: E731
                                      clip_norm=1.0, sampling="fixed", adaptive_clipping=True,
                                      clipped_count_stddev=1.0))
    sent = {"w": torch.zeros(3)}
    ups = [torch.tensor([0.6, 0.0, 0.0]), torch.tensor([0.0, 0.8, 0.0]), torch.tensor([0.0, 0.0, 0.3])]
    singles, batched = priv(), priv()
    for p in (singles, batched):
        p.train_config()
    a = singles.noised_replies(1, arrays(sent), [reply(i, {"w": u}, **{UNCLIPPED: 1.0}) for i, u in enumerate(ups)])
    b = batched.noised_replies(1, arrays(sent), [reply(0, {"w": sum(ups)}, **{UNCLIPPED: 3.0, "num-clients": 3})])
    got = lambda r: r[0].content["arrays"]["w"].numpy()  # noqa: E731
    assert got(a) == pytest.approx(got(b)) and batched.clip == pytest.approx(singles.clip)
    faulty = priv()
    faulty.train_config()
    c = faulty.noised_replies(1, arrays(sent), [reply(0, {"w": torch.tensor([30.0, 0, 0])}, **{"num-clients": 3})])
    assert got(c)[0] == pytest.approx(3.0 / 4)  # re-clipped to 3C, / 4 expected clients


def test_dp_sgd_with_client_batching_is_still_refused():
    with pytest.raises(ConfigError, match=r"privacy=dp_sgd with backend\.client_batching=true.*per-sample"):
        compose("experiment=smoke", "privacy=dp_sgd", "model.norm=group", "backend.client_batching=true")


def test_an_empty_poisson_round_makes_no_cohort():
    """dp_central's Poisson sampling may draw no client: no cohort message (the noise is still released)."""
    assert cohorts([], {"backend": {"batching_group": 0}}, actors=2) == []
