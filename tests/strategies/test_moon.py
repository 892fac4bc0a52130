"""MOON: the local loss adds mu * the model-contrastive loss (global representation positive, the client's previous
local representation negative); the previous local model is client state; the network has the official
projection head."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from strategies.fedavg import FedAvgClient
from strategies.moon import PREV, MOONClient, ProjectedClassifier, Server, contrastive_loss
from tests.conftest import needs_fmnist
from tests.strategies import _inprocess
from tests.strategies.conftest import build, context, snapshot, tiny_cfg, tiny_data

STRATEGY = {"name": "moon", "mu": 5.0, "temperature": 0.5, "projection_dim": 6, "finetune_epochs": 0}


def cfg_for(**kw):
    strategy = {**STRATEGY, **{k: v for k, v in kw.items() if k in STRATEGY}}
    run = {k: v for k, v in kw.items() if k not in STRATEGY}
    return tiny_cfg(strategy, **{"batch_size": 8, **run})


def test_contrastive_loss_equals_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    z, z_glob, z_prev = (torch.randn(5, 7, generator=g) for _ in range(3))
    t = 0.5
    cos = lambda a, b: (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))  # noqa: E731
    pos, neg = torch.exp(cos(z, z_glob) / t), torch.exp(cos(z, z_prev) / t)
    expected = (-torch.log(pos / (pos + neg))).mean()
    assert torch.allclose(contrastive_loss(z, z_glob, z_prev, t), expected, atol=1e-6)


def test_contrastive_loss_is_zero_without_a_previous_model_and_flat_when_it_equals_the_global():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 6, generator=g, requires_grad=True)
    z_glob = torch.randn(4, 6, generator=g)
    alone = contrastive_loss(z, z_glob, None, 0.5)
    (grad,) = torch.autograd.grad(alone, z)
    assert float(alone.detach()) == 0.0 and float(grad.abs().max()) == 0.0  # first participation: no negative, no pull
    same = contrastive_loss(z, z_glob, z_glob.clone(), 0.5)
    (grad,) = torch.autograd.grad(same, z)
    assert float(same.detach()) == pytest.approx(math.log(2)) and float(grad.abs().max()) < 1e-6  # positive == negative


def test_network_is_backbone_projection_head_classifier():
    cfg = cfg_for()
    model = build(MOONClient, cfg)
    assert isinstance(model, ProjectedClassifier)
    lin1, _, lin2 = model.projection
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (8, 8, 6)
    assert model.head.in_features == 6 and model.head.out_features == 4
    x = tiny_data().test_x
    assert torch.equal(model(x), model.head(model.projection(model.backbone(x))))
    plain = build(MOONClient, cfg_for(projection_dim=0))  # FL-bench / PFLlib: the backbone features
    assert not hasattr(plain, "projection") and plain.head.in_features == 8


def run_client(cfg, state=None, global_model=None):
    model = build(MOONClient, cfg)
    if global_model is not None:
        model.load_state_dict(global_model)
    ctx = context(model, tiny_data(), cfg, rnd=2, state=state)
    metrics = MOONClient(cfg).train(ctx)
    return snapshot(model), ctx, metrics


def test_first_round_is_fedavg_and_the_trained_model_becomes_the_previous_one():
    cfg = cfg_for(local_epochs=2)
    trained, ctx, metrics = run_client(cfg)
    reference = build(MOONClient, cfg)
    FedAvgClient(cfg).train(context(reference, tiny_data(), cfg, rnd=2))
    assert metrics["train/contrastive_loss"] == 0.0
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in trained.items())
    assert set(ctx.state) == {PREV + k for k in trained}
    assert all(torch.equal(ctx.state[PREV + k], v) for k, v in trained.items())


def test_the_previous_local_model_repels_the_representation():
    """With a previous local model the loss has mu * contrastive term: the update differs from mu = 0, depends on
    which previous model the client kept, and the result is further from it (in representation) than FedAvg's."""
    cfg = cfg_for(local_epochs=3)
    first, ctx, _ = run_client(cfg)  # round 1: the client's own model
    glob = copy.deepcopy(first)  # a new global model: the first model nudged
    for k, v in glob.items():
        if v.is_floating_point() and "running" not in k:
            glob[k] = v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(len(k)))
    with_moon, _, metrics = run_client(cfg, state=ctx.state, global_model=glob)
    without, _, _ = run_client(cfg_for(local_epochs=3, mu=0.0), state=ctx.state, global_model=glob)
    other_prev = {PREV + k: v for k, v in snapshot(build(MOONClient, cfg)).items()}
    elsewhere, _, _ = run_client(cfg, state=other_prev, global_model=glob)
    assert metrics["train/contrastive_loss"] > 0
    differs = lambda a, b: any(not torch.allclose(a[k], b[k]) for k in a)  # noqa: E731
    assert differs(with_moon, without) and differs(with_moon, elsewhere)

    def similarity_to_prev(weights):
        model, prev = build(MOONClient, cfg).eval(), build(MOONClient, cfg).eval()
        model.load_state_dict(weights)
        prev.load_state_dict(first)
        x = tiny_data().test_x
        with torch.no_grad():
            return float(F.cosine_similarity(model.features(x), prev.features(x)).mean())

    assert similarity_to_prev(with_moon) < similarity_to_prev(without)


def test_server_is_sample_weighted_fedavg_with_the_projection_network():
    cfg = cfg_for()
    server = Server(cfg)
    arrays = server.initial_arrays(build(MOONClient, cfg))
    assert any(k.startswith("projection.") for k in arrays.keys())
    assert server.round_arrays(1) == {} and server.server_state() == {}


@needs_fmnist
def test_resume_is_exact_and_needs_the_previous_local_models(tmp_path):
    _, last = _inprocess.assert_resume_is_exact("moon", tmp_path, "clients", "participation=0.75")
    assert all(any(k.startswith(PREV) for k in recs["fedlt.state"]) for recs in last.clients.values())
