"""Sample-level DP (``privacy=dp_sgd``): every per-sample gradient is clipped to C, the noise has std sigma*C,
each client's epsilon is dp-accounting's for its (q, sigma, steps, delta), sigma calibrates per client to a
target, BatchNorm and non-per-sample training are refused, and short in-process runs on Fashion-MNIST-LT log
epsilon and resume to the same epsilon."""

import math

import dp_accounting
import pytest
import torch
import torch.nn.functional as F

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.config import ConfigError
from fedlt.core import checkpoint
from fedlt.data.federated import ClientData, DataPlan
from fedlt.experiment import final_results
from fedlt.models import build_model
from fedlt.privacy import dp_sgd
from fedlt.privacy.server import RunPrivacy
from fedlt.train.local import run_local_epochs
from tests.conftest import needs_fmnist, read_jsonl
from tests.core.probe import compose, run_inprocess
from tests.privacy.helpers import TINY, run_cfg

CLASSES = 3


def tiny_data(n: int = 40) -> ClientData:
    plan = DataPlan("none", "none", "none", (0.5,), (0.25,), CLASSES, 1, 0, False)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 8, 8, 1), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % CLASSES
    return ClientData(0, x, y, torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long),
                      torch.bincount(y, minlength=CLASSES), torch.zeros(CLASSES), plan)


def sgd_cfg(batch_size: int = 40, **privacy) -> dict:
    cfg = run_cfg("dp_sgd", num_clients=1, participation=1.0, num_rounds=1, **privacy)
    cfg.update({"batch_size": batch_size, "local_epochs": 1, "strategy": {"name": "fedavg"},
                "optimizer": {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}})
    return cfg


def model():
    torch.manual_seed(0)
    return build_model({"name": "cnn", "width": 8, "feature_dim": 16, "norm": "group"}, 1, CLASSES)


def one_step(cfg: dict, loss_fn=F.cross_entropy, rnd: int = 1) -> tuple[torch.Tensor, dict]:
    """Train one DP-SGD step (n = batch size: q = 1, every sample in); return the parameter change and metrics."""
    net = model()
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    data = tiny_data()
    ctx = ClientContext(model=net, data=data, cfg=cfg, round=rnd, generator=torch.Generator().manual_seed(1))
    metrics = dp_sgd.train_epochs(ctx, net, list(net.parameters()), loss_fn)
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    return after - before, metrics


# ----------------------------------------------------------------------------------------- the mechanism
def test_every_per_sample_gradient_is_clipped_to_C():
    net, data = model(), tiny_data()
    x, y = data.normalise(data.train_x), data.train_y
    names = [k for k, _ in net.named_parameters()]
    grads, _ = dp_sgd.per_sample_grads(net, names, {}, F.cross_entropy, x, y)
    for i in range(3):  # the per-sample gradients are autograd's on the sample alone
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in net.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, atol=1e-5, rtol=1e-4)
    clip = 0.5
    factor, norms = dp_sgd.clip_factors(grads, clip)
    assert (norms > clip).any()  # clipping has work to do
    per_sample = torch.cat([g.double().reshape(len(g), -1) for g in grads.values()], 1) * factor[:, None]
    assert (per_sample.norm(dim=1) <= clip).all()  # float64: exactly, not up to rounding
    small = norms <= clip
    assert torch.equal(factor[small], torch.ones(int(small.sum())))
    summed = dp_sgd.clip_and_sum(grads, clip)
    torch.testing.assert_close(torch.cat([summed[k].flatten() for k in names]), per_sample.sum(0))


def test_dp_sgd_step_moves_the_model_by_at_most_C_without_noise():
    """One noiseless step with lr 1 on a full batch (q = 1): the change is the mean of clipped per-sample
    gradients, so its norm is <= C; without clipping it would be the plain mean gradient, far larger."""
    clip = 0.01
    delta, metrics = one_step(sgd_cfg(clip_norm=clip, noise_multiplier=0.0))
    assert metrics["train/steps"] == 1 and metrics["train/samples"] == 40
    assert 0 < float(delta.norm()) <= clip


