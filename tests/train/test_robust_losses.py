"""Losses robust to noisy labels (loss=gce, loss=sce): their limits, golden values and option checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedlt.config import ConfigError
from fedlt.train.losses import build_loss, validate_loss

Z = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [-2.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
Y = torch.tensor([0, 1, 1, 2])


def test_gce_tends_to_cross_entropy_as_q_goes_to_zero():
    ce = F.cross_entropy(Z, Y)
    assert torch.allclose(build_loss({"name": "gce", "q": 0.0})(Z, Y), ce)  # q = 0: the limit, exactly
    assert torch.allclose(build_loss({"name": "gce", "q": 1e-6})(Z, Y), ce, atol=1e-4)
    assert abs(build_loss({"name": "gce", "q": 0.7})(Z, Y) - ce) > 0.1  # the default is not CE


def test_gce_with_q_one_is_the_mae_like_form():
    p_y = F.softmax(Z, dim=1).gather(1, Y[:, None]).squeeze(1)
    assert torch.allclose(build_loss({"name": "gce", "q": 1.0})(Z, Y), (1 - p_y).mean())
    # q = 0.7 by the formula (1 - p_y^q) / q
    assert torch.allclose(build_loss({"name": "gce"})(Z, Y), ((1 - p_y ** 0.7) / 0.7).mean())


def test_gce_is_finite_when_the_true_class_probability_underflows():
    z = torch.tensor([[0.0, 200.0]], requires_grad=True)
    value = build_loss({"name": "gce", "q": 0.7})(z, torch.tensor([0]))
    value.backward()
    assert math.isclose(float(value.detach()), 1 / 0.7, rel_tol=1e-6) and torch.isfinite(z.grad).all()


def sce_by_hand(z, y, alpha, beta, floor=1e-4):
    """The official SCELoss (HanxunH/SCELoss-Reproduce loss.py): CE + RCE on clamped probabilities and one-hot."""
    ce = F.cross_entropy(z, y)
    p = F.softmax(z, dim=1).clamp(1e-7, 1.0)
    q = F.one_hot(y, z.shape[1]).float().clamp(floor, 1.0)
    return alpha * ce + beta * (-(p * q.log()).sum(1)).mean()


def test_sce_golden_values():
    # computed once by hand from the formula, with the official defaults (alpha 0.1, beta 1.0, one-hot floor 1e-4)
    # RCE = -ln(1e-4) * mean(1 - p_y) = 9.21034 * mean(1 - p_y)
    p_y = F.softmax(Z, dim=1).gather(1, Y[:, None]).squeeze(1)
    expected = 0.1 * F.cross_entropy(Z, Y) + 9.210340371976184 * (1 - p_y).mean()
    got = build_loss({"name": "sce"})(Z, Y)
    assert torch.allclose(got, expected, atol=1e-6)
    assert math.isclose(float(got), 4.359496, abs_tol=1e-5)  # golden: computed in float64 by hand (plain Python)
    for alpha, beta, floor in ((6.0, 0.1, 1e-4), (1.0, 0.0, 1e-4), (0.0, 1.0, math.exp(-4))):
        cfg = {"name": "sce", "alpha": alpha, "beta": beta, "one_hot_floor": floor}
        assert torch.allclose(build_loss(cfg)(Z, Y), sce_by_hand(Z, Y, alpha, beta, floor), atol=1e-6)
    assert torch.allclose(build_loss({"name": "sce", "alpha": 1.0, "beta": 0.0})(Z, Y), F.cross_entropy(Z, Y))


@pytest.mark.parametrize("bad,named", [
    ({"name": "gce", "q": 1.5}, "loss.q=1.5"),
    ({"name": "gce", "q": -0.1}, "loss.q=-0.1"),
    ({"name": "sce", "beta": -1.0}, "loss.beta=-1.0"),
    ({"name": "sce", "one_hot_floor": 0.0}, "loss.one_hot_floor=0.0"),
    ({"name": "sce", "gamma": 1.0}, "loss.gamma"),
])
def test_bad_robust_loss_options_are_refused(bad, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        validate_loss({"loss": bad, "model": {"name": "cnn"}})


def test_sce_beta_above_one_is_allowed():  # beta's range is not class_balanced's [0, 1)
    validate_loss({"loss": {"name": "sce", "alpha": 6.0, "beta": 2.0, "one_hot_floor": 1e-4}, "model": {"name": "cnn"}})
