"""model.head: linear (default) or cosine (LDAM-DRW's NormedLinear), for any strategy whose classifier is the
configured head; loss=ldam_drw requires the cosine head."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.config import ConfigError
from fedlt.models import HEADS, NormedLinear, build_model
from fedlt.train.losses import validate_loss

MODEL = {"name": "cnn", "width": 4, "feature_dim": 8}
LDAM = {"name": "ldam_drw", "max_margin": 0.5, "scale": 30.0, "drw_start": 0.8, "drw_beta": 0.9999}


def test_default_head_is_linear_and_cosine_head_is_normed_linear():
    assert HEADS == ("linear", "cosine")
    assert isinstance(build_model(MODEL, 1, 5).head, nn.Linear)
    assert isinstance(build_model({**MODEL, "head": "linear"}, 1, 5).head, nn.Linear)
    head = build_model({**MODEL, "head": "cosine"}, 1, 5).head
    assert isinstance(head, NormedLinear)
    assert set(head.state_dict()) == {"weight"} and head.weight.shape == (5, 8)  # one row per class, no bias
    with pytest.raises(ValueError, match="model.head 'nope'"):
        build_model({**MODEL, "head": "nope"}, 1, 5)


def test_cosine_logits_are_cosines_of_feature_and_class_vector():
    torch.manual_seed(0)
    head = NormedLinear(8, 5)
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(5), atol=1e-5)  # official init: unit class vectors
    f = torch.randn(7, 8) * 10
    logits = head(f)
    expected = torch.stack([F.cosine_similarity(f, w[None].expand_as(f), dim=1) for w in head.weight], dim=1)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert logits.abs().max() <= 1 + 1e-6
    # invariant to the scale of features and of class vectors
    with torch.no_grad():
        head.weight.mul_(3.0)
    assert torch.allclose(head(f * 0.01), logits, atol=1e-5)


def test_cosine_model_trains_end_to_end():
    torch.manual_seed(0)
    model = build_model({**MODEL, "head": "cosine"}, 1, 3)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(30 * model(x), y).backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_ldam_drw_refuses_a_linear_head_with_a_clear_error():
    for model in ({"name": "cnn"}, {"name": "cnn", "head": "linear"}):
        with pytest.raises(ConfigError, match=r"loss=ldam_drw with model\.head=linear.*model\.head=cosine"):
            validate_loss({"loss": LDAM, "model": model})
    with pytest.raises(ConfigError, match=r"model\.head='round'"):
        validate_loss({"loss": LDAM, "model": {"name": "cnn", "head": "round"}})
    validate_loss({"loss": LDAM, "model": {"name": "cnn", "head": "cosine"}})
    validate_loss({"loss": {"name": "ce"}, "model": {"name": "cnn", "head": "cosine"}})  # any loss may use it


@pytest.mark.parametrize("strategy", ["fedavg", "fedper", "fedrep", "fedbabu", "fedrod", "ditto"])
def test_strategies_built_on_the_configured_head_use_the_cosine_head(strategy):
    from strategies import get_strategy

    cfg = {"seed": 1, "model": {**MODEL, "head": "cosine"}, "strategy": {"name": strategy}}
    model = get_strategy(strategy).client_cls.build_model(build_model(cfg["model"], 1, 4), cfg)
    assert isinstance(model.head, NormedLinear)
    x = torch.randn(3, 1, 8, 8)
    model.eval()
    assert model(x).shape == (3, 4)
