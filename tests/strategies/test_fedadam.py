"""FedAdam: the server step is Adam on the averaged update (Reddi et al.; Flower's FedAdam), called from
fedlt's ``aggregate`` hook (fedlt samples the clients); BatchNorm buffers are plain averages; the moments survive
a checkpoint."""

import numpy as np
import torch
from torch import nn

from strategies.fedadam import Server
from tests.strategies.conftest import tiny_cfg, train_reply

STRATEGY = {"name": "fedadam", "server_lr": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001, "finetune_epochs": 0}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def server():
    s = Server(tiny_cfg(STRATEGY, num_clients=2))
    return s


def client_arrays(sent: dict, shift: float) -> dict:
    return {k: (v + shift).astype(v.dtype) if v.dtype.kind == "f" else v + 3 for k, v in sent.items()}


def run_round(s, rnd, arrays, shifts=(0.5, -0.1), weights=(30, 10)):
    assert len(s.sample_clients(rnd)) == 2
    sent = {k: a.numpy() for k, a in arrays.items()}
    replies = [train_reply(c, n, client_arrays(sent, d)) for c, (n, d) in enumerate(zip(weights, shifts))]
    new = s.aggregate(rnd, arrays, replies)
    return sent, new


def test_server_update_is_adam_on_the_pseudo_gradient_over_two_rounds():
    s = server()
    arrays = s.initial_arrays(model())
    b1, b2, eta, tau = 0.9, 0.99, 0.1, 0.001
    m = v = None
    for rnd in (1, 2):
        sent, new = run_round(s, rnd, arrays)
        average = 0.75 * 0.5 + 0.25 * -0.1  # sample-weighted mean shift of the two clients
        for k, x in sent.items():
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                expected = x + (average if x.dtype.kind == "f" else 3)
                np.testing.assert_allclose(new[k].numpy(), expected, rtol=1e-6)
                continue
            delta = np.full_like(x, average)
            m_k = (1 - b1) * delta if m is None else b1 * m[k] + (1 - b1) * delta
            v_k = (1 - b2) * delta**2 if v is None else b2 * v[k] + (1 - b2) * delta**2
            lr = eta * np.sqrt(1 - b2 ** (rnd + 1)) / (1 - b1 ** (rnd + 1))
            np.testing.assert_allclose(new[k].numpy(), x + lr * m_k / (np.sqrt(v_k) + tau), rtol=1e-5)
            assert not np.allclose(new[k].numpy(), x + average)  # not plain FedAvg
        m = {k: s.flower.m_t[k].copy() for k in s.flower.m_t}
        v = {k: s.flower.v_t[k].copy() for k in s.flower.v_t}
        arrays = s.merge(arrays, new)


def test_moments_survive_server_state_round_trip():
    a, b = server(), server()
    arrays = a.initial_arrays(model())
    b.initial_arrays(model())
    _, first = run_round(a, 1, arrays)
    arrays = a.merge(arrays, first)
    state = a.server_state()
    assert set(state) == {"m_t", "v_t"} and all(isinstance(t, torch.Tensor) for t in state["m_t"].values())
    b.load_server_state(state)
    _, from_a = run_round(a, 2, arrays)
    _, from_b = run_round(b, 2, arrays)
    for k in from_a.keys():
        np.testing.assert_array_equal(from_a[k].numpy(), from_b[k].numpy())
