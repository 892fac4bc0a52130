"""Ratio Loss: the server trains the global model per class on its held-out balanced set, turns how each class
moves the classifier into per-class CE weights (alpha_c = 1 + 0.1 Ra_c), and clients train with them; the monitor
estimates the round's class composition from the clients' summed update."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fedlt.config import ConfigError
from strategies.fedavg import FedAvgClient
from strategies.ratioloss import (WEIGHTS, RatioLossClient, Server, auxiliary_updates, estimate_composition,
                                  ownership, ratio_weights)
from tests.conftest import needs_fmnist
from tests.strategies._inprocess import assert_resume_is_exact
from tests.strategies.conftest import build, context, reply_from, snapshot, tiny_cfg, tiny_data, validate_strategy

DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/strategy/ratioloss.yaml").read_text())
AUX = (8, 8, 8, 8)  # the server's balanced set: 8 images of each of the 4 classes


def cfg_for(**overrides):
    return tiny_cfg(DEFAULTS, batch_size=8, optimizer={"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0},
                    **overrides)


def test_defaults_are_the_official_ones():
    assert (DEFAULTS["weight_base"], DEFAULTS["weight_scale"], DEFAULTS["ratio_cap"],
            DEFAULTS["ownership_threshold"]) == (1.0, 0.1, 5000.0, 0.8)
    validate_strategy(Server, tiny_cfg(DEFAULTS))
    with pytest.raises(ConfigError, match="loss=focal"):
        validate_strategy(Server, tiny_cfg(DEFAULTS, loss={"name": "focal"}))


def test_weights_one_give_fedavg_and_the_ratio_weights_change_the_update():
    cfg = cfg_for()
    data = tiny_data((12, 6, 2, 2))
    fedavg = build(FedAvgClient, cfg)
    FedAvgClient(cfg).train(context(fedavg, data, cfg))
    for received in ({}, {WEIGHTS: torch.ones(4)}):  # round 1 (nothing yet) and weights forced to 1: FedAvg
        model = build(RatioLossClient, cfg)
        ctx = context(model, data, cfg)
        ctx.received = received
        RatioLossClient(cfg).train(ctx)
        assert all(torch.equal(a, b) for a, b in zip(snapshot(model).values(), snapshot(fedavg).values()))
    w = torch.tensor([1.0, 1.5, 4.0, 9.0])
    model = build(RatioLossClient, cfg)
    ctx = context(model, data, cfg)
    ctx.received = {WEIGHTS: w}
    z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 3, 0])
    loss = RatioLossClient(cfg).loss_fn(ctx)  # official Ratio_Cross_Entropy(size_average=True): a plain mean
    assert torch.allclose(loss(z, y), (w[y] * F.cross_entropy(z, y, reduction="none")).mean())
    RatioLossClient(cfg).train(ctx)
    assert not torch.allclose(model.head.weight, fedavg.head.weight)


def test_ownership_and_ratio_follow_the_official_rule():
    d = torch.zeros(3, 3, 2, dtype=torch.float64)
    d[0, 0] = torch.tensor([1.0, 1.0])  # class 0 owns row 0 (others move little there)
    d[1, 0] = torch.tensor([0.1, 0.85])  # ... except entry (0, 1): class 1 is within 0.8 of class 0 -> nobody
    d[2, 0] = torch.tensor([0.2, 0.0])
    d[1, 1] = torch.tensor([2.0, 2.0])
    d[0, 1] = torch.tensor([0.5, 0.5])
    owned = ownership(d, 0.8)
    assert owned[0, 0].tolist() == [True, False] and owned[1, 1].tolist() == [True, True] and not owned[2].any()
    w = ratio_weights(d, owned, 1.0, 0.1, 5000.0)
    # class 0: |1.0| / |mean(0.1, 0.2)| = 6.67; class 1: |4| / |(0.5+0.5+0+0)/2| = 8; class 2 owns nothing: 10
    assert torch.allclose(w, torch.tensor([1 + 0.1 * 1.0 / 0.15, 1 + 0.1 * 8.0, 2.0]))
    assert ratio_weights(d, owned, 1.0, 0.1, 5.0)[1] == pytest.approx(1.5)  # the cap


def test_neglected_classes_get_the_largest_weights():
    cfg = cfg_for()
    model = build(RatioLossClient, cfg)
    for rnd in (1, 2):  # a global model trained on data where classes 2 and 3 are rare
        FedAvgClient(cfg).train(context(model, tiny_data((60, 60, 3, 3), seed=2 + rnd), cfg, rnd=rnd))
    before = snapshot(model)
    deltas, steps = auxiliary_updates(model, tiny_data(AUX, seed=5), cfg, 1)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), snapshot(model).values()))  # left as it was
    assert steps.tolist() == [1.0] * 4  # 8 images, batch 8, one epoch
    w = ratio_weights(deltas, ownership(deltas, 0.8), 1.0, 0.1, 5000.0)
    assert min(w[2], w[3]) > max(w[0], w[1])


def test_monitor_points_at_the_over_represented_classes():
    cfg = tiny_cfg(DEFAULTS, batch_size=8, optimizer={"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0})
    model = build(RatioLossClient, cfg)
    start = snapshot(model)
    deltas, steps = auxiliary_updates(model, tiny_data(AUX, seed=5), cfg, 1)
    summed, n = torch.zeros_like(deltas[0]), 0
    for cid, counts in enumerate(((60, 40, 4, 2), (40, 60, 2, 4))):  # classes 0 and 1: 95 % of the round
        model.load_state_dict(start)
        FedAvgClient(cfg).train(context(model, tiny_data(counts, client_id=cid, seed=10 + cid), cfg))
        summed += (model.head.weight.detach() - start["head.weight"]).double()
        n += sum(counts)
    share = estimate_composition(deltas / steps[:, None, None], ownership(deltas, 0.8), summed, n, 8, 1)
    assert share.sum() == pytest.approx(1.0)
    assert set(share.argsort(descending=True)[:2].tolist()) == {0, 1}
    assert min(share[0], share[1]) > 2 * max(share[2], share[3])


def test_server_sends_the_weights_after_the_first_aggregation(flower_task_identity):
    cfg = cfg_for()
    server = Server(cfg)
    server.server_data = tiny_data(AUX, seed=5)
    model = build(RatioLossClient, cfg)
    sent = server.initial_arrays(model)
    assert server.round_arrays(1) == {}  # round 1: plain CE, as the official loop
    replies = []
    for cid in (0, 1):
        m = build(RatioLossClient, cfg)
        FedAvgClient(cfg).train(context(m, tiny_data((30, 20, 2, 1), client_id=cid, seed=cid), cfg))
        replies.append(reply_from(m, server, cid, 53))
    server.after_aggregate(1, server.merge(sent, server.aggregate(1, sent, replies)), replies)
    w = server.round_arrays(2)[WEIGHTS]
    assert w.shape == (4,) and (w >= 1.0).all() and not torch.equal(w, torch.ones(4))
    state = server.server_state()
    fresh = Server(cfg)
    fresh.load_server_state(state)
    assert torch.equal(fresh.round_arrays(2)[WEIGHTS], w)
    assert set(server.diagnostics(model, torch.zeros(1))) == {"ratioloss/weight_min", "ratioloss/weight_max",
                                                              "ratioloss/composition_max"}


@needs_fmnist
def test_resume_is_exact_and_needs_the_weights(tmp_path):
    full, ckpt = assert_resume_is_exact("ratioloss", tmp_path, "server")
    assert full.strategy.server_data.train_counts.tolist() == [2] * 10  # auto: min(10, 5 // 2) per class
    assert ckpt.server_state["weights"].shape == (10,)
    assert "ratioloss/weight_max" in full.rows[-1]
