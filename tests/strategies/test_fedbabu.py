"""FedBABU: the random head is frozen during FL (sent once, never trained or uploaded); personalization
fine-tunes a copy before the local test."""

import torch

from strategies.fedbabu import FedBABUClient, Server
from tests.strategies.conftest import build, changed, context, snapshot, tiny_cfg, tiny_data


def cfg_for(part="full", epochs=2):
    return tiny_cfg({"name": "fedbabu", "finetune_epochs": epochs, "finetune_part": part}, batch_size=8)


def test_head_is_frozen_during_federated_training():
    cfg = cfg_for()
    model = build(FedBABUClient, cfg)
    before = snapshot(model)
    FedBABUClient(cfg).train(context(model, tiny_data(), cfg))
    after = snapshot(model)
    assert not changed(before, after, "head.") and changed(before, after, "backbone.")


def test_head_is_sent_once_from_the_server_and_never_uploaded():
    cfg = cfg_for()
    server = Server(cfg)
    arrays = server.initial_arrays(build(FedBABUClient, cfg))
    assert set(server.frozen) == {"head.weight", "head.bias"}
    assert not any(k.startswith("head.") for k in arrays.keys())
    # the server's head is exactly the head every client builds (same seeded initial model)
    assert torch.equal(server.frozen["head.weight"], build(FedBABUClient, cfg).head.weight)


def test_finetuning_personalizes_a_copy_only():
    cfg = cfg_for("full")
    model = build(FedBABUClient, cfg)
    before = snapshot(model)
    preds = FedBABUClient(cfg).predictors(context(model, tiny_data(), cfg))
    assert list(preds) == ["finetuned", "global"]
    tuned = snapshot(preds["finetuned"])
    assert changed(before, tuned, "head.") and changed(before, tuned, "backbone.")
    assert not changed(before, snapshot(model), "", params_only=False)  # the received model is untouched


def test_head_only_finetuning_keeps_the_body():
    cfg = cfg_for("head")
    model = build(FedBABUClient, cfg)
    before = snapshot(model)
    tuned = snapshot(FedBABUClient(cfg).predictors(context(model, tiny_data(), cfg))["finetuned"])
    assert changed(before, tuned, "head.") and not changed(before, tuned, "backbone.")
