"""FedDyn: the client minimises L_i(w) - <grad L_i(theta_i^{t-1}), w> + alpha/2 ||w - theta||^2 (gradient clipped),
keeps lambda_i = -grad L_i / alpha updated by its drift, and the server keeps h and sets theta = mean - h / alpha;
the official adaptive alpha scales alpha by the mean client size / n_i; h and lambda_i survive checkpoints."""

import numpy as np
import pytest
import torch

from fedlt.config import ConfigError
from fedlt.train.local import batches
from strategies import feddyn
from strategies.fedavg import FedAvgClient
from strategies.feddyn import LAMBDA, FedDynClient, Server, trainable
from tests.conftest import needs_fmnist
from tests.core.probe import compose
from tests.strategies import _inprocess
from tests.strategies.conftest import build, context, snapshot, tiny_cfg, tiny_data, train_reply

STRATEGY = {"name": "feddyn", "alpha": 0.1, "adaptive_alpha": False, "max_grad_norm": 10.0, "finetune_epochs": 0}


def cfg_for(**kw):
    strategy = {**STRATEGY, **{k: v for k, v in kw.items() if k in STRATEGY}}
    run = {k: v for k, v in kw.items() if k not in STRATEGY}
    return tiny_cfg(strategy, **{"batch_size": 8, "num_clients": 4, **run})


def random_lambda(model, seed: int, scale: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(p.shape, generator=g) for k, p in trainable(model, FedDynClient.is_shared).items()}


def train(algo, cfg, lam=None, data=None):
    model = build(algo, cfg)
    start = snapshot(model)
    ctx = context(model, data or tiny_data(), cfg, state={LAMBDA + k: v for k, v in (lam or {}).items()})
    metrics = algo(cfg).train(ctx)
    return model, start, ctx, metrics


def test_local_steps_descend_the_paper_objective_with_clipping():
    """Replays the client's batches on the paper's objective (autograd), clipping and SGD: the same weights."""
    cfg = cfg_for(local_epochs=2, max_grad_norm=1.0)
    lam = random_lambda(build(FedDynClient, cfg), 0)
    model, theta, ctx, _ = train(FedDynClient, cfg, lam)

    ref = build(FedDynClient, cfg).train()
    params = trainable(ref, FedDynClient.is_shared)
    alpha, lr = STRATEGY["alpha"], cfg["optimizer"]["lr"]
    grad_prev = {k: -alpha * lam[k] for k in lam}  # grad L_i(theta_i^{t-1}) = -alpha lambda_i
    factors = []
    for x, y in batches(tiny_data(), cfg["batch_size"], cfg["local_epochs"], torch.Generator().manual_seed(1)):
        objective = torch.nn.functional.cross_entropy(ref(x), y)
        objective = objective - sum((grad_prev[k] * p).sum() for k, p in params.items())
        objective = objective + alpha / 2 * sum(((p - theta[k]) ** 2).sum() for k, p in params.items())
        grads = torch.autograd.grad(objective, list(params.values()))
        # official: the clipped part is the loss gradient without alpha/2 ||w||^2 (that one is weight decay)
        unclipped = [g - alpha * p.detach() for g, p in zip(grads, params.values(), strict=True)]
        norm = torch.sqrt(sum((g**2).sum() for g in unclipped))
        factor = min(1.0, 1.0 / (float(norm) + 1e-6))
        factors.append(factor)
        with torch.no_grad():
            for (k, p), g in zip(params.items(), unclipped, strict=True):
                p -= lr * (factor * g + alpha * p)
    assert len(factors) > 2 and min(factors) < 1  # several steps, and the clipping was exercised
    for k in params:
        assert torch.allclose(model.state_dict()[k], ref.state_dict()[k], atol=1e-5), k


def test_zero_lambda_first_step_is_fedavgs_and_lambda_shifts_it_by_alpha_lambda():
    """At w = theta the regulariser's gradient is -grad L_i(theta_i^{t-1}) = alpha lambda_i only."""
    one = cfg_for(batch_size=64)
    fedavg, *_ = train(FedAvgClient, one)
    zero, *_ = train(FedDynClient, one)
    lam = random_lambda(fedavg, 1, scale=0.2)
    shifted, *_ = train(FedDynClient, one, lam)
    lr, alpha = one["optimizer"]["lr"], STRATEGY["alpha"]
    for k in lam:
        assert torch.allclose(zero.state_dict()[k], fedavg.state_dict()[k], atol=1e-6), k
        assert torch.allclose(shifted.state_dict()[k], fedavg.state_dict()[k] - lr * alpha * lam[k], atol=1e-6), k


def test_lambda_accumulates_the_clients_drift():
    cfg = cfg_for(local_epochs=2)
    lam = random_lambda(build(FedDynClient, cfg), 2)
    model, theta, ctx, _ = train(FedDynClient, cfg, lam)
    assert set(ctx.state) == {LAMBDA + k for k in lam} and not ctx.uploads
    for k in lam:  # grad L_i(theta_i^t) = grad L_i(theta_i^{t-1}) - alpha (theta_i^t - theta)
        assert torch.allclose(ctx.state[LAMBDA + k], lam[k] + model.state_dict()[k] - theta[k], atol=1e-6)


