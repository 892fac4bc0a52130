"""FedETF: a fixed K x K simplex ETF (built on the server, sent once, never trained or uploaded), a learnable
projection + L2 normalisation + learnable temperature trained with balanced softmax (an absent class counted
as 1, as the official code), and the official personalization of a copy: one extra local round with balanced
softmax, then alternating prototype / projection fine-tuning."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fedlt.config import ConfigError
from strategies.fedetf import FedETFClient, Server
from tests.strategies.conftest import validate_strategy, build, changed, context, snapshot, tiny_cfg, tiny_data

DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/strategy/fedetf.yaml").read_text())
STRATEGY = {**DEFAULTS, "finetune_cycles": 1, "proto_epochs": 1, "proj_epochs": 1, "proto_lr": 0.1,
            "proj_lr": 0.05}
CFG = tiny_cfg(STRATEGY, batch_size=8)


def cfg_with(**strategy):
    return tiny_cfg({**STRATEGY, **strategy}, batch_size=8,
                    optimizer={"lr": 0.04, "momentum": 0.9, "weight_decay": 5e-4})


@pytest.fixture
def sgd_calls(monkeypatch):
    """Every torch.optim.SGD built meanwhile: (lr, momentum, weight_decay)."""
    calls = []
    real = torch.optim.SGD

    class Spy(real):
        def __init__(self, params, *args, **kwargs):
            super().__init__(params, *args, **kwargs)
            g = self.param_groups[0]
            calls.append((g["lr"], g["momentum"], g["weight_decay"]))

    monkeypatch.setattr(torch.optim, "SGD", Spy)
    return calls


def test_prototypes_form_a_simplex_etf():
    m = build(FedETFClient, CFG).etf.prototypes.detach()
    k = m.shape[0]
    gram = m.T @ m
    assert m.shape == (4, 4)
    assert torch.allclose(gram.diagonal(), torch.ones(k), atol=1e-5)
    off = gram[~torch.eye(k, dtype=bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / (k - 1)), atol=1e-5)


def test_etf_is_fixed_sent_once_and_never_uploaded():
    server = Server(CFG)
    arrays = server.initial_arrays(build(FedETFClient, CFG))
    assert set(server.frozen) == {"etf.prototypes"} and "etf.prototypes" not in arrays.keys()
    assert {"projection.weight", "scale"} <= set(arrays.keys())
    model = build(FedETFClient, CFG)
    before = snapshot(model)
    FedETFClient(CFG).train(context(model, tiny_data(), CFG))
    after = snapshot(model)
    assert torch.equal(before["etf.prototypes"], after["etf.prototypes"])
    assert changed(before, after, "projection.") and changed(before, after, "scale")


def test_logits_are_scaled_cosines_to_the_prototypes():
    model = build(FedETFClient, CFG)
    x = tiny_data().test_x
    with torch.no_grad():
        model.scale.fill_(3.0)
        h = F.normalize(model.projection(model.features(x)), dim=1)
        assert torch.allclose(model(x), 3.0 * h @ model.etf.prototypes, atol=1e-6)


def test_balanced_softmax_counts_an_absent_class_as_one():
    data = tiny_data((12, 6, 0, 2))  # class 2 absent
    loss = FedETFClient(CFG).loss_fn(context(build(FedETFClient, CFG), data, CFG))
    z, y = torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 3])
    log_prior = torch.tensor([12.0, 6.0, 1.0, 2.0]).log()  # official: where(n > 0, n, 1); log 1 = 0 for class 2
    assert log_prior[2] == 0
    value = loss(z, y)
    assert torch.allclose(value, F.cross_entropy(z + log_prior, y), atol=1e-6)
    value.backward()
    assert (z.grad[:, 2] > 0).all()  # the absent class keeps its share of the softmax (not -inf)


def test_personalization_runs_the_extra_round_first_then_alternates_with_new_optimisers(sgd_calls):
    cfg = cfg_with(finetune_cycles=2)
    assert DEFAULTS["extra_epochs"] is None  # = local_epochs, the official E
    assert FedETFClient.personalization_stage(cfg) == "after"
    FedETFClient(cfg).predictors(context(build(FedETFClient, cfg), tiny_data(), cfg))
    extra, proto, proj = (0.04, 0.9, 5e-4), (0.1, 0, 0), (0.05, 0.9, 5e-4)
    assert sgd_calls == [extra, proto, proj, proto, proj]


def test_extra_round_trains_body_projection_and_scale_of_a_copy_with_balanced_softmax():
    cfg = cfg_with(finetune_cycles=0)  # the extra round alone
    assert FedETFClient.personalization_stage(cfg) == "after"
    model = build(FedETFClient, cfg)
    before = snapshot(model)
    preds = FedETFClient(cfg).predictors(context(model, tiny_data(), cfg))
    assert list(preds) == ["finetuned", "global"]
    tuned = snapshot(preds["finetuned"])
    assert changed(before, tuned, "backbone.") and changed(before, tuned, "projection.")
    assert changed(before, tuned, "scale") and not changed(before, tuned, "etf.")
    # exactly one local round of the client's own training, on a copy
    reference = build(FedETFClient, cfg)
    FedETFClient(cfg).train(context(reference, tiny_data(), cfg))
    assert all(torch.equal(v, snapshot(reference)[k]) for k, v in tuned.items())
    assert not changed(before, snapshot(model), "", params_only=False)
    assert FedETFClient.personalization_stage(cfg_with(finetune_cycles=0, extra_epochs=0)) == "before"


def test_finetuning_alone_trains_only_prototypes_and_projection_of_a_copy():
    cfg = cfg_with(extra_epochs=0)
    model = build(FedETFClient, cfg)
    before = snapshot(model)
    preds = FedETFClient(cfg).predictors(context(model, tiny_data(), cfg))
    assert list(preds) == ["finetuned", "global"]
    tuned = snapshot(preds["finetuned"])
    assert changed(before, tuned, "etf.") and changed(before, tuned, "projection.")
    assert not changed(before, tuned, "backbone.") and not changed(before, tuned, "scale")
    assert not changed(before, snapshot(model), "", params_only=False)


def test_configured_head_other_than_linear_is_refused():
    validate_strategy(Server, CFG)
    with pytest.raises(ConfigError, match=r"strategy=fedetf with model\.head=cosine"):
        validate_strategy(Server, {**CFG, "model": {**CFG["model"], "head": "cosine"}})
    with pytest.raises(ConfigError, match="strategy.extra_epochs"):
        validate_strategy(Server, cfg_with(extra_epochs=-1))
