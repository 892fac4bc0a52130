"""Client losses: each equals its published formula, handles classes the client does not hold without NaN,
and is selectable (and validated) through the `loss` config group."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fedlt.config import ConfigError
from fedlt.train.losses import LOSSES, build_loss, effective_number_weights, validate_loss

COUNTS = torch.tensor([50.0, 10.0, 0.0, 2.0])  # class 2 absent locally
torch.manual_seed(0)
Z = torch.randn(6, 4)
Y = torch.tensor([0, 0, 1, 3, 0, 1])


def loss(name, **opts):
    return build_loss({"name": name, **opts}, counts=COUNTS, round=1, num_rounds=10)


def test_balanced_softmax_is_ce_on_logits_plus_log_counts_and_drops_absent_classes():
    z = Z.clone().requires_grad_()
    value = loss("balanced_softmax")(z, Y)
    present = COUNTS > 0
    expected = F.cross_entropy(Z[:, present] + COUNTS[present].log(), torch.tensor([0, 0, 1, 2, 0, 1]))
    assert torch.allclose(value, expected, atol=1e-6)
    assert torch.allclose(value, loss("logit_adjustment", tau=1.0)(Z, Y), atol=1e-6)
    assert not torch.allclose(value, F.cross_entropy(Z, Y))
    value.backward()
    assert torch.isfinite(z.grad).all() and (z.grad[:, 2] == 0).all()


def test_logit_adjustment_tau_scales_the_prior_and_tau_zero_is_ce():
    prior = (COUNTS[COUNTS > 0] / COUNTS.sum()).log()
    expected = F.cross_entropy(Z[:, COUNTS > 0] + 0.5 * prior, torch.tensor([0, 0, 1, 2, 0, 1]))
    assert torch.allclose(loss("logit_adjustment", tau=0.5)(Z, Y), expected, atol=1e-6)
    assert torch.allclose(loss("logit_adjustment", tau=0.0)(Z, Y), F.cross_entropy(Z, Y))


def test_focal_matches_formula_and_gamma_zero_is_ce():
    p = F.softmax(Z, 1).gather(1, Y[:, None]).squeeze(1)
    expected = (-(1 - p) ** 2 * p.log()).mean()
    assert torch.allclose(loss("focal", gamma=2.0)(Z, Y), expected, atol=1e-6)
    assert torch.allclose(loss("focal", gamma=0.0)(Z, Y), F.cross_entropy(Z, Y), atol=1e-6)


def test_class_balanced_weights_are_effective_numbers():
    beta = 0.99
    w = (1 - beta) / (1 - beta ** COUNTS[[0, 1, 3]])
    w = w / w.sum() * 3
    got = effective_number_weights(COUNTS, beta)
    assert torch.allclose(got[[0, 1, 3]], w) and got[2] == 0
    per_sample = F.cross_entropy(Z, Y, reduction="none")
    expected = (per_sample * got[Y]).mean()
    assert torch.allclose(loss("class_balanced", beta=beta)(Z, Y), expected, atol=1e-6)
    assert torch.allclose(loss("class_balanced", beta=0.0)(Z, Y), F.cross_entropy(Z, Y), atol=1e-6)
    focal = build_loss({"name": "focal", "gamma": 2.0}, counts=COUNTS)
    assert not torch.allclose(loss("class_balanced", beta=beta, base="focal")(Z, Y), focal(Z, Y))


def test_ldam_margin_on_true_class_and_deferred_reweighting():
    margins = torch.tensor([50.0, 10.0, 1.0, 2.0]) ** -0.25
    margins = margins * (0.5 / margins[3])  # the rarest class held (n=2) gets the largest margin, 0.5
    adjusted = Z - F.one_hot(Y, 4) * margins[Y][:, None]
    early = build_loss({"name": "ldam_drw", "drw_start": 0.8}, counts=COUNTS, round=8, num_rounds=10)
    assert torch.allclose(early(Z, Y), F.cross_entropy(30 * adjusted, Y), atol=1e-5)
    late = build_loss({"name": "ldam_drw", "drw_start": 0.8}, counts=COUNTS, round=9, num_rounds=10)
    weights = effective_number_weights(COUNTS, 0.9999)
    assert torch.allclose(late(Z, Y), F.cross_entropy(30 * adjusted, Y, weight=weights), atol=1e-5)
    assert not torch.allclose(early(Z, Y), late(Z, Y))


def test_drw_starts_at_the_first_round_whose_zero_based_index_reaches_drw_start_times_rounds():
    """Official: weights from ``epoch // 160`` (0-based epoch 160, the 161st of 200). With 0.8 * 21 = 16.8 the
    first re-weighted round is ceil(16.8) + 1 = 18 (1-based), not floor(16.8) + 1 = 17."""
    def weighted(rnd, rounds):
        plain = build_loss({"name": "ldam_drw", "drw_start": 0.8}, counts=COUNTS, round=rnd, num_rounds=rounds)
        never = build_loss({"name": "ldam_drw", "drw_start": 1.0}, counts=COUNTS, round=rnd, num_rounds=rounds)
        return not torch.allclose(plain(Z, Y), never(Z, Y))

    assert [r for r in range(1, 22) if weighted(r, 21)][0] == 18
    assert [r for r in range(150, 201) if weighted(r, 200)][0] == 161


def test_logit_calibration_subtracts_tau_n_quarter_and_drops_absent_classes():
    present = COUNTS > 0
    expected = F.cross_entropy(Z[:, present] - 2.0 * COUNTS[present] ** -0.25, torch.tensor([0, 0, 1, 2, 0, 1]))
    assert torch.allclose(loss("logit_calibration", tau=2.0)(Z, Y), expected, atol=1e-6)
    assert torch.allclose(loss("logit_calibration", tau=0.0)(Z, Y), F.cross_entropy(Z, Y))


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "loss"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_loss_config_validates_and_builds(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["name"] == path.stem and cfg["name"] in LOSSES
    validate_loss({"loss": cfg, "model": {"name": "cnn", "head": "cosine"}})  # ldam_drw needs the cosine head
    value = build_loss(cfg, counts=COUNTS, round=1, num_rounds=2)(Z, Y)
    assert torch.isfinite(value)


def test_every_registered_loss_has_a_config():
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == set(LOSSES)


@pytest.mark.parametrize("bad,named", [
    ({"name": "nope"}, "loss.name='nope'"),
    ({"name": "focal", "gama": 2.0}, "loss.gama"),
    ({"name": "focal", "gamma": -1.0}, "loss.gamma=-1.0"),
    ({"name": "class_balanced", "beta": 1.0}, "loss.beta=1.0"),
    ({"name": "class_balanced", "base": "bce"}, "loss.base='bce'"),
    ({"name": "ldam_drw", "scale": 0.0}, "loss.scale=0.0"),
])
def test_bad_loss_options_are_refused_with_the_value_named(bad, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(".", r"\.")):
        validate_loss({"loss": bad, "model": {"name": "cnn", "head": "cosine"}})
