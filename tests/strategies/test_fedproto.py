"""FedProto: no weights are shared; a client uploads the per-class mean features of its last local epoch and their
counts, the server averages them per class (weighted by counts, or uniformly), the local loss pulls features
towards the global prototypes, and the ``proto`` predictor picks the nearest global prototype."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlt.config import ConfigError
from fedlt.train.local import batches
from strategies.fedproto import GLOBAL, MISSING, PRESENT, UP, FedProtoClient, Server, prototype_logits
from tests.conftest import needs_fmnist
from tests.core.probe import compose
from tests.strategies import _inprocess
from tests.strategies.conftest import build, context, reply_from, tiny_cfg, tiny_data, train_reply

STRATEGY = {"name": "fedproto", "lamda": 1.0, "proto_weighting": "counts"}


def cfg_for(**kw):
    strategy = {**STRATEGY, **{k: v for k, v in kw.items() if k in STRATEGY}}
    run = {k: v for k, v in kw.items() if k not in STRATEGY}
    return tiny_cfg(strategy, **{"batch_size": 8, "num_clients": 4, **run})


def received(protos: torch.Tensor, present) -> dict:
    return {GLOBAL: protos, PRESENT: torch.tensor(present, dtype=torch.float32)}


def test_client_uploads_the_per_class_mean_features_of_its_last_epoch():
    """With lr 0 the weights stay fixed, so the features of every batch can be recomputed (training mode: BatchNorm
    uses the batch's statistics, as during training)."""
    cfg = cfg_for(local_epochs=2, optimizer={"lr": 0.0, "momentum": 0.0, "weight_decay": 0.0})
    data = tiny_data((12, 6, 0, 2))
    model = build(FedProtoClient, cfg)
    ctx = context(model, data, cfg)
    FedProtoClient(cfg).train(ctx)
    assert set(ctx.uploads) == {UP + "proto", UP + "count"}

    ref = build(FedProtoClient, cfg).train()
    gen = torch.Generator().manual_seed(1)
    list(batches(data, 8, 1, gen))  # the first epoch's draws
    sums, counts = torch.zeros(4, 8), torch.zeros(4)
    with torch.no_grad():
        for x, y in batches(data, 8, 1, gen):
            sums.index_add_(0, y, ref.features(x))
            counts += torch.bincount(y, minlength=4)
    assert ctx.uploads[UP + "count"].tolist() == counts.tolist() == [12, 6, 0, 2]
    expected = sums / counts.clamp(min=1)[:, None]
    assert torch.allclose(ctx.uploads[UP + "proto"], expected, atol=1e-5)
    assert float(ctx.uploads[UP + "proto"][2].abs().sum()) == 0  # a class it does not hold


def test_local_loss_adds_lamda_times_mse_to_the_global_prototypes():
    """One full-batch step with lr 0: the logged loss is CE + lamda * MSE(f, target), target = the global
    prototype of each sample's class, or its own feature for a class without one (class 3 here)."""
    cfg = cfg_for(batch_size=64, optimizer={"lr": 0.0, "momentum": 0.0, "weight_decay": 0.0}, lamda=2.0)
    data = tiny_data((12, 6, 0, 2))
    protos = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    model = build(FedProtoClient, cfg)
    ctx = context(model, data, cfg)
    ctx.received.update(received(protos, [1, 1, 1, 0]))
    metrics = FedProtoClient(cfg).train(ctx)

    ref = build(FedProtoClient, cfg).train()
    ((x, y),) = list(batches(data, 64, 1, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        f = ref.features(x)
        target = f.clone()
        target[y != 3] = protos[y[y != 3]]
        expected = F.cross_entropy(ref.head(f), y) + 2.0 * F.mse_loss(f, target)
    assert metrics["train/loss"] == pytest.approx(float(expected), rel=1e-5)
    assert float(F.mse_loss(f, target)) > 0


def test_training_pulls_features_to_the_global_prototypes():
    protos = torch.zeros(4, 8)  # an easy target to measure: all features towards 0
    data = tiny_data((12, 6, 0, 2))

    def distance(lamda: float) -> float:
        cfg = cfg_for(local_epochs=5, lamda=lamda)
        model = build(FedProtoClient, cfg)
        ctx = context(model, data, cfg)
        ctx.received.update(received(protos, [1, 1, 1, 1]))
        FedProtoClient(cfg).train(ctx)
        return float((ctx.uploads[UP + "proto"][[0, 1, 3]] ** 2).mean())

    assert distance(5.0) < 0.5 * distance(0.0)


def test_server_averages_prototypes_per_class_weighted_by_counts_and_keeps_missing_classes():
    server = Server(cfg_for())
    arrays = server.initial_arrays(build(FedProtoClient, cfg_for()))
    assert len(arrays) == 0 and server.round_arrays(1) == {}  # nothing shared; no prototypes yet
    p0, p1 = torch.randn(4, 8), torch.randn(4, 8)
    c0, c1 = torch.tensor([6.0, 2.0, 0.0, 0.0]), torch.tensor([2.0, 0.0, 5.0, 0.0])
    replies = [train_reply(c, 5, {UP + "proto": p.numpy(), UP + "count": n.numpy()})
               for c, (p, n) in enumerate(((p0, c0), (p1, c1)))]
    assert server.aggregate(1, arrays, replies) is None
    assert all(len(r.content["arrays"]) == 0 for r in replies)  # uploads removed
    sent = server.round_arrays(2)
    assert torch.allclose(sent[GLOBAL][0], (6 * p0[0] + 2 * p1[0]) / 8, atol=1e-6)  # weighted by counts
    assert torch.allclose(sent[GLOBAL][1], p0[1]) and torch.allclose(sent[GLOBAL][2], p1[2])
    assert sent[PRESENT].tolist() == [1, 1, 1, 0]
    # round 2: only class 1 is reported; the others keep their prototypes
    p2 = torch.randn(4, 8)
    server.aggregate(2, arrays, [train_reply(0, 5, {UP + "proto": p2.numpy(),
                                                    UP + "count": np.array([0, 3, 0, 0], np.float32)})])
    now = server.round_arrays(3)
    assert torch.allclose(now[GLOBAL][1], p2[1]) and torch.equal(now[GLOBAL][[0, 2]], sent[GLOBAL][[0, 2]])
    assert now[PRESENT].tolist() == [1, 1, 1, 0]


def test_uniform_weighting_is_the_official_plain_mean():
    server = Server(cfg_for(proto_weighting="uniform"))
    p0, p1 = torch.randn(4, 8), torch.randn(4, 8)
    server.update_prototypes([p0, p1], [torch.tensor([6.0, 1, 0, 0]), torch.tensor([2.0, 0, 0, 0])])
    assert torch.allclose(server.protos[0], (p0[0] + p1[0]) / 2, atol=1e-6)


def test_whole_model_is_personal_and_reply_carries_only_prototypes():
    cfg = cfg_for()
    server = Server(cfg)
    model = build(FedProtoClient, cfg)
    assert all(FedProtoClient.is_personal(k) and not server.is_shared(k) for k in model.state_dict())
    ctx = context(model, tiny_data(), cfg)
    FedProtoClient(cfg).train(ctx)
    reply = reply_from(model, server, 0, 20, ctx.uploads)
    assert set(reply.content["arrays"].keys()) == {UP + "proto", UP + "count"}
    metrics, detail = server.generic_metrics(model, torch.zeros(2, 1, 8, 8), torch.zeros(2), 4, 2)
    assert metrics == {"generic/accuracy": None}


def test_proto_predictor_picks_the_nearest_global_prototype():
    f = torch.tensor([[0.0, 0.0], [2.0, 2.0], [9.0, 9.0]])
    protos = torch.tensor([[0.1, 0.0], [2.0, 1.0], [9.0, 9.0], [5.0, 5.0]])
    logits = prototype_logits(f, protos, torch.tensor([True, True, False, True]))
    assert torch.allclose(logits[0, :2], -torch.tensor([0.005, 2.5]))  # minus the mean squared distance
    assert (logits[:, 2] == MISSING).all()
    assert logits.argmax(1).tolist() == [0, 1, 3]  # class 2 has no global prototype

    cfg = cfg_for()
    model = build(FedProtoClient, cfg)
    ctx = context(model, tiny_data(), cfg)
    protos = torch.randn(4, 8)
    ctx.received.update(received(protos, [1, 1, 1, 1]))
    preds = FedProtoClient(cfg).predictors(ctx)
    assert list(preds) == ["proto", "model"]
    x = tiny_data().test_x
    with torch.no_grad():
        nearest = torch.cdist(model.features(x), protos).argmin(1)
        assert torch.equal(preds["proto"](x).argmax(1), nearest)
        assert torch.equal(preds["model"](x), model(x))


def test_prototypes_survive_server_state_round_trip():
    a, b = Server(cfg_for()), Server(cfg_for())
    a.update_prototypes([torch.randn(4, 8)], [torch.tensor([1.0, 0, 2, 0])])
    b.load_server_state(a.server_state())
    for k, v in a.round_arrays(2).items():
        assert torch.equal(v, b.round_arrays(2)[k])


@needs_fmnist
def test_resume_is_exact_and_needs_the_global_prototypes(tmp_path):
    full, last = _inprocess.assert_resume_is_exact("fedproto", tmp_path, "server")
    assert set(last.server_state) == {"protos", "present"} and len(full.final_arrays) == 0
    assert "personalized/proto/masked/accuracy" in full.rows[-1] and full.rows[-1]["generic/accuracy"] is None


def test_prototype_upload_is_declared_so_client_level_dp_refuses_it():
    assert "per-class mean features" in FedProtoClient.extra_uploads
    with pytest.raises(ConfigError, match="strategy=fedproto: its clients upload per-class mean features"):
        compose("strategy=fedproto", "privacy=dp_local")
