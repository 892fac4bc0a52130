"""FedAvgM: the server step is SGD with momentum on the pseudo-gradient (Hsu et al.; Flower's FedAvgM), called
from fedlt's ``aggregate`` hook (fedlt samples the clients); BatchNorm buffers are plain averages; momentum
survives a checkpoint."""

import numpy as np
import torch
from torch import nn

from strategies.fedavgm import Server
from tests.strategies.conftest import tiny_cfg, train_reply

STRATEGY = {"name": "fedavgm", "server_lr": 0.7, "server_momentum": 0.9, "finetune_epochs": 0}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def server():
    s = Server(tiny_cfg(STRATEGY, num_clients=2))
    return s


def run_round(s, rnd, arrays, shift):
    sent = {k: a.numpy() for k, a in arrays.items()}
    replies = [train_reply(c, n, {k: (x + d).astype(x.dtype) for k, x in sent.items()})
               for c, (n, d) in enumerate(zip((10, 30), (shift, shift)))]
    new = s.aggregate(rnd, arrays, replies)
    return sent, new


def test_server_update_is_sgd_with_momentum_over_two_rounds():
    s = server()
    arrays = s.initial_arrays(model())
    momentum = None
    for rnd, shift in ((1, 0.5), (2, -0.2)):
        sent, new = run_round(s, rnd, arrays, shift)
        for k, x in sent.items():
            if "running" in k or "num_batches" in k:
                np.testing.assert_allclose(new[k].numpy(), x + np.asarray(shift, x.dtype), rtol=1e-6)
                continue
            g = np.full_like(x, -shift)  # pseudo-gradient = sent - averaged
            mom = g if momentum is None else 0.9 * momentum[k] + g
            np.testing.assert_allclose(new[k].numpy(), x - 0.7 * mom, rtol=1e-5, atol=1e-7)
        momentum = {k: -np.full_like(x, shift) if momentum is None else 0.9 * momentum[k] - shift
                    for k, x in sent.items()}
        arrays = s.merge(arrays, new)
    # round 2 moved by 0.7 * (0.9 * -0.5 + 0.2) = -0.175, not by the plain average -0.2
    assert not np.allclose(new["0.bias"].numpy() - sent["0.bias"], -0.2)


def test_momentum_survives_server_state_round_trip():
    a, b = server(), server()
    arrays = a.initial_arrays(model())
    b.initial_arrays(model())
    _, first = run_round(a, 1, arrays, 0.5)
    arrays = a.merge(arrays, first)
    b.load_server_state(a.server_state())
    _, from_a = run_round(a, 2, arrays, -0.2)
    _, from_b = run_round(b, 2, arrays, -0.2)
    for k in from_a.keys():
        np.testing.assert_array_equal(from_a[k].numpy(), from_b[k].numpy())
