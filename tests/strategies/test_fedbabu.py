"""FedBABU: the random head is frozen during FL (sent once, never trained or uploaded); personalization
fine-tunes a copy before the local test, with its own optimiser (official: SGD lr 1e-3, momentum 0.9)."""

from pathlib import Path

import pytest
import torch
import yaml

from fedlt.config import ConfigError
from strategies.fedbabu import FedBABUClient, Server
from tests.strategies.conftest import validate_strategy, build, changed, context, snapshot, tiny_cfg, tiny_data

DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/strategy/fedbabu.yaml").read_text())


def cfg_for(part="full", epochs=2, **strategy):
    return tiny_cfg({**DEFAULTS, "finetune_epochs": epochs, "finetune_part": part, **strategy}, batch_size=8)


@pytest.fixture
def sgd_calls(monkeypatch):
    """Every torch.optim.SGD built meanwhile: (lr, momentum, weight_decay, number of parameters)."""
    calls = []
    real = torch.optim.SGD

    class Spy(real):
        def __init__(self, params, *args, **kwargs):
            super().__init__(params, *args, **kwargs)
            g = self.param_groups[0]
            calls.append((g["lr"], g["momentum"], g["weight_decay"], sum(len(g["params"]) for g in self.param_groups)))

    monkeypatch.setattr(torch.optim, "SGD", Spy)
    return calls


def test_finetuning_uses_its_own_optimiser_with_the_official_defaults(sgd_calls):
    cfg = tiny_cfg(DEFAULTS, batch_size=8, optimizer={"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-4})
    model = build(FedBABUClient, cfg)
    FedBABUClient(cfg).predictors(context(model, tiny_data(), cfg))
    n_params = len(list(model.parameters()))
    assert sgd_calls == [(1e-3, 0.9, 0.0, n_params)]  # the whole model, not the training optimiser (lr 0.1)
    assert DEFAULTS["finetune_epochs"] == 5 and DEFAULTS["finetune_part"] == "full"
    assert DEFAULTS["finetune_lr"] == 1e-3 and DEFAULTS["finetune_momentum"] == 0.9
    validate_strategy(Server, cfg)


def test_finetune_lr_and_momentum_are_used(sgd_calls):
    cfg = cfg_for(finetune_lr=0.02, finetune_momentum=0.0)
    FedBABUClient(cfg).predictors(context(build(FedBABUClient, cfg), tiny_data(), cfg))
    assert [c[:3] for c in sgd_calls] == [(0.02, 0.0, 0.0)]
    with pytest.raises(ConfigError, match="strategy.finetune_lr"):
        validate_strategy(Server, cfg_for(finetune_lr=0.0))
    with pytest.raises(ConfigError, match="strategy.finetune_momentum"):
        validate_strategy(Server, cfg_for(finetune_momentum=1.0))


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
    cfg = cfg_for("full", finetune_lr=0.1)
    model = build(FedBABUClient, cfg)
    before = snapshot(model)
    preds = FedBABUClient(cfg).predictors(context(model, tiny_data(), cfg))
    assert list(preds) == ["finetuned", "global"]
    tuned = snapshot(preds["finetuned"])
    assert changed(before, tuned, "head.") and changed(before, tuned, "backbone.")
    assert not changed(before, snapshot(model), "", params_only=False)  # the received model is untouched


def test_head_only_finetuning_keeps_the_body():
    cfg = cfg_for("head", finetune_lr=0.1)
    model = build(FedBABUClient, cfg)
    before = snapshot(model)
    tuned = snapshot(FedBABUClient(cfg).predictors(context(model, tiny_data(), cfg))["finetuned"])
    assert changed(before, tuned, "head.") and not changed(before, tuned, "backbone.")
