"""SCAFFOLD: the local gradient is corrected by c - c_i; with zero control variates the client step is FedAvg's
and the server step is an average; c_i follows option II; the server's c moves by the sum of the clients' dc_i
over N; c and c_i survive checkpoints."""

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedlt.config import ConfigError
from strategies.fedavg import FedAvgClient
from strategies.scaffold import C, C_I, DC, SCAFFOLDClient, Server, trainable
from tests.conftest import needs_fmnist
from tests.core.probe import compose
from tests.strategies import _inprocess
from tests.strategies.conftest import build, context, reply_from, snapshot, tiny_cfg, tiny_data, train_reply

STRATEGY = {"name": "scaffold", "server_lr": 1.0, "weighting": "uniform", "finetune_epochs": 0}


def cfg_for(**kw):
    strategy = {**STRATEGY, **{k: v for k, v in kw.items() if k in STRATEGY}}
    run = {k: v for k, v in kw.items() if k not in STRATEGY}
    return tiny_cfg(strategy, **{"batch_size": 8, "num_clients": 4, **run})


def random_like(model, scale: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(p.shape, generator=g) for k, p in trainable(model, SCAFFOLDClient.is_shared).items()}


def train(algo, cfg, c=None, c_i=None):
    model = build(algo, cfg)
    start = snapshot(model)
    ctx = context(model, tiny_data(), cfg, state={C_I + k: v for k, v in (c_i or {}).items()})
    ctx.received.update({C + k: v for k, v in (c or {}).items()})
    metrics = algo(cfg).train(ctx)
    return model, start, ctx, metrics


def test_zero_control_variates_train_exactly_as_fedavg_and_nonzero_ones_shift_every_step():
    cfg = cfg_for()
    fedavg, *_ = train(FedAvgClient, cfg)
    zero, *_ = train(SCAFFOLDClient, cfg)
    for k, v in fedavg.state_dict().items():
        assert torch.equal(v, zero.state_dict()[k]), k
    # one full-batch step of plain SGD: y = x - lr * (g + c - c_i), i.e. FedAvg's step shifted by -lr (c - c_i)
    one = cfg_for(batch_size=64)
    ref, *_ = train(FedAvgClient, one)
    c, c_i = random_like(ref, 0.1, 0), random_like(ref, 0.1, 1)
    model, _, _, metrics = train(SCAFFOLDClient, one, c, c_i)
    assert metrics["train/steps"] == 1
    lr = one["optimizer"]["lr"]
    for k in c:
        expected = ref.state_dict()[k] - lr * (c[k] - c_i[k])
        assert torch.allclose(model.state_dict()[k], expected, atol=1e-6), k
        assert not torch.allclose(model.state_dict()[k], ref.state_dict()[k])


def test_client_control_variate_follows_option_ii_and_the_upload_is_its_change():
    cfg = cfg_for(local_epochs=2)
    ref = build(SCAFFOLDClient, cfg)
    c, c_i = random_like(ref, 0.05, 2), random_like(ref, 0.05, 3)
    model, start, ctx, metrics = train(SCAFFOLDClient, cfg, c, c_i)
    k_steps, lr = metrics["train/steps"], cfg["optimizer"]["lr"]
    assert k_steps > 2
    assert set(ctx.uploads) == {DC + k for k in c} and set(ctx.state) == {C_I + k for k in c}
    for k in c:
        expected = c_i[k] - c[k] + (start[k] - model.state_dict()[k]) / (k_steps * lr)
        assert torch.allclose(ctx.state[C_I + k], expected, atol=1e-5), k
        assert torch.allclose(ctx.uploads[DC + k], expected - c_i[k], atol=1e-5), k



