"""Post-hoc predictors (``eval.posthoc``, fedlt/eval/posthoc.py): prior correction argmax z - tau log pi (generic:
global training prior; personalized: the client's) and tau-normalisation of a shared linear head, logged as extra
predictors beside every strategy's unchanged own; tau = 0 is exactly the unchanged model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import ServerAlgorithm
from fedlt.config import ConfigError, check_params
from fedlt.eval.generic import GenericEvaluation
from fedlt.eval.posthoc import (PosthocParams, log_prior_for_correction, prior_corrected, tau_normalised,
                                with_tau_norm)
from fedlt.models import build_model

COUNTS = [100, 10, 1]


def posthoc_cfg(enabled=True, tau=1.0, norm_tau=None) -> dict:
    return {"seed": 1, "num_rounds": 2, "eval": {"posthoc": {"enabled": enabled, "tau": tau, "norm_tau": norm_tau}}}


class Constant(nn.Module):
    """Logits [2, 1, 0] for every image: predicts class 0 always."""

    def forward(self, x):
        return torch.tensor([2.0, 1.0, 0.0]).expand(len(x), 3)


def test_prior_correction_subtracts_tau_log_prior_and_tau_zero_is_the_unchanged_model():
    torch.manual_seed(0)
    model = build_model({"name": "cnn", "width": 4, "feature_dim": 8}, 1, 3).eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        z = model(x)
        assert torch.equal(prior_corrected(model, COUNTS, 0.0)(x), z)  # bit for bit
        log_pi = torch.log(torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)).float()
        assert torch.allclose(prior_corrected(model, COUNTS, 0.7)(x), z - 0.7 * log_pi)
    corrected = prior_corrected(Constant(), COUNTS, 1.0)(x)
    assert corrected.argmax(1).tolist() == [2] * 6  # 0 - log(1/111) = 4.71 beats 2 - log(100/111) = 2.10


def test_absent_classes_get_the_rarest_present_prior_not_infinity():
    log_pi = log_prior_for_correction([50, 0, 5, 0])
    assert torch.isfinite(log_pi).all()
    assert log_pi[1] == log_pi[3] == log_pi[2] == pytest.approx(math.log(5 / 55))
    assert log_pi[0] == pytest.approx(math.log(50 / 55))


def test_generic_metrics_add_the_global_prior_corrected_predictor_beside_the_unchanged_one():
    y = torch.arange(3).repeat(4)
    x = torch.zeros(len(y), 1, 8, 8)
    evaluation = GenericEvaluation(y, 3, train_counts=COUNTS)

    class Server(ServerAlgorithm):
        def generic_predictors(self, model):
            return {"model": Constant()}

    plain, _ = Server(posthoc_cfg(enabled=False)).generic_metrics(None, x, y, 3, 4, evaluation)
    scalars, detail = Server(posthoc_cfg()).generic_metrics(None, x, y, 3, 4, evaluation)
    assert detail["model/per_class_predicted"] == [12, 0, 0]  # the strategy's own: unchanged, still primary
    assert detail["model+prior/per_class_predicted"] == [0, 0, 12]  # corrected by the global counts
    assert scalars["generic/accuracy"] == plain["generic/accuracy"] == pytest.approx(1 / 3)
    assert "generic/model+prior/accuracy" in scalars and not any("+prior" in k for k in plain)
    # no training counts known (a bare evaluation): nothing to correct with, nothing added
    bare, _ = Server(posthoc_cfg()).generic_metrics(None, x, y, 3, 4)
    assert not any("+prior" in k for k in bare)


# ------------------------------------------------------------------------------------------ personalized
def context(cfg: dict, counts=COUNTS) -> ClientContext:
    from fedlt.data.federated import ClientData, DataPlan

    plan = DataPlan(source_name="t", source_cache="", split_path="t", mean=(0.5,), std=(0.25,), num_classes=3,
                    num_clients=1, augment_padding=0, augment_hflip=False)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    data = ClientData(client_id=0, train_x=torch.zeros(len(y), 8, 8, 1, dtype=torch.uint8), train_y=y,
                      test_x=torch.zeros(3, 1, 8, 8), test_y=torch.arange(3), train_counts=torch.tensor(counts),
                      test_counts=torch.ones(3, dtype=torch.long), plan=plan)
    return ClientContext(model=Constant(), data=data, cfg=cfg, round=1, generator=torch.Generator())


class ViaSuper(ClientAlgorithm):
    def predictors(self, ctx):
        return {**super().predictors(ctx), "other": ctx.model}


class OwnOnly(ClientAlgorithm):
    def predictors(self, ctx):
        return {"personal": ctx.model}


class Inherits(ViaSuper):
    pass


@pytest.mark.parametrize(("algo", "names"), [(ClientAlgorithm, ["model"]), (ViaSuper, ["model", "other"]),
                                             (OwnOnly, ["personal"]), (Inherits, ["model", "other"])])
def test_every_predictors_override_gets_the_local_prior_corrected_primary_once(algo, names):
    from fedlt.core.client_step import predictors_of

    assert list(predictors_of(algo(posthoc_cfg(enabled=False)), context(posthoc_cfg(enabled=False)))) == names
    ctx = context(posthoc_cfg())
    preds = predictors_of(algo(ctx.cfg), ctx)
    assert list(preds) == [*names, f"{names[0]}+prior"]  # appended once, after the algorithm's own
    x = torch.zeros(2, 1, 8, 8)
    want = Constant()(x) - torch.log(torch.tensor(COUNTS, dtype=torch.float64) / 111).float()  # the client's prior
    assert torch.allclose(preds[f"{names[0]}+prior"](x), want)


TINY_RUN = ("dataset=synthetic_lt", "dataset.num_classes=4", "dataset.train_per_class=40", "dataset.test_per_class=10",
            "dataset.image_size=8", "dataset.imbalance_factor=10", "partition.alpha=100", "num_clients=3",
            "num_rounds=2", "participation=1.0", "local_epochs=1", "model.width=4", "model.feature_dim=8",
            "eval.every=1", "sampler=ros")


def test_a_run_logs_the_posthoc_predictors_and_leaves_the_strategys_own_metrics_unchanged(tmp_path):
    """The real round loop and client step (in-process grid): generic and personalized extras appear, through
    the unchanged core, and every metric of the strategy's own predictors is the same as without them."""
    from fedlt.core.inprocess import run_inprocess
    from fedlt.data.federated import prepare
    from strategies import get_strategy
    from tests.core.probe import compose

    rows = {}
    for enabled in (False, True):
        cfg = compose(*TINY_RUN, f"cache_dir={tmp_path}", f"eval.posthoc.enabled={str(enabled).lower()}",
                      "eval.posthoc.norm_tau=1.0")
        plan, _, _ = prepare(cfg)
        rows[enabled] = run_inprocess(cfg, plan, get_strategy("fedavg")).rows[-1]
    extra = {k for k in rows[True] if "+prior/" in k or "/taunorm/" in k}
    assert {"generic/model+prior/accuracy", "generic/taunorm/accuracy", "personalized/model+prior/masked/accuracy",
            "personalized/model+prior/unmasked/accuracy"} <= extra
    own = {k: v for k, v in rows[True].items() if k not in extra and not k.startswith("time/")
           and not k.startswith(("generic/model/", "personalized/model/"))}  # per-name copies: several predictors
    assert own == {k: v for k, v in rows[False].items() if not k.startswith("time/")}


