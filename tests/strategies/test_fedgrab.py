"""Fed-GraB: DPA reads the prior off the classifier rows' L2 norms (once, after the warm-up); SGB re-weights the
positive/negative logit gradients per class with the official incremental PID controller and accumulates their
magnitudes, leaving class c out with probability q_c (min-max scaled prior); with zero gains the client step is
plain sigmoid-BCE training; the controller state survives rounds and checkpoints."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fedlt.config import ConfigError
from fedlt.train.local import run_local_epochs, sgd, supervised_step
from strategies.fedgrab import (ERR, NEG, OUT, POS, PRIOR, FedGraBClient, GradientBalancer, Server, dpa_prior,
                                leave_out_probabilities)
from tests.conftest import needs_fmnist
from tests.strategies import _inprocess
from tests.strategies.conftest import build, context, tiny_cfg, tiny_data

DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/strategy/fedgrab.yaml").read_text())
PRIOR_4 = torch.tensor([0.4, 0.3, 0.2, 0.1])  # q = [1, 2/3, 1/3, 0]


def cfg_for(**strategy):
    return tiny_cfg({**DEFAULTS, **strategy}, batch_size=8)


def test_defaults_are_the_official_pid_gains_and_other_losses_are_refused():
    assert (DEFAULTS["kp"], DEFAULTS["ki"], DEFAULTS["kd"], DEFAULTS["warmup_rounds"]) == (10.0, 0.01, 0.1, 1)
    Server.validate_config(cfg_for())
    with pytest.raises(ConfigError, match="loss=focal for strategy=fedgrab"):
        Server.validate_config(tiny_cfg(DEFAULTS, loss={"name": "focal"}))
    with pytest.raises(ConfigError, match="strategy=fedgrab with model.head=cosine"):
        Server.validate_config(tiny_cfg(DEFAULTS, model={"name": "cnn", "head": "cosine"}))


def test_dpa_prior_of_a_known_classifier_is_its_normalised_row_norms():
    w = torch.tensor([[3.0, 4.0], [0.0, -2.0], [1.0, 0.0], [0.0, 0.5]])  # row norms 5, 2, 1, 0.5
    expected = torch.tensor([5.0, 2.0, 1.0, 0.5]) / 8.5
    assert torch.allclose(dpa_prior(w), expected)
    assert torch.allclose(leave_out_probabilities(dpa_prior(w)), torch.tensor([1.0, 1.5 / 4.5, 0.5 / 4.5, 0.0]))
    assert torch.equal(leave_out_probabilities(torch.full((4,), 0.25)), torch.zeros(4))  # flat: balance every class


def test_server_runs_dpa_once_after_the_warm_up_on_the_aggregated_classifier():
    cfg = cfg_for(warmup_rounds=2)
    server = Server(cfg)
    model = build(FedGraBClient, cfg)
    arrays = server.initial_arrays(model)
    assert server.after_aggregate(1, arrays, []) is arrays and server.round_arrays(2) == {}
    server.after_aggregate(2, arrays, [])
    head = model.head.weight.detach()
    direct = head.norm(dim=1) / head.norm(dim=1).sum()
    assert torch.allclose(server.round_arrays(3)[PRIOR], direct)
    with torch.no_grad():
        model.head.weight.mul_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    server.after_aggregate(3, server.initial_arrays(model), [])  # once: a later classifier does not re-estimate it
    assert torch.allclose(server.round_arrays(4)[PRIOR], direct)
    restored = Server(cfg)
    restored.load_server_state(server.server_state())
    assert torch.equal(restored.round_arrays(4)[PRIOR], server.prior)
    assert Server(cfg).server_state() == {}


class OfficialPID:
    """The official ``PID.PID_calc`` in mode PID_DELTA, one scalar controller (restated for the test)."""

    def __init__(self, kp=10.0, ki=0.01, kd=0.1):
        self.kp, self.ki, self.kd, self.out, self.error = kp, ki, kd, 0.0, [0.0, 0.0, 0.0]

    def calc(self, current):
        self.error = [0.0 - current, self.error[0], self.error[1]]
        e = self.error
        self.out += self.kp * (e[0] - e[1]) + self.ki * e[0] + self.kd * (e[0] - 2.0 * e[1] + e[2])
        return self.out


def official_step(pids, pos, neg, z, y):
    """One official PIDLOSS step (every class balanced): weights in the forward pass, then a gradient hook that
    multiplies the logit gradient in place and accumulates its magnitudes. Returns the logit gradient."""
    n, k = z.shape
    t = F.one_hot(y, k).float()
    outs = torch.tensor([pids[c].calc(float(pos[c] - neg[c])) for c in range(k)])
    f = lambda x: (10 / 9) / ((1 / 9) + torch.exp(-0.5 * x))  # noqa: E731
    weight = f(outs) * t + f(-outs) * (1 - t)
    leaf = z.clone().requires_grad_(True)
    logits = leaf * 1.0

    def hook(grad):
        grad *= weight
        g = grad.detach().abs()
        pos.add_((g * t).sum(0))
        neg.add_((g * (1 - t)).sum(0))

    logits.register_hook(hook)
    (F.binary_cross_entropy_with_logits(logits, t, reduction="none").sum() / n).backward()
    return leaf.grad


def test_balancer_matches_the_official_pid_loss_step_by_step():
    g = torch.Generator().manual_seed(0)
    k = 4
    pids, pos, neg = [OfficialPID() for _ in range(k)], torch.zeros(k), torch.zeros(k)
    ours = GradientBalancer(k, torch.full((k,), 0.25), {}, (10.0, 0.01, 0.1), torch.Generator().manual_seed(1))
    for _ in range(6):
        z, y = torch.randn(7, k, generator=g) * 2, torch.randint(0, k, (7,), generator=g)
        expected = official_step(pids, pos, neg, z, y)
        leaf = z.clone().requires_grad_(True)
        ours(leaf, y).backward()
        assert torch.allclose(leaf.grad, expected, rtol=1e-5, atol=1e-7)
        assert torch.allclose(ours.pos, pos, rtol=1e-5) and torch.allclose(ours.neg, neg, rtol=1e-5)
        assert torch.allclose(ours.out, torch.tensor([p.out for p in pids]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours.out, torch.zeros(k))  # the controllers moved: the weights are not all 1


def test_leave_out_follows_the_prior_most_frequent_never_balanced_rarest_always():
    k = 4
    ours = GradientBalancer(k, PRIOR_4, {}, (10.0, 0.01, 0.1), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    for _ in range(8):
        z, y = torch.randn(6, k, generator=g), torch.randint(0, k, (6,), generator=g)
        leaf = z.clone().requires_grad_(True)
        ours(leaf, y).backward()
        t = F.one_hot(y, k).float()
        plain = (torch.sigmoid(z) - t) / 6
        assert torch.allclose(leaf.grad[:, 0], plain[:, 0])  # q_0 = 1: class 0 keeps the plain gradient
    assert ours.pos[0] == 0 and ours.neg[0] == 0 and ours.neg[3] > 0  # q_3 = 0: class 3 always accumulates


def plain_bce_training(cfg, rnd):
    model = build(FedGraBClient, cfg)

    def bce(z, y):
        target = F.one_hot(y, z.shape[1]).to(z.dtype)
        return F.binary_cross_entropy_with_logits(z, target, reduction="none").sum() / len(y)

    opt = sgd([p for p in model.parameters() if p.requires_grad], cfg["optimizer"])
    run_local_epochs(tiny_data(), 1, 8, torch.Generator().manual_seed(rnd), supervised_step(model, opt, bce))
    return model


def fedgrab_training(cfg, rnd, prior=None, state=None):
    model = build(FedGraBClient, cfg)
    ctx = context(model, tiny_data(), cfg, rnd=rnd, state=state)
    if prior is not None:
        ctx.received[PRIOR] = prior
    FedGraBClient(cfg).train(ctx)
    return model, ctx


def same_model(a, b):
    return all(torch.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(a.state_dict().values(),
                                                                           b.state_dict().values(), strict=True))


def test_zero_gains_are_plain_bce_training_and_the_default_balancer_changes_the_step():
    plain = plain_bce_training(cfg_for(), 2)
    off, off_ctx = fedgrab_training(cfg_for(kp=0.0, ki=0.0, kd=0.0), 2, PRIOR_4)
    assert same_model(off, plain) and torch.equal(off_ctx.state[OUT], torch.zeros(4))
    warm, warm_ctx = fedgrab_training(cfg_for(), 2)  # no prior yet (warm-up): unweighted, state untouched
    assert same_model(warm, plain) and warm_ctx.state == {}
    on, on_ctx = fedgrab_training(cfg_for(), 2, PRIOR_4)
    assert not same_model(on, plain)
    assert set(on_ctx.state) == {POS, NEG, OUT, ERR} and on_ctx.state[NEG][3] > 0


def test_controller_state_carries_over_to_the_next_round():
    _, first = fedgrab_training(cfg_for(), 2, PRIOR_4)
    fresh, _ = fedgrab_training(cfg_for(), 3, PRIOR_4)
    carried, second = fedgrab_training(cfg_for(), 3, PRIOR_4, state=first.state)
    assert not same_model(fresh, carried)
    assert torch.all(second.state[NEG] >= first.state[NEG]) and not torch.equal(second.state[NEG], first.state[NEG])


@needs_fmnist
def test_resume_is_exact_and_needs_the_clients_controller_state(tmp_path):
    _, last = _inprocess.assert_resume_is_exact("fedgrab", tmp_path, "clients")
    assert set(last.server_state) == {"prior"} and torch.isclose(last.server_state["prior"].sum(), torch.tensor(1.0))
    assert any(POS in recs["fedlt.state"] for recs in last.clients.values())