def test_with_momentum_the_control_variate_is_the_mean_gradient_not_the_inflated_model_change():
    """Under momentum 0.9, (x - y_i) / (K lr) is ~10x the mean gradient: option II read that way made SCAFFOLD's
    updates non-finite at cifar10_lt_quick's settings; c_i+ must stay the mean minibatch gradient."""
    cfg = cfg_for(local_epochs=2, optimizer={"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0})
    ref = build(SCAFFOLDClient, cfg)
    c, c_i = random_like(ref, 0.05, 2), random_like(ref, 0.05, 3)
    model, start, ctx, metrics = train(SCAFFOLDClient, cfg, c, c_i)
    k_steps, lr = metrics["train/steps"], cfg["optimizer"]["lr"]
    new_norm = sum(ctx.state[C_I + k].norm() ** 2 for k in c) ** 0.5
    option_ii = {k: c_i[k] - c[k] + (start[k] - model.state_dict()[k]) / (k_steps * lr) for k in c}
    option_ii_norm = sum(v.norm() ** 2 for v in option_ii.values()) ** 0.5
    assert option_ii_norm > 3 * new_norm  # the momentum-inflated estimate is several times larger
    # the mean gradient: re-derive it from the same minibatches with a plain-SGD twin (momentum 0, lr tiny)
    plain = cfg_for(local_epochs=2, optimizer={"lr": 1e-9, "momentum": 0.0, "weight_decay": 0.0})
    _, start_p, ctx_p, m_p = train(SCAFFOLDClient, plain, c, c_i)
    assert m_p["train/steps"] == k_steps
    # with a vanishing lr the model barely moves, so its mean gradient is g_i(x); the momentum run's c_i+ is the mean
    # gradient along its own trajectory: the same order of magnitude, never the 10x option II reading
    plain_norm = sum(ctx_p.state[C_I + k].norm() ** 2 for k in c) ** 0.5
    assert 0.2 * plain_norm < new_norm < 5 * plain_norm


def client_replies(server, sent: dict, shifts, sizes, dcs):
    """Replies whose arrays are the sent ones shifted (buffers included) plus a dc upload each."""
    out = []
    for cid, (shift, n, dc) in enumerate(zip(shifts, sizes, dcs, strict=True)):
        arrays = {k: (v + shift if v.dtype.kind == "f" else v + 2) for k, v in sent.items()}
        arrays.update({DC + k: v.numpy() for k, v in dc.items()})
        out.append(train_reply(cid, n, arrays))
    return out


def test_server_steps_the_model_by_eta_g_and_c_by_the_sum_of_dc_over_all_clients():
    cfg = cfg_for(server_lr=0.5)
    server = Server(cfg)
    model = build(SCAFFOLDClient, cfg)
    arrays = server.initial_arrays(model)
    assert set(server.c) == {k for k, _ in model.named_parameters()}
    assert all(float(v.abs().sum()) == 0 for v in server.c.values())
    assert set(server.round_arrays(1)) == {C + k for k in server.c}
    sent = {k: a.numpy() for k, a in arrays.items()}
    dcs = [random_like(model, 1.0, 10), random_like(model, 1.0, 11)]
    replies = client_replies(server, sent, (0.4, -0.2), (30, 10), dcs)
    new = server.aggregate(1, arrays, replies)
    assert not any(k.startswith("scaffold.") for r in replies for k in r.content["arrays"].keys())
    merged = server.merge(arrays, new)
    for k, x in sent.items():
        got = merged[k].numpy()
        assert got.dtype == x.dtype
        if k in server.c:  # x + eta_g * uniform mean of (y_i - x)
            np.testing.assert_allclose(got, x + 0.5 * (0.4 - 0.2) / 2, rtol=1e-6, atol=1e-6)
        elif x.dtype.kind == "f":  # BatchNorm statistics: the plain uniform average
            np.testing.assert_allclose(got, x + (0.4 - 0.2) / 2, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, x + 2)
    for k in server.c:  # c += (dc_0 + dc_1) / N, N = num_clients = 4 (not the 2 who replied)
        assert torch.allclose(server.c[k], (dcs[0][k] + dcs[1][k]) / 4, atol=1e-6)
        assert torch.equal(server.round_arrays(2)[C + k], server.c[k])


def test_sample_weighting_with_zero_control_variates_is_fedavgs_aggregate():
    cfg = cfg_for(weighting="samples")
    server = Server(cfg)
    arrays = server.initial_arrays(build(SCAFFOLDClient, cfg))
    replies, plain = [], []
    for cid, counts in enumerate(((12, 6, 0, 2), (0, 3, 9, 9))):
        model = build(SCAFFOLDClient, cfg)
        ctx = context(model, tiny_data(counts, client_id=cid, seed=cid), cfg)
        SCAFFOLDClient(cfg).train(ctx)
        replies.append(reply_from(model, server, cid, sum(counts), ctx.uploads))
        plain.append(reply_from(model, server, cid, sum(counts)).content)
    fedavg = server.merge(arrays, aggregate_arrayrecords(plain, "num-examples"))
    got = server.merge(arrays, server.aggregate(1, arrays, replies))
    for k in arrays.keys():
        np.testing.assert_allclose(got[k].numpy(), fedavg[k].numpy(), rtol=1e-5, atol=1e-6)


def test_server_control_variate_survives_server_state_round_trip():
    cfg = cfg_for()
    a, b = Server(cfg), Server(cfg)
    model = build(SCAFFOLDClient, cfg)
    arrays = a.initial_arrays(model)
    b.initial_arrays(model)
    sent = {k: v.numpy() for k, v in arrays.items()}
    a.aggregate(1, arrays, client_replies(a, sent, (0.1, 0.2), (5, 5),
                                          [random_like(model, 1.0, 20), random_like(model, 1.0, 21)]))
    state = a.server_state()
    assert set(state) == {"c"} and all(isinstance(v, torch.Tensor) for v in state["c"].values())
    b.load_server_state(state)
    assert all(torch.equal(a.round_arrays(2)[k], b.round_arrays(2)[k]) for k in a.round_arrays(2))
    assert any(float(v.abs().sum()) > 0 for v in b.c.values())


@needs_fmnist
def test_resume_is_exact_and_needs_the_server_control_variate(tmp_path):
    _, last = _inprocess.assert_resume_is_exact("scaffold", tmp_path, "server")
    assert set(last.server_state) == {"c"}
    assert all(any(k.startswith("scaffold.c_i.") for k in recs["fedlt.state"]) for recs in last.clients.values())


def test_control_variate_upload_is_declared_so_client_level_dp_refuses_it():
    assert "control variate" in SCAFFOLDClient.extra_uploads
    with pytest.raises(ConfigError, match="strategy=scaffold: its clients upload the change of the client's control"):
        compose("strategy=scaffold", "privacy=dp_central")