# ------------------------------------------------------------------------------------------ tau-norm
def head_model() -> nn.Module:
    torch.manual_seed(1)
    model = build_model({"name": "cnn", "width": 4, "feature_dim": 8}, 1, 3).eval()
    with torch.no_grad():
        model.head.weight[0] *= 5.0  # a "head" class with a large norm, as long-tailed training produces
    return model


def test_tau_norm_zero_is_the_unchanged_head_and_one_normalises_every_class_vector():
    model = head_model()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(tau_normalised(model, 0.0)(x), model(x))
        w = model.head.weight
        want = F.linear(model.features(x), w / w.norm(dim=1, keepdim=True), model.head.bias)
        assert torch.allclose(tau_normalised(model, 1.0)(x), want)
        assert not torch.allclose(tau_normalised(model, 1.0)(x), model(x))


def test_tau_norm_is_offered_only_for_a_shared_linear_head():
    model = head_model()
    cfg = posthoc_cfg(norm_tau=0.5)
    assert list(with_tau_norm({"model": model}, model, cfg, head_shared=True)) == ["model", "taunorm"]
    assert list(with_tau_norm({"model": model}, model, cfg, head_shared=False)) == ["model"]  # personal / frozen
    cosine = build_model({"name": "cnn", "width": 4, "feature_dim": 8, "head": "cosine"}, 1, 3)
    assert list(with_tau_norm({"model": cosine}, cosine, cfg, head_shared=True)) == ["model"]
    assert list(with_tau_norm({"model": model}, model, posthoc_cfg(), head_shared=True)) == ["model"]  # null: off


def test_generic_metrics_log_tau_norm_for_fedavg_but_not_for_a_personal_head():
    from strategies.fedavg import Server as FedAvg
    from strategies.fedper import Server as FedPer

    model = head_model()
    y = torch.arange(3).repeat(2)
    x = torch.randn(len(y), 1, 8, 8)
    scalars, _ = FedAvg(posthoc_cfg(norm_tau=1.0)).generic_metrics(model, x, y, 3, 4, GenericEvaluation(y, 3, COUNTS))
    assert "generic/taunorm/accuracy" in scalars and "generic/model+prior/accuracy" in scalars
    model = FedPer.client_cls.build_model(model, {})  # adds the averaged_head its generic predictor uses
    scalars, _ = FedPer(posthoc_cfg(norm_tau=1.0)).generic_metrics(model, x, y, 3, 4, GenericEvaluation(y, 3, COUNTS))
    assert "generic/averaged_head+prior/accuracy" in scalars
    assert not any("taunorm" in k for k in scalars)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(("node", "message"), [
    ({"enabled": True, "tau": -1.0, "norm_tau": None}, "eval.posthoc.tau"),
    ({"enabled": "yes", "tau": 1.0, "norm_tau": None}, "eval.posthoc.enabled"),
    ({"enabled": True, "tau": 1.0, "norm_tau": -0.5}, "eval.posthoc.norm_tau"),
    ({"enabled": True, "tau": 1.0, "norm_tau": None, "prior": "global"}, "unknown option eval.posthoc.prior"),
])
def test_bad_posthoc_options_are_config_errors(node, message):
    with pytest.raises(ConfigError, match=message):
        check_params({"eval": {"posthoc": node}}, "eval.posthoc", PosthocParams, ignore=())


def test_posthoc_composes_from_the_command_line():
    from tests.core.probe import compose

    assert compose()["eval"]["posthoc"] == {"enabled": False, "tau": 1.0, "norm_tau": None}
    cfg = compose("eval.posthoc.enabled=true", "eval.posthoc.tau=0.5", "eval.posthoc.norm_tau=1.0")
    assert cfg["eval"]["posthoc"] == {"enabled": True, "tau": 0.5, "norm_tau": 1.0}
    with pytest.raises(ConfigError, match="eval.posthoc.tau"):
        compose("eval.posthoc.tau=-1")
