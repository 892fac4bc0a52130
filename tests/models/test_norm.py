"""``model.norm``: batch (default, every existing run unchanged) or group (GroupNorm in place of every
BatchNorm, the model privacy=dp_sgd needs)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.config import ConfigError
from fedlt.models import build_model
from fedlt.models.norm import group_count
from tests.core.probe import compose

SPECS = [({"name": "cnn", "width": 16, "feature_dim": 32}, 1, 16),
         ({"name": "resnet8", "widths": [8, 16, 32]}, 3, 16)]


def build(spec: dict, channels: int, norm: str | None):
    torch.manual_seed(0)
    return build_model({**spec, **({"norm": norm} if norm else {})}, channels, 10)


@pytest.mark.parametrize("spec,channels,size", SPECS)
def test_group_norm_replaces_every_batch_norm_and_trains(spec, channels, size):
    model = build(spec, channels, "group")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert groups and all(m.num_groups == group_count(m.num_channels) for m in groups)
    assert not list(model.buffers())  # no running statistics
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, channels, size, size, generator=g), torch.arange(8) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]  # it fits 8 random images
    model.eval()
    torch.testing.assert_close(model(x[:1]), model(x)[:1])  # a sample's output does not depend on its batch


@pytest.mark.parametrize("spec,channels,size", SPECS)
def test_default_is_batch_norm_with_unchanged_weights(spec, channels, size):
    default, batch, group = build(spec, channels, None), build(spec, channels, "batch"), build(spec, channels, "group")
    assert any(isinstance(m, nn.BatchNorm2d) for m in default.modules())
    a, b = default.state_dict(), batch.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # GroupNorm draws no random numbers: every other layer gets the same seeded initial weights
    c = group.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in c)


def test_group_count_is_gcd_with_32():
    assert [group_count(c) for c in (16, 32, 64, 48, 512, 3)] == [16, 32, 32, 16, 32, 1]


def test_norm_option_composes_and_is_validated():
    assert compose("experiment=smoke")["model"]["norm"] == "batch"
    assert compose("experiment=smoke", "model=resnet8", "model.norm=group")["model"]["norm"] == "group"
    with pytest.raises(ConfigError, match="model.norm"):
        compose("experiment=smoke", "model.norm=layer")
    with pytest.raises(ConfigError, match="strategy=fedbn with model.norm=group"):
        compose("experiment=smoke", "strategy=fedbn", "model.norm=group")
