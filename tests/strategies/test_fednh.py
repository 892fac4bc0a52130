"""FedNH: a scaled-cosine prototype classifier whose prototypes start orthonormal (uniformly spread on the unit
sphere), stay frozen on the clients, and are moved on the server smoothly (rho * old + (1 - rho) * the count-weighted
mean of the clients' normalised class means, renormalised); the prototypes are server state and survive resume."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlt.config import ConfigError
from strategies.fednh import GLOBAL, UP, FedNHClient, Server, class_means, initial_prototypes
from tests.conftest import needs_fmnist
from tests.core.probe import compose
from tests.strategies import _inprocess
from tests.strategies.conftest import (build, changed, context, reply_from, snapshot, tiny_cfg, tiny_data,
                                       train_reply, validate_strategy)

STRATEGY = {"name": "fednh", "rho": 0.9, "fixed_scale": None}


def cfg_for(**kw):
    strategy = {**STRATEGY, **{k: v for k, v in kw.items() if k in STRATEGY}}
    run = {k: v for k, v in kw.items() if k not in STRATEGY}
    return tiny_cfg(strategy, **{"batch_size": 8, **run})


def unit_rows(k: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_initial_prototypes_are_orthonormal_unit_rows_drawn_from_the_run_seed():
    w = initial_prototypes(4, 8, seed=1)
    assert torch.allclose(w @ w.T, torch.eye(4), atol=1e-5)  # K <= d: pairwise orthogonal unit vectors
    assert torch.equal(w, initial_prototypes(4, 8, seed=1)) and not torch.equal(w, initial_prototypes(4, 8, seed=2))
    many = initial_prototypes(12, 8, seed=1)  # K > d: still unit rows
    assert torch.allclose(many.norm(dim=1), torch.ones(12), atol=1e-5)
    model = build(FedNHClient, cfg_for())
    assert torch.equal(model.head.prototype, w)


def test_head_is_the_scaled_cosine_to_the_prototypes_which_are_not_model_arrays():
    cfg = cfg_for()
    model = build(FedNHClient, cfg).eval()
    keys = set(model.state_dict())
    assert "head.scaling" in keys and not any("prototype" in k for k in keys)
    assert all(Server(cfg).is_shared(k) for k in keys)
    x = tiny_data().test_x
    with torch.no_grad():
        model.head.scaling.fill_(2.5)
        cos = F.normalize(model.features(x), dim=1) @ model.head.prototype.T
        assert torch.allclose(model(x), 2.5 * cos, atol=1e-6)
    fixed = build(FedNHClient, cfg_for(fixed_scale=30.0)).eval()
    assert "head.scaling" not in fixed.state_dict()
    with torch.no_grad():
        cos = F.normalize(fixed.features(x), dim=1) @ fixed.head.prototype.T
        assert torch.allclose(fixed(x), 30.0 * cos, atol=1e-5)


def test_client_trains_with_the_received_prototypes_frozen_and_uploads_its_own_class_means():
    """The upload is, per class, the normalised mean of the normalised features of the client's own training
    images under the trained model (eval mode), recomputed here directly; absent classes get a zero row."""
    cfg = cfg_for(local_epochs=2)
    data = tiny_data((12, 6, 0, 2))
    model = build(FedNHClient, cfg)
    before = snapshot(model)
    protos = unit_rows(4, 8, 0)
    ctx = context(model, data, cfg)
    ctx.received[GLOBAL] = protos
    FedNHClient(cfg).train(ctx)
    assert torch.equal(model.head.prototype, protos)  # trained against the received prototypes, unchanged
    assert changed(before, snapshot(model), "backbone.") and changed(before, snapshot(model), "head.scaling")
    assert set(ctx.uploads) == {UP + "proto", UP + "count"}
    assert ctx.uploads[UP + "count"].tolist() == [12, 6, 0, 2]

    model.eval()
    with torch.no_grad():
        f = F.normalize(model.features(data.normalise(data.train_x)), dim=1)
    for c in (0, 1, 3):
        expected = F.normalize(f[data.train_y == c].mean(0), dim=0)
        assert torch.allclose(ctx.uploads[UP + "proto"][c], expected, atol=1e-5)
    assert float(ctx.uploads[UP + "proto"][2].abs().sum()) == 0
    means, _ = class_means(model, data, batch_size=5)  # the batch size does not matter
    assert torch.allclose(means, ctx.uploads[UP + "proto"], atol=1e-5)

    reply = reply_from(model, Server(cfg), 0, 20, ctx.uploads)
    assert not any("prototype" in k for k in reply.content["arrays"].keys())


def test_server_moves_prototypes_smoothly_towards_the_count_weighted_class_means():
    cfg = cfg_for(rho=0.7)
    server = Server(cfg)
    model = build(FedNHClient, cfg)
    arrays = server.initial_arrays(model)
    old = server.round_arrays(1)[GLOBAL].clone()
    assert torch.equal(old, initial_prototypes(4, 8, 1))
    m0, m1 = unit_rows(4, 8, 1), unit_rows(4, 8, 2)
    n0, n1 = torch.tensor([6.0, 2.0, 0.0, 0.0]), torch.tensor([2.0, 0.0, 5.0, 0.0])
    shared = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    replies = [train_reply(0, 10, {**shared, UP + "proto": m0.numpy(), UP + "count": n0.numpy()}),
               train_reply(1, 30, {**shared, UP + "proto": m1.numpy(), UP + "count": n1.numpy()})]
    new_arrays = server.aggregate(1, arrays, replies)
    assert set(new_arrays.keys()) == set(arrays.keys())  # uploads removed before averaging
    new = server.round_arrays(2)[GLOBAL]
    mu0 = F.normalize((6 * m0[0] + 2 * m1[0]) / 8, dim=0)
    assert torch.allclose(new[0], F.normalize(0.7 * old[0] + 0.3 * mu0, dim=0), atol=1e-6)
    assert torch.allclose(new[1], F.normalize(0.7 * old[1] + 0.3 * m0[1], dim=0), atol=1e-6)
    assert torch.allclose(new[2], F.normalize(0.7 * old[2] + 0.3 * m1[2], dim=0), atol=1e-6)
    assert torch.equal(new[3], old[3])  # no participant holds class 3: unchanged

    gen = torch.Generator().manual_seed(5)
    for _ in range(20):  # prototypes stay unit-norm under repeated updates
        server.update_prototypes([F.normalize(torch.randn(4, 8, generator=gen), dim=1) * 3],
                                 [torch.randint(0, 4, (4,), generator=gen).float()])
        assert torch.allclose(server.protos.norm(dim=1), torch.ones(4), atol=1e-5)


def test_rho_one_never_moves_the_prototypes():
    server = Server(cfg_for(rho=1.0))
    server.initial_arrays(build(FedNHClient, cfg_for()))
    old = server.protos.clone()
    server.update_prototypes([unit_rows(4, 8, 3)], [torch.tensor([3.0, 1.0, 2.0, 4.0])])
    assert torch.allclose(server.protos, old, atol=1e-6)


def test_global_and_personal_predictors_use_the_current_global_prototypes():
    cfg = cfg_for()
    server = Server(cfg)
    server.initial_arrays(build(FedNHClient, cfg))
    server.protos = unit_rows(4, 8, 4)
    model = build(FedNHClient, cfg)
    assert list(server.generic_predictors(model)) == ["model"]
    assert torch.equal(model.head.prototype, server.protos)

    client = build(FedNHClient, cfg)
    ctx = context(client, tiny_data(), cfg)
    ctx.received[GLOBAL] = unit_rows(4, 8, 6)
    assert list(FedNHClient(cfg).predictors(ctx)) == ["model"]
    assert torch.equal(client.head.prototype, ctx.received[GLOBAL])
    FedNHClient(cfg).predictors(context(client, tiny_data(), cfg))  # nothing received: the initial prototypes
    assert torch.equal(client.head.prototype, initial_prototypes(4, 8, 1))
    assert FedNHClient.personalization_stage(cfg) == "before"


def test_server_state_round_trip():
    a, b = Server(cfg_for()), Server(cfg_for())
    a.initial_arrays(build(FedNHClient, cfg_for()))
    a.update_prototypes([unit_rows(4, 8, 7)], [torch.tensor([1.0, 0, 2, 0])])
    b.load_server_state(a.server_state())
    assert torch.equal(a.round_arrays(2)[GLOBAL], b.round_arrays(2)[GLOBAL])


def test_options_are_checked_and_the_head_must_be_the_default():
    cfg = cfg_for()
    validate_strategy(Server, cfg)
    for key, bad in (("rho", 1.5), ("rho", -0.1), ("fixed_scale", 0.0)):
        with pytest.raises(ConfigError, match=f"strategy.{key}"):
            validate_strategy(Server, cfg_for(**{key: bad}))
    with pytest.raises(ConfigError, match="model.head=cosine"):
        validate_strategy(Server, {**cfg, "model": {**cfg["model"], "head": "cosine"}})


def test_uploads_are_declared_so_client_level_dp_refuses_them():
    assert "per-class normalised mean features" in FedNHClient.extra_uploads
    with pytest.raises(ConfigError, match="strategy=fednh: its clients upload per-class normalised mean features"):
        compose("strategy=fednh", "privacy=dp_local")


@needs_fmnist
def test_resume_is_exact_and_removing_the_prototype_update_changes_the_result(tmp_path):
    """The prototypes are server state: a resumed run equals the uninterrupted one, and losing them changes it.
    The defining step: with rho = 1 (the prototypes never move) the run differs from the default rho = 0.9."""
    full, last = _inprocess.assert_resume_is_exact("fednh", tmp_path, "server")
    protos = last.server_state["protos"]
    assert torch.allclose(protos.norm(dim=1), torch.ones(len(protos)), atol=1e-5)
    start = initial_prototypes(*protos.shape, seed=int(_inprocess.config("fednh")["seed"]))
    assert not torch.allclose(protos, start, atol=1e-3)  # the prototypes moved

    frozen, _ = _inprocess.run_inprocess(_inprocess.config("fednh", "strategy.rho=1.0", rounds=2), tmp_path / "rho1")
    assert frozen.rows[0]["round"] == full.rows[0]["round"] == 2
    assert _inprocess.without_time(frozen.rows[:1]) != _inprocess.without_time(full.rows[:1])
    assert np.isfinite(full.rows[-1]["generic/accuracy"])