def test_noise_has_std_sigma_times_C_and_is_seeded():
    """Zero gradients: the change is -noise / expected batch size, so its std times the expected batch size is
    sigma * C (seeded statistical test over every parameter entry)."""
    sigma, clip = 2.0, 0.5

    def flat(logits, y):
        return (logits * 0).sum()

    delta, _ = one_step(sgd_cfg(clip_norm=clip, noise_multiplier=sigma), flat)
    noise = -delta * 40  # expected batch size n * q = 40
    assert noise.numel() > 4000
    assert abs(float(noise.std()) / (sigma * clip) - 1) < 0.05
    assert abs(float(noise.mean())) < 0.05 * sigma * clip
    again, _ = one_step(sgd_cfg(clip_norm=clip, noise_multiplier=sigma), flat)
    other, _ = one_step(sgd_cfg(clip_norm=clip, noise_multiplier=sigma), flat, rnd=2)
    assert torch.equal(delta, again) and not torch.equal(delta, other)


def test_poisson_batches_have_rate_one_over_steps_per_epoch():
    assert dp_sgd.steps_per_epoch(100, 32) == 4 and dp_sgd.sampling_rate(100, 32) == 0.25
    assert dp_sgd.sampling_rate(10, 32) == 1.0  # a client smaller than a batch: every sample, one step an epoch
    cfg = sgd_cfg(batch_size=8, noise_multiplier=0.0)  # n = 40: q = 1/5, 5 steps, expected batch 8
    _, metrics = one_step(cfg)
    assert metrics["train/steps"] == 5
    assert 0 < metrics["train/samples"] < 80  # Poisson sizes around 5 x 8 = 40


# ----------------------------------------------------------------------------------------- accounting
def independent_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def privacy_for(sizes, rounds=4, **privacy) -> RunPrivacy:
    cfg = run_cfg("dp_sgd", num_clients=len(sizes), num_rounds=rounds, **privacy)
    cfg.update({"batch_size": 32, "local_epochs": 2})
    return RunPrivacy(cfg, train_sizes=sizes)


def test_client_epsilon_equals_dp_accounting_for_its_q_sigma_steps():
    priv = privacy_for([100, 1000, 20], noise_multiplier=1.1)
    priv.uploads = {0: 3, 1: 1}
    eps = priv.client_epsilons()
    assert eps[0] == pytest.approx(independent_epsilon(1 / 4, 1.1, 2 * 4 * 3, 1e-5), rel=1e-9)
    assert eps[1] == pytest.approx(independent_epsilon(1 / 32, 1.1, 2 * 32 * 1, 1e-5), rel=1e-9)
    assert eps[2] == 0.0  # never trained: nothing spent
    metrics = priv.metrics()
    assert metrics["privacy/client_epsilon_max"] == max(eps) == metrics["privacy/epsilon"]
    assert metrics["privacy/client_epsilon_mean"] == pytest.approx(sum(eps) / 3)
    restored = privacy_for([100, 1000, 20], noise_multiplier=1.1)
    restored.load_state_dict(priv.state_dict())
    assert restored.client_epsilons() == eps


def test_target_epsilon_calibrates_each_client_within_the_target():
    priv = privacy_for([100, 1000], rounds=4, target_epsilon=3.0)
    priv.uploads = {0: 4, 1: 4}  # trained in every round: the worst case the calibration covers
    sigmas = [priv.client_schedule(c)[1] for c in (0, 1)]
    assert sigmas[0] != sigmas[1]
    for e in priv.client_epsilons():
        assert 2.9 < e <= 3.0


