"""FedRoD: the body and generic head take a balanced-softmax step on the local counts; the personal head learns
on detached features from generic + personal logits; both predictions are logged."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fedlt.config import ConfigError
from strategies.fedrod import FedRoDClient, Server
from tests.strategies.conftest import build, context, tiny_cfg, tiny_data

CFG = tiny_cfg({"name": "fedrod"}, batch_size=64)  # one batch = all data (no augmentation): one exact step


def manual_step(model, data, generic_loss):
    """One SGD step computed here from the formulas (lr 0.1, no momentum)."""
    model = copy.deepcopy(model).train()
    x, y = data.normalise(data.train_x), data.train_y
    f = model.features(x)
    g = model.head(f)
    p = model.personal_head(f.detach())
    loss = generic_loss(g, y) + F.cross_entropy(g.detach() + p, y)
    loss.backward()
    with torch.no_grad():
        for q in model.parameters():
            q -= 0.1 * q.grad
    return model.state_dict()


def test_generic_head_and_body_take_a_balanced_softmax_step():
    data = tiny_data()
    model = build(FedRoDClient, CFG)
    counts = data.train_counts.float()
    present = counts > 0

    def bsm(g, y):  # CE(z + log n) over the classes the client holds
        return F.cross_entropy(g[:, present] + counts[present].log(), torch.cumsum(present, 0)[y] - 1)

    expected = manual_step(model, data, bsm)
    plain_ce = manual_step(model, data, F.cross_entropy)
    FedRoDClient(CFG).train(context(model, data, CFG))
    got = model.state_dict()
    for key in ("head.weight", "backbone.body.0.weight", "personal_head.weight"):
        assert torch.allclose(got[key], expected[key], atol=1e-6), key
    assert not torch.allclose(got["head.weight"], plain_ce["head.weight"], atol=1e-4)


def test_personal_head_does_not_train_the_body():
    data = tiny_data()
    model = build(FedRoDClient, CFG)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        model.personal_head.weight.mul_(5.0)  # a different personal head must not change the body's update
    FedRoDClient(CFG).train(context(model, data, CFG))
    FedRoDClient(CFG).train(context(reference, data, CFG))
    assert torch.equal(model.backbone.body[0].weight, reference.backbone.body[0].weight)


def test_personal_head_is_personal_and_both_predictions_are_reported():
    server = Server(CFG)
    assert not server.is_shared("personal_head.weight") and server.is_shared("head.weight")
    model = build(FedRoDClient, CFG)
    preds = FedRoDClient(CFG).predictors(context(model, tiny_data(), CFG))
    assert list(preds) == ["personal", "generic_head"]
    x = tiny_data().test_x
    with torch.no_grad():
        f = model.features(x)
        assert torch.allclose(preds["personal"](x), model.head(f) + model.personal_head(f))
        assert torch.allclose(preds["generic_head"](x), model.head(f))


@pytest.mark.parametrize("strategy", ["fedrod", "fedlc", "fedetf"])
def test_methods_defined_by_their_loss_refuse_another_loss(strategy):
    from strategies import get_strategy

    cfg = tiny_cfg({"name": strategy, "tau": 1.0, "counts": "local", "finetune_cycles": 0, "proto_epochs": 0,
                    "proj_epochs": 0, "proto_lr": 0.1, "proj_lr": 0.1}, loss={"name": "focal", "gamma": 2.0})
    with pytest.raises(ConfigError, match=f"loss=focal for strategy={strategy}"):
        get_strategy(strategy).validate_config(cfg)
