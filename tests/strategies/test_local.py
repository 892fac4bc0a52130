"""Local-only training: the whole model is personal, nothing is uploaded or averaged, no generic model."""

import pytest
import torch
from flwr.app import ArrayRecord

from strategies.local import LocalClient, Server
from tests.strategies.conftest import build, context, snapshot, tiny_cfg, tiny_data, train_reply

CFG = tiny_cfg({"name": "local"})


def test_every_model_key_is_personal_and_nothing_is_sent():
    server = Server(CFG)
    model = build(LocalClient, CFG)
    assert not any(server.is_shared(k) for k in model.state_dict())
    assert len(server.initial_arrays(model)) == 0


def test_server_never_averages_and_refuses_uploaded_arrays():
    server = Server(CFG)
    assert server.aggregate(1, ArrayRecord(), [train_reply(0, 5, {}), train_reply(1, 7, {})]) is None
    with pytest.raises(RuntimeError, match="nothing may be shared"):
        server.aggregate(1, ArrayRecord(), [train_reply(0, 5, {"head.weight": torch.zeros(2).numpy()})])


def test_generic_accuracy_is_not_applicable():
    scalars, detail = Server(CFG).generic_metrics(build(LocalClient, CFG), torch.zeros(2, 1, 8, 8),
                                                  torch.zeros(2, dtype=torch.long), 4, 8)
    assert scalars == {"generic/accuracy": None} and "not_applicable" in detail


def test_client_trains_its_own_model():
    model = build(LocalClient, CFG)
    before = snapshot(model)
    LocalClient(CFG).train(context(model, tiny_data(), CFG))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
