"""FedRep: head epochs first with the body frozen, then body epochs with the head frozen."""

import torch

from strategies.fedrep import FedRepClient
from tests.strategies.conftest import build, changed, context, snapshot, tiny_cfg, tiny_data


def train(head_epochs, body_epochs):
    cfg = tiny_cfg({"name": "fedrep", "head_epochs": head_epochs, "body_epochs": body_epochs}, batch_size=8)
    model = build(FedRepClient, cfg)
    before = snapshot(model)
    FedRepClient(cfg).train(context(model, tiny_data(), cfg))
    return before, snapshot(model)


def test_head_phase_freezes_the_body():
    before, after = train(1, 0)
    assert changed(before, after, "head.") and not changed(before, after, "backbone.")


def test_body_phase_freezes_the_head():
    before, after = train(0, 1)
    assert changed(before, after, "backbone.") and not changed(before, after, "head.")


def test_head_is_trained_first_on_the_received_body():
    _, head_only = train(1, 0)
    _, both = train(1, 1)
    assert torch.equal(head_only["head.weight"], both["head.weight"])  # the body phase came after
    assert not torch.equal(head_only["backbone.body.0.weight"], both["backbone.body.0.weight"])
