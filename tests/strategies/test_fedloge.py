"""FedLoGe: SSE-C geometry against a re-run of the official construction (ZackZikaiXiao/FedLoGe,
``util/etf_methods.py``: d=512, beta 0.6, seed 3407), the refinement's gradient against autograd, GLA-FR
closed forms, what travels in real Flower messages (SSE-C sent once and never uploaded, phi_k never uploaded,
backbone + psi uploaded), the ClientApp path against a direct call of the client update, and one end-to-end
run through Flower + Ray on real Fashion-MNIST-LT whose logs hold every FedLoGe metric."""

from __future__ import annotations

import json
import math
import numpy as np
import pytest
import torch
from torch import nn

from fedlt.config import ConfigError
from fedlt.validate import validate
from fedlt.api.client import ClientContext
from strategies.fedloge import (
    FedLoGeClient,
    FedLoGeNet,
    FeatureCache,
    Server,
    build_sse_c,
    etf_geometry,
    global_realignment,
    norm_transfer,
    refine_sse_c,
    simplex_etf,
    sparsity_mask,
    sse_c_loss,
)
from tests.conftest import ROOT, needs_fmnist, read_jsonl, run_fedlt

# ------------------------------------------------------------------------------------------------ helpers


def compose(*overrides: str) -> dict:
    """The validated run config exactly as `fedlt <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return validate(OmegaConf.to_container(cfg, resolve=True))


@pytest.fixture(scope="module")
def sse_c_k10():
    """The reference setting (d=512, K=10, beta 0.6, gamma 0.1, 10,000 Adam steps), built once."""
    return build_sse_c(512, 10, seed=3407)


# ------------------------------------------------------------------------------------------------ SSE-C


def test_refined_sse_c_matches_the_reference_geometry(sse_c_k10):
    w = sse_c_k10["weight"]
    assert w.shape == (10, 512) and w.dtype == torch.float32
    g = etf_geometry(w)
    # official construction, K=10 refined: column norm 0.1006 +- 1e-4, angles 96.38 / 96.24 / 96.73 (mean / min / max)
    assert abs(g["norm_mean"] - 0.1006) < 5e-4 and g["norm_std"] < 3e-4
    assert abs(g["angle_mean"] - 96.38) < 0.05
    assert 96.0 < g["angle_min"] and g["angle_max"] < 97.0
    assert g["zeros"] == int(0.6 * 512 * 10)  # exactly beta*d*K fixed zeros
    bias = sse_c_k10["bias"]
    assert bias.shape == (10,) and bias.abs().max() <= 1 / math.sqrt(512) and bias.abs().min() > 0


def test_pruning_alone_breaks_the_etf_and_the_mask_is_exact():
    gen = torch.Generator().manual_seed(0)
    etf = simplex_etf(512, 100, gen)
    dense = etf_geometry(etf.T)
    assert abs(dense["angle_mean"] - 90.58) < 0.01 and dense["angle_max"] - dense["angle_min"] < 1e-6
    assert abs(dense["norm_mean"] - 1.0) < 1e-9
    keep = sparsity_mask(512, 100, 0.6, gen)
    assert int((~keep).sum()) == int(0.6 * 512 * 100)
    pruned = etf_geometry((etf * keep).T)  # official, K=100 pruned: norm 0.63 +- 0.02, min angle ~80.5
    assert abs(pruned["norm_mean"] - 0.63) < 0.02 and pruned["angle_min"] < 84.0


def test_refinement_is_adam_on_the_documented_loss_with_masked_gradient():
    """The closed-form gradient + hand-written Adam equal torch.optim.Adam on autograd of ``sse_c_loss``."""
    gen = torch.Generator().manual_seed(5)
    d, k, gamma, lr, steps = 24, 7, 0.1, 1e-2, 25
    keep = sparsity_mask(d, k, 0.6, gen)
    w0 = (simplex_etf(d, k, gen) * keep).float()
    ours = refine_sse_c(w0, keep, gamma, steps, lr)
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        sse_c_loss(w, gamma).backward()
        w.grad.mul_(keep)
        opt.step()
    torch.testing.assert_close(ours, w.detach(), rtol=1e-4, atol=1e-6)
    assert torch.equal(ours == 0, ~keep)  # pruned entries stay exactly zero
    assert sse_c_loss(ours, gamma) < sse_c_loss(w0, gamma)


def test_sse_c_is_seeded_and_bias_is_optional():
    a, b = build_sse_c(16, 4, seed=1, steps=5), build_sse_c(16, 4, seed=1, steps=5)
    c = build_sse_c(16, 4, seed=2, steps=5)
    assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["bias"], b["bias"])
    assert not torch.equal(a["weight"], c["weight"])
    assert "bias" not in build_sse_c(16, 4, seed=1, steps=5, bias="none")
    with pytest.raises(ValueError, match="d >= number of classes"):
        simplex_etf(8, 10, torch.Generator())


# ------------------------------------------------------------------------------------------------ GLA-FR


def test_global_realignment_closed_form():
    psi_w = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
    psi_b = torch.tensor([0.2, -0.1])
    w, b = global_realignment(psi_w, psi_b, scale=1.7)
    torch.testing.assert_close(w, torch.tensor([[1.7 * 0.6, 1.7 * 0.8], [0.0, 1.7]]))
    torch.testing.assert_close(b, psi_b)
    _, b0 = global_realignment(psi_w, psi_b, scale=1.0, bias_mode="zero")
    torch.testing.assert_close(b0, torch.zeros(2))


def test_norm_transfer_closed_form():
    psi_w = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    psi_b = torch.tensor([0.5, 0.25])
    phi_w = torch.tensor([[0.0, 2.0], [0.3, 0.4]])  # row norms 2 and 0.5
    w, b = norm_transfer(psi_w, psi_b, phi_w)
    torch.testing.assert_close(w, torch.tensor([[6.0, 8.0], [0.5, 0.0]]))  # raw psi_c * ||phi_c||
    assert b is psi_b
    wn, _ = norm_transfer(psi_w, psi_b, phi_w, normalised_psi=True)
    torch.testing.assert_close(wn, torch.tensor([[1.2, 1.6], [0.5, 0.0]]))  # psi_c/||psi_c|| * ||phi_c||


class CountingIdentity(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def hand_model() -> FedLoGeNet:
    net = FedLoGeNet(CountingIdentity(), feature_dim=2, num_classes=2)
    with torch.no_grad():
        net.sse_c.weight.copy_(torch.tensor([[0.1, 0.0], [0.0, 0.1]]))
        net.sse_c.bias.copy_(torch.tensor([0.01, -0.01]))
        net.global_head.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
        net.global_head.bias.copy_(torch.tensor([0.5, 0.25]))
        net.personal_head.weight.copy_(torch.tensor([[0.0, 2.0], [0.3, 0.4]]))
        net.personal_head.bias.copy_(torch.tensor([-1.0, 1.0]))
    return net


STRATEGY = {"realign_scale": 1.7, "realign_bias": "keep", "generic_primary": "psi_realigned",
            "transfer_normalised_psi": False}


def test_personalized_predictors_are_phi_plus_norm_transferred_psi():
    net = hand_model()
    ctx = ClientContext(model=net, data=None, cfg={"seed": 0, "strategy": STRATEGY}, round=1,
                        generator=torch.Generator(), state={FedLoGeClient.PERSONAL_READY: torch.ones(1)})
    preds = FedLoGeClient(ctx.cfg).predictors(ctx)
    assert list(preds) == ["gla_fr", "phi_plus_psi", "sse_c"]  # primary first
    h = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    phi = h @ torch.tensor([[0.0, 2.0], [0.3, 0.4]]).T + torch.tensor([-1.0, 1.0])
    phi_prime = h @ torch.tensor([[6.0, 8.0], [0.5, 0.0]]).T + torch.tensor([0.5, 0.25])
    psi = h @ torch.tensor([[3.0, 4.0], [1.0, 0.0]]).T + torch.tensor([0.5, 0.25])
    with torch.no_grad():
        torch.testing.assert_close(preds["gla_fr"](h), phi + phi_prime)
        torch.testing.assert_close(preds["phi_plus_psi"](h), phi + psi)
        torch.testing.assert_close(preds["sse_c"](h), 0.1 * h + torch.tensor([0.01, -0.01]))
    assert net.backbone.calls == 1  # one backbone pass shared by the three predictors
    from fedlt.eval.predict import predict_logits

    x = torch.rand(10, 2)
    for fn in FedLoGeClient(ctx.cfg).predictors(ctx).values():  # as the ClientApp evaluates: batch by batch
        predict_logits(fn, x, batch_size=4)
    assert net.backbone.calls == 1 + 3  # 3 batches, each through the backbone once for all predictors


@pytest.mark.parametrize("primary", ["psi_realigned", "sse_c", "psi"])
def test_generic_predictors_primary_first_and_ga_fr(primary):
    net = hand_model()
    server = Server({"participation": 1.0, "num_clients": 1, "strategy": {**STRATEGY, "generic_primary": primary}})
    preds = server.generic_predictors(net)
    assert list(preds)[0] == primary and set(preds) == {"psi_realigned", "sse_c", "psi"}
    h = torch.tensor([[1.0, 2.0]])
    with torch.no_grad():
        torch.testing.assert_close(preds["psi_realigned"](h),
                                   h @ torch.tensor([[1.02, 1.36], [1.7, 0.0]]).T + torch.tensor([0.5, 0.25]))
        torch.testing.assert_close(preds["psi"](h), torch.tensor([[11.5, 1.25]]))


def test_feature_cache_only_reuses_the_same_unchanged_batch():
    backbone = CountingIdentity()
    cache = FeatureCache(backbone)
    x = torch.arange(12.0).view(6, 2)
    a, b = cache(x[0:3]), cache(x[3:6])
    assert cache(x[0:3]) is a and cache(x[3:6]) is b and backbone.calls == 2
    x.add_(1)  # in-place change: the version counter moves, so no stale hit
    torch.testing.assert_close(cache(x[0:3]), x[0:3])
    assert backbone.calls == 3


# ------------------------------------------------------------------------------------------------ config


def test_bad_fedloge_options_are_refused():
    for override, named in [("strategy.beta=1.0", "strategy.beta=1.0"), ("strategy.bias=random", "strategy.bias"),
                            ("strategy.generic_primary=phi", "strategy.generic_primary"),
                            ("strategy.realign_bias=drop", "strategy.realign_bias")]:
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            compose("strategy=fedloge", override)
    cfg = compose("strategy=fedloge", "model=cnn", "model.feature_dim=8")
    with pytest.raises(ConfigError, match="needs d >= K"):
        Server.validate_data(cfg, num_classes=10)
    Server.validate_data(compose("strategy=fedloge", "model=resnet34"), num_classes=100)  # 512 >= 100


@needs_fmnist
def test_too_narrow_features_are_refused_once_the_data_are_known(tmp_path):
    """The driver checks d >= K right after loading the data, before Ray starts (fedlt.config hook)."""
    from fedlt.experiment import prepare_run

    cfg = compose("experiment=smoke", "strategy=fedloge", "model.feature_dim=8")
    with pytest.raises(ConfigError, match="model=cnn has 8-d features but dataset=fmnist_lt has 10 classes"):
        prepare_run(cfg, tmp_path)
    assert not (tmp_path / "partition.json").exists()


OFFICIAL = {"seed": 3407, "num_rounds": 500, "local_epochs": 5, "batch_size": 8}
PRESETS = [(f"fedloge_{ds}_a{a}_if{f}", ds, a, f, 40, 0.3) for ds in ("cifar10", "cifar100") for a in ("0.5", "1")
           for f in (50, 100)]
PRESETS += [("fedloge_cifar10_a0.5_if100_p0.2", "cifar10", "0.5", 100, 40, 0.2),
            ("fedloge_cifar100_a0.5_if100_p0.2", "cifar100", "0.5", 100, 20, 0.2)]


@pytest.mark.parametrize("name,ds,alpha,imb,clients,participation", PRESETS, ids=[p[0] for p in PRESETS])
def test_presets_encode_the_official_protocol_for_any_strategy(name, ds, alpha, imb, clients, participation):
    cfg = compose(f"experiment={name}")
    assert {k: cfg[k] for k in OFFICIAL} == OFFICIAL
    assert cfg["optimizer"] == {"lr": 0.03, "momentum": 0.5, "weight_decay": 0.0}
    assert (cfg["dataset"]["name"], cfg["dataset"]["imbalance_factor"], cfg["partition"]["alpha"]) == (
        f"{ds}_lt", imb, float(alpha))
    assert (cfg["num_clients"], cfg["participation"], cfg["eval"]["every"]) == (clients, participation, 10)
    assert cfg["model"]["name"] == ("resnet18" if ds == "cifar10" else "resnet34")
    assert cfg["strategy"]["name"] == "fedloge"
    other = compose(f"experiment={name}", "strategy=fedavg")  # the same protocol for another method
    assert other["strategy"]["name"] == "fedavg"
    assert {k: v for k, v in other.items() if k != "strategy"} == {k: v for k, v in cfg.items() if k != "strategy"}


@pytest.mark.parametrize("name", ["cifar10_lt_cpu", "cifar100_lt_cpu"])
def test_cpu_presets_keep_the_official_rhythm(name):
    cfg = compose(f"experiment={name}")
    assert (cfg["local_epochs"], cfg["batch_size"], cfg["seed"], cfg["num_clients"]) == (5, 8, 3407, 40)
    assert cfg["optimizer"] == {"lr": 0.03, "momentum": 0.5, "weight_decay": 0.0}
    assert cfg["model"]["name"] == "resnet8" and cfg["model"]["widths"][-1] == 256  # d = 256 >= K
    Server.validate_data(cfg, num_classes=100)
    assert compose(f"experiment={name}", "strategy=fedavg")["strategy"]["name"] == "fedavg"


# ------------------------------------------------------------------------------------------------ Flower path

TINY = ("experiment=smoke", "strategy=fedloge", "num_clients=4", "participation=0.5", "strategy.refine_steps=200",
        "model.width=8", "model.feature_dim=32", "local_epochs=1", "batch_size=64", "seed=11")


@pytest.fixture(scope="module")
def flower_setup():
    from fedlt.data.federated import prepare

    cfg = compose(*TINY)
    plan, _, _ = prepare(cfg)
    return cfg, plan


def client_of_node(dispatch, msg) -> int:
    return dispatch.client_of_node[msg.metadata.dst_node_id]


def fresh_model(cfg, plan):
    from fedlt.core.model import build_run_model
    from fedlt.seeding import INIT, derive_seed

    torch.manual_seed(derive_seed(int(cfg["seed"]), INIT))
    return build_run_model(cfg, plan, FedLoGeClient)


@needs_fmnist
def test_client_app_round_trip_matches_direct_update_and_uploads_only_shared(flower_setup):
    from flwr.app import Context, RecordDict

    from fedlt.data.federated import client_data
    from fedlt.core.client_step import _RUNTIMES, FROZEN
    from fedlt.core.client_state import PERSONAL
    from fedlt.core.rounds import Dispatch, client_of
    from fedlt.flower.client_app import make_client_app
    from fedlt.seeding import TRAIN, derive_seed, torch_generator

    cfg, plan = flower_setup
    _RUNTIMES.clear()
    server = Server(cfg)
    model = fresh_model(cfg, plan)
    arrays = server.initial_arrays(model)
    assert set(server.frozen) == {"sse_c.weight", "sse_c.bias"}
    assert not any(k.startswith(("sse_c.", "personal_head.")) for k in arrays)  # never broadcast as global
    dispatch = Dispatch(server, cfg, hold_client_state=False)
    dispatch.node_of_client = {c: 100 + c for c in range(4)}
    dispatch.client_of_node = {100 + c: c for c in range(4)}
    app = make_client_app(cfg, plan)
    contexts = {c: Context(run_id=1, node_id=100 + c, node_config={"partition-id": c, "num-partitions": 4},
                           state=RecordDict(), run_config={}) for c in range(4)}

    msgs = dispatch.train_messages(1, arrays)
    assert all(set(m.content["frozen"].keys()) == {"sse_c.weight", "sse_c.bias"} for m in msgs)
    replies = [app(m, contexts[client_of_node(dispatch, m)]) for m in msgs]
    shared = {k for k in model.state_dict() if k.startswith(("backbone.", "global_head."))}
    for r in replies:
        up = r.content["arrays"]
        assert set(up.keys()) == shared  # backbone (BN buffers included) + psi; no SSE-C, no phi_k
    # direct call of the client update from the same starting point gives the same tensors
    cid = client_of(replies[0])
    direct = fresh_model(cfg, plan)
    for sd in (server.frozen, arrays.to_torch_state_dict()):
        direct.load_state_dict(sd, strict=False)
    ctx = ClientContext(model=direct, data=client_data(plan, cid), cfg=cfg, round=1,
                        generator=torch_generator(int(cfg["seed"]), TRAIN, 1, cid))
    torch.manual_seed(derive_seed(int(cfg["seed"]), TRAIN, 1, cid))  # as the ClientApp does
    FedLoGeClient(cfg).train(ctx)
    up = replies[0].content["arrays"].to_torch_state_dict()
    for k in shared:
        assert torch.equal(up[k], direct.state_dict()[k]), k
    personal = contexts[cid].state[PERSONAL].to_torch_state_dict()
    assert set(personal) == {"personal_head.weight", "personal_head.bias"}
    for k, v in personal.items():
        assert torch.equal(v, direct.state_dict()[k]), k

    # server: sample-weighted average of exactly the uploaded keys
    agg = server.aggregate(1, arrays, replies)
    n = np.array([float(next(iter(r.content.metric_records.values()))["num-examples"]) for r in replies])
    for key in ("global_head.weight", "backbone.body.1.running_mean"):  # psi and a BatchNorm buffer
        expect = sum(w * r.content["arrays"][key].numpy() for w, r in zip(n, replies, strict=True)) / n.sum()
        np.testing.assert_allclose(agg[key].numpy(), expect, rtol=1e-5, atol=1e-7)
    assert set(agg.keys()) == shared

    # round 2: the SSE-C is not sent again to clients that have it; phi_k continues from round 1; the SSE-C
    # in the trained model is still the server's, bit for bit (same values, same zero mask)
    arrays2 = server.merge(arrays, agg)
    msgs2 = dispatch.train_messages(2, arrays2)
    seen = {client_of_node(dispatch, m) for m in msgs}
    for m in msgs2:
        assert ("frozen" in m.content) == (client_of_node(dispatch, m) not in seen)
    for m in msgs2:
        c = client_of_node(dispatch, m)
        before = contexts[c].state[PERSONAL].to_torch_state_dict() if PERSONAL in contexts[c].state else None
        app(m, contexts[c])
        after = contexts[c].state[PERSONAL].to_torch_state_dict()
        assert before is None or not torch.equal(before["personal_head.weight"], after["personal_head.weight"])
        rt = next(iter(_RUNTIMES.values()))
        assert torch.equal(rt.model.sse_c.weight, server.frozen["sse_c.weight"])
        assert torch.equal(contexts[c].state[FROZEN].to_torch_state_dict()["sse_c.weight"],
                           server.frozen["sse_c.weight"])
    assert int((rt.model.sse_c.weight == 0).sum()) == int(0.6 * 32 * 10)
    _RUNTIMES.clear()


@needs_fmnist
def test_heads_never_move_the_backbone_and_the_sse_c_stays_frozen(flower_setup):
    """The official local update: the backbone sees only CE against the SSE-C (psi and phi_k train on detached
    features), with the run's SGD; the SSE-C never changes."""
    from fedlt.data.federated import client_data
    from fedlt.train.local import batches

    cfg, plan = flower_setup
    cfg = {**cfg, "optimizer": {**cfg["optimizer"], "weight_decay": 1e-3}}  # backbone uses the run's decay
    model = fresh_model(cfg, plan)
    model.load_state_dict({f"sse_c.{k}": v for k, v in build_sse_c(32, 10, seed=0, steps=10).items()}, strict=False)
    reference = fresh_model(cfg, plan)
    reference.load_state_dict(model.state_dict())
    frozen = model.sse_c.weight.clone()
    data = client_data(plan, 1)
    FedLoGeClient(cfg).train(ClientContext(model=model, data=data, cfg=cfg, round=1,
                                           generator=torch.Generator().manual_seed(3)))
    reference.train()
    opt = torch.optim.SGD(reference.backbone.parameters(), lr=cfg["optimizer"]["lr"],
                          momentum=cfg["optimizer"]["momentum"], weight_decay=1e-3)
    for x, y in batches(data, int(cfg["batch_size"]), int(cfg["local_epochs"]), torch.Generator().manual_seed(3)):
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    for k, v in reference.backbone.state_dict().items():
        assert torch.equal(v, model.backbone.state_dict()[k]), k
    assert torch.equal(model.sse_c.weight, frozen) and not model.sse_c.weight.requires_grad
    for head in ("global_head", "personal_head"):  # both heads did train
        assert not torch.equal(getattr(model, head).weight, getattr(reference, head).weight)


