"""One personalization protocol: methods without a personalization step of their own get the same fine-tuning
(a `finetuned` predictor beside the unchanged primary one); methods with their own step keep theirs; the budget
is recorded."""

from __future__ import annotations

import torch

from fedlt.core import personalize
from fedlt.core.client_step import predictors_of
from strategies import get_strategy
from tests.strategies.conftest import build, context, snapshot, tiny_cfg, tiny_data

ON = {"finetune_epochs": 2, "finetune_lr": 0.05, "finetune_momentum": 0.9, "finetune_parts": "all",
      "finetune_loss": "ce"}


def test_methods_without_their_own_step_get_the_shared_finetuning_beside_the_unchanged_model():
    client_cls = get_strategy("fedavg").client_cls
    cfg = tiny_cfg({"name": "fedavg"}, personalization=ON)
    model = build(client_cls, cfg)
    before = snapshot(model)
    ctx = context(model, tiny_data(), cfg)
    preds = predictors_of(client_cls(cfg), ctx)
    assert list(preds) == ["model", "finetuned"]  # the primary predictor is still the received model
    x = ctx.data.test_x
    assert not torch.allclose(preds["model"](x), preds["finetuned"](x))  # fine-tuning really trained
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # on a copy only
    off = tiny_cfg({"name": "fedavg"}, personalization={**ON, "finetune_epochs": 0})
    assert list(predictors_of(client_cls(off), context(build(client_cls, off), tiny_data(), off))) == ["model"]
    assert personalize.budget(client_cls, cfg) == {"step": "shared fine-tuning (predictor `finetuned`)",
                                                   "epochs": 2, "lr": 0.05, "momentum": 0.9, "parts": "all",
                                                   "loss": "ce"}


def test_head_only_finetuning_leaves_the_body_as_received():
    client_cls = get_strategy("fedavg").client_cls
    cfg = tiny_cfg({"name": "fedavg"}, personalization={**ON, "finetune_parts": "head"})
    model = build(client_cls, cfg)
    tuned = personalize.finetuned(client_cls(cfg), context(model, tiny_data(), cfg))
    for k, v in tuned.state_dict().items():
        if k.startswith("backbone.") and "running" not in k and "num_batches" not in k:
            assert torch.equal(v, model.state_dict()[k]), k
    assert not torch.equal(tuned.head.weight, model.head.weight)


def test_methods_with_their_own_step_keep_it():
    server = get_strategy("fedper")
    cfg = tiny_cfg({"name": "fedper"}, personalization=ON)
    assert server.client_cls.personalization_stage(cfg) == "after"
    assert not personalize.applies(server.client_cls, cfg)
    assert "finetuned" not in predictors_of(server.client_cls(cfg), context(build(server.client_cls, cfg),
                                                                            tiny_data(), cfg))
    assert personalize.budget(server.client_cls, cfg)["step"] == "the method's own"