def test_adaptive_alpha_scales_by_mean_client_size_over_own_size(monkeypatch):
    monkeypatch.setattr(feddyn, "mean_client_size", lambda split_path: 40.0)
    data = tiny_data((12, 6, 0, 2))  # 20 samples: alpha_i = alpha * 40 / 20
    cfg = cfg_for(adaptive_alpha=True)
    assert feddyn.client_alpha(context(build(FedDynClient, cfg), data, cfg)) == pytest.approx(0.2)
    one = cfg_for(batch_size=64, adaptive_alpha=True)
    lam = random_lambda(build(FedDynClient, one), 3, scale=0.2)
    fedavg, *_ = train(FedAvgClient, one, data=data)
    adaptive, *_ = train(FedDynClient, one, lam, data=data)
    for k in lam:
        expected = fedavg.state_dict()[k] - one["optimizer"]["lr"] * 0.2 * lam[k]
        assert torch.allclose(adaptive.state_dict()[k], expected, atol=1e-6), k


def replies_for(sent: dict, thetas: list[dict], sizes) -> list:
    return [train_reply(c, n, {k: th.get(k, sent[k]) for k in sent}) for c, (th, n) in
            enumerate(zip(thetas, sizes, strict=True))]


def test_server_state_h_and_global_model_follow_the_paper_over_two_rounds():
    cfg = cfg_for()
    alpha, m = STRATEGY["alpha"], cfg["num_clients"]
    server = Server(cfg)
    model = build(FedDynClient, cfg)
    arrays = server.initial_arrays(model)
    h = {k: torch.zeros_like(v).double() for k, v in server.h.items()}
    assert set(h) == {k for k, _ in model.named_parameters()}
    rng = np.random.default_rng(0)
    for rnd in (1, 2):
        sent = {k: a.numpy() for k, a in arrays.items()}
        thetas = [{k: (v + rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + 1
                   for k, v in sent.items()} for _ in range(2)]
        new = server.merge(arrays, server.aggregate(rnd, arrays, replies_for(sent, thetas, (30, 10))))
        for k, x in sent.items():
            mean = (thetas[0][k].astype(np.float64) + thetas[1][k]) / 2  # unweighted, whatever the sizes
            if k in h:
                h[k] = h[k] - alpha / m * torch.from_numpy((thetas[0][k] - x) + (thetas[1][k] - x)).double()
                assert torch.allclose(server.h[k].double(), h[k], atol=1e-5), k
                np.testing.assert_allclose(new[k].numpy(), mean - h[k].numpy() / alpha, rtol=1e-5, atol=1e-4)
            elif x.dtype.kind == "f":  # BatchNorm statistics: plain average
                np.testing.assert_allclose(new[k].numpy(), mean, rtol=1e-6)
            else:
                np.testing.assert_array_equal(new[k].numpy(), x + 1)
        if rnd == 2:  # h carries over: the round-2 model is not the plain mean
            k = next(iter(h))
            assert not np.allclose(new[k].numpy(), (thetas[0][k] + thetas[1][k]) / 2, atol=1e-3)
        arrays = new


def test_h_survives_server_state_round_trip():
    cfg = cfg_for()
    a, b = Server(cfg), Server(cfg)
    arrays = a.initial_arrays(build(FedDynClient, cfg))
    b.initial_arrays(build(FedDynClient, cfg))
    sent = {k: v.numpy() for k, v in arrays.items()}
    moved = [{k: (v + 0.3).astype(v.dtype) for k, v in sent.items() if v.dtype.kind == "f"}]
    arrays = a.merge(arrays, a.aggregate(1, arrays, replies_for(sent, moved, (5,))))
    b.load_server_state(a.server_state())
    sent = {k: v.numpy() for k, v in arrays.items()}
    replies = replies_for(sent, [{k: (v - 0.1).astype(v.dtype) for k, v in sent.items() if v.dtype.kind == "f"}],
                          (5,))
    from_a = a.aggregate(2, arrays, replies)
    from_b = b.aggregate(2, arrays, replies)
    for k in from_a.keys():
        np.testing.assert_array_equal(from_a[k].numpy(), from_b[k].numpy())


@needs_fmnist
def test_resume_is_exact_and_needs_the_server_state_h(tmp_path):
    """Also runs the official adaptive alpha, which reads the mean client size from the run's split."""
    _, last = _inprocess.assert_resume_is_exact("feddyn", tmp_path, "server")
    assert set(last.server_state) == {"h"}
    assert all(any(k.startswith(LAMBDA) for k in recs["fedlt.state"]) for recs in last.clients.values())


@pytest.mark.parametrize("mode", ["dp_central", "dp_local"])
def test_client_level_dp_is_refused(mode):
    with pytest.raises(ConfigError, match=f"privacy={mode} with strategy=feddyn.*own drift"):
        compose("strategy=feddyn", f"privacy={mode}")