# ------------------------------------------------------------------------------------------------ end to end

GENERIC = ("sse_c", "psi", "psi_realigned")
PERSONAL_PREDICTORS = ("gla_fr", "phi_plus_psi")


@pytest.mark.e2e
@needs_fmnist
def test_fedloge_end_to_end_logs_every_metric(tmp_path):
    run_dir = tmp_path / "run"
    res = run_fedlt("experiment=smoke", "strategy=fedloge", "num_clients=4", "num_rounds=2", "eval.every=1",
                    "strategy.refine_steps=500", "model.width=8", "model.feature_dim=32", run_dir=run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    results = json.loads((run_dir / "results.json").read_text())
    keys = [f"generic/{g}/accuracy" for g in GENERIC]
    keys += [f"personalized/{p}/{v}/accuracy" for p in PERSONAL_PREDICTORS for v in ("masked", "unmasked")]
    keys += ["generic/accuracy", "personalized/accuracy", "personalized/masked/accuracy",
             "personalized/unmasked/accuracy", "train/loss"]
    assert [r["round"] for r in rows] == [1, 2]  # realignment evaluated at every evaluation round
    for row in [*rows, results]:
        missing = [k for k in keys if k not in row]
        assert not missing, missing
        assert row["generic/accuracy"] == row["generic/psi_realigned/accuracy"]  # strategy.generic_primary
        assert row["personalized/unmasked/accuracy"] == row["personalized/gla_fr/unmasked/accuracy"]
    assert results["personalized/stage"] == "after" and results["strategy"] == "fedloge"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert set(keys) <= set(acc.Tags()["scalars"])


def test_diagnostics_expose_a_collapsed_backbone():
    from tests.strategies.conftest import build, tiny_cfg

    """Every feature along one direction (the small-CNN collapse): energy share 1 and psi' sends every image to
    one class; varied features give a share well below 1."""
    cfg = tiny_cfg({"name": "fedloge", "beta": 0.6, "gamma": 0.1, "refine_steps": 0, "refine_lr": 1e-4,
                    "bias": "frozen_random", "realign_scale": 1.7, "realign_bias": "keep",
                    "transfer_normalised_psi": False, "generic_primary": "psi_realigned"},
                   model={"name": "cnn", "width": 4, "feature_dim": 8})
    model = build(FedLoGeClient, cfg)
    server = Server(cfg)
    x = torch.randn(64, 1, 8, 8)
    varied = server.diagnostics(model, x)
    assert set(varied) >= {"fedloge/feature_norm_mean", "fedloge/feature_mean_direction_energy",
                           "fedloge/psi_row_norm_min", "fedloge/psi_row_norm_max",
                           "fedloge/psi_realigned_top_class_share"}
    model.backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8))
    with torch.no_grad():
        model.backbone[1].weight.zero_()
        model.backbone[1].bias.fill_(1.0)  # every image -> the same feature vector
    collapsed = server.diagnostics(model, x)
    assert collapsed["fedloge/feature_mean_direction_energy"] == pytest.approx(1.0)
    assert collapsed["fedloge/psi_realigned_top_class_share"] == 1.0
    assert varied["fedloge/feature_mean_direction_energy"] < 0.999