# ----------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides,match", [
    ((), "model.norm=group"),  # BatchNorm
    (("model.norm=group", "strategy=fedloge"), "not a single ClientAlgorithm.local_epochs"),
    (("model.norm=group", "strategy=fedlc"), "replaces the client loss"),
    (("model.norm=group", "loss=balanced_softmax"), "per-class training counts"),
    (("model.norm=group", "sampler=ros"), "sampler=uniform"),
    (("model.norm=group", "strategy=creff"), "per-class gradients"),
])
def test_what_dp_sgd_cannot_protect_is_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose("experiment=smoke", "privacy=dp_sgd", *overrides)


def test_plain_loop_and_a_wrong_step_count_stop_the_client():
    cfg = sgd_cfg()
    data = tiny_data()
    with pytest.raises(RuntimeError, match="plain local loop"):
        with dp_sgd.session(cfg, 0, data.num_train):
            run_local_epochs(data, 1, 8, torch.Generator(), lambda x, y: 0.0)
    with pytest.raises(RuntimeError, match="took 0 DP-SGD steps"):
        with dp_sgd.session(cfg, 0, data.num_train):
            pass
    net = model()
    ctx = ClientContext(model=net, data=data, cfg=cfg, round=1, generator=torch.Generator().manual_seed(1))
    with dp_sgd.session(cfg, 0, data.num_train) as s:  # ClientAlgorithm.local_epochs is DP-SGD under dp_sgd
        ClientAlgorithm(cfg).train(ctx)
    assert s.steps == s.planned == 1


# ----------------------------------------------------------------------------------------- whole runs
DP_SGD = (*TINY, "num_rounds=2", "batch_size=256", "privacy=dp_sgd", "model.norm=group")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    cfg = compose(*DP_SGD)
    run_dir = tmp_path_factory.mktemp("dp_sgd") / "full"
    outcome, _ = run_inprocess(cfg, run_dir)
    return cfg, outcome, run_dir


@needs_fmnist
def test_dp_sgd_smoke_run_finishes_and_logs_each_clients_epsilon(full_run):
    cfg, outcome, run_dir = full_run
    assert outcome.finished and outcome.last_round == 2
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["privacy/client_epsilon_mean"] <= r["privacy/client_epsilon_max"] < math.inf
        assert r["generic/accuracy"] is not None and r["train/failures"] == 0
    assert rows[0]["privacy/client_epsilon_max"] < rows[1]["privacy/client_epsilon_max"]
    results = final_results(cfg, outcome, 1.0, 1.0)
    p = results["privacy"]
    assert p["mode"] == "dp_sgd" and len(p["client_epsilon"]) == cfg["num_clients"]
    sizes = [len(t) for t in trained_split().client_train]
    for k, (eps, rounds) in enumerate(zip(p["client_epsilon"], p["client_rounds_trained"], strict=True)):
        steps = math.ceil(sizes[k] / 256)  # local_epochs = 1
        want = independent_epsilon(1 / steps, 1.0, steps * rounds, 1e-5) if rounds else 0.0
        assert eps == pytest.approx(want, rel=1e-9)
    assert results["privacy/client_epsilon_max"] == max(p["client_epsilon"])


def trained_split():
    """The split the run trained on (the same seeded split compose/prepare draws)."""
    from fedlt.data.federated import prepare

    _, split, _ = prepare(compose(*DP_SGD))
    return split


@needs_fmnist
def test_resumed_dp_sgd_run_reports_the_same_epsilon(full_run, tmp_path):
    cfg, full, _ = full_run
    run_inprocess({**cfg, "num_rounds": 1}, tmp_path / "cut")
    state = checkpoint.latest(tmp_path / "cut", cfg)
    assert state.round == 1 and state.privacy["uploads"]
    checkpoint.reset_run_dir(tmp_path / "cut", state)
    resumed, _ = run_inprocess(cfg, tmp_path / "cut", resume_from=state)
    strip = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in full.rows]
    assert [{k: v for k, v in r.items() if not k.startswith("time/")} for r in resumed.rows] == strip
    assert resumed.privacy == full.privacy
    a, b = full.final_arrays.to_torch_state_dict(), resumed.final_arrays.to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
