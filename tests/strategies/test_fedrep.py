"""FedRep: head epochs first with the body frozen, then body epochs with the head frozen; by default the official
split of the local epochs (body 1, head the rest), so the head gets most of them."""

from pathlib import Path

import pytest
import torch
import yaml

from strategies.fedrep import FedRepClient, Server
from tests.strategies.conftest import validate_strategy, build, changed, context, snapshot, tiny_cfg, tiny_data

DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/strategy/fedrep.yaml").read_text())


def train(head_epochs, body_epochs):
    cfg = tiny_cfg({"name": "fedrep", "head_epochs": head_epochs, "body_epochs": body_epochs}, batch_size=8)
    model = build(FedRepClient, cfg)
    before = snapshot(model)
    FedRepClient(cfg).train(context(model, tiny_data(), cfg))
    return before, snapshot(model)


def phases(cfg) -> list[tuple[str, int]]:
    """(part, epochs) of each local_epochs call of one FedRep round, in order."""
    model = build(FedRepClient, cfg)
    head = {id(p) for p in model.head.parameters()}
    body = {id(p) for p in model.backbone.parameters()}
    calls = []

    class Spy(FedRepClient):
        def local_epochs(self, ctx, model, params, extra=None, epochs=None):
            ids = {id(p) for p in params}
            calls.append(("head" if ids == head else "body" if ids == body else "other", epochs))
            return super().local_epochs(ctx, model, params, extra, epochs)

    Spy(cfg).train(context(model, tiny_data(), cfg))
    return calls


def test_default_schedule_is_the_official_split_head_most_epochs_first():
    cfg = tiny_cfg(DEFAULTS, batch_size=8, local_epochs=5)
    assert phases(cfg) == [("head", 4), ("body", 1)]  # official: head_eps = local_ep - local_rep_ep, head first
    assert DEFAULTS["body_epochs"] == 1 and DEFAULTS["head_epochs"] is None
    validate_strategy(Server, cfg)


def test_official_script_split_and_explicit_head_epochs():
    cfg = tiny_cfg({**DEFAULTS, "body_epochs": 5}, batch_size=8, local_epochs=15)  # FedRep_cifar100_20shards.sh
    assert phases(cfg) == [("head", 10), ("body", 5)]
    cfg = tiny_cfg({**DEFAULTS, "head_epochs": 2}, batch_size=8, local_epochs=5)
    assert phases(cfg) == [("head", 2), ("body", 1)]


def test_one_local_epoch_still_trains_the_head():
    cfg = tiny_cfg(DEFAULTS, batch_size=8, local_epochs=1)
    assert phases(cfg) == [("head", 1), ("body", 1)]


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


def test_bad_epochs_are_refused():
    from fedlt.config import ConfigError

    with pytest.raises(ConfigError, match="strategy.body_epochs"):
        validate_strategy(Server, tiny_cfg({**DEFAULTS, "body_epochs": -1}))
    with pytest.raises(ConfigError, match="strategy.head_epochs"):
        validate_strategy(Server, tiny_cfg({**DEFAULTS, "head_epochs": 1.5}))
