"""Test helper: a strategy's clients trained for two rounds one after another (``ClientAlgorithm.train``, as the
client step runs it) and as one cohort (``fedlt.core.client_step.train_group``, what a ``train.cohort`` message
runs), from the same start, with each client's personal arrays and extra state carried from round 1 to round 2."""

from __future__ import annotations

import numpy as np
import torch

from fedlt.api.client import ClientContext
from fedlt.core.client_step import train_group
from fedlt.data.federated import ClientData, DataPlan
from fedlt.models import build_model
from fedlt.seeding import torch_generator

PLAN = DataPlan(source_name="synthetic", source_cache="", split_path="", mean=(0.5,), std=(0.25,), num_classes=4,
                num_clients=3, augment_padding=1, augment_hflip=True)
CFG = {"optimizer": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, "local_epochs": 2, "batch_size": 8,
       "loss": {"name": "ce"}, "seed": 3, "num_rounds": 3, "strategy": {"name": "fedavg"}}


def synthetic_client(cid: int, n: int) -> ClientData:
    rng = np.random.default_rng(cid)
    y = torch.from_numpy(rng.integers(0, 4, n)).long()
    x = torch.from_numpy(rng.integers(0, 256, (n, 10, 10, 1), dtype=np.uint8))
    x[..., 0] = (x[..., 0] // 2 + (y * 30).view(-1, 1, 1).to(torch.uint8))  # learnable signal
    return ClientData(client_id=cid, train_x=x, train_y=y, test_x=torch.zeros(0, 1, 10, 10), test_y=y[:0],
                      train_counts=torch.bincount(y, minlength=4), test_counts=torch.zeros(4, dtype=torch.long),
                      plan=PLAN)


def strategy_model(server, cfg: dict) -> tuple[torch.nn.Module, dict]:
    """The strategy's model on the tiny CNN, with its frozen arrays loaded; and its start state."""
    torch.manual_seed(0)
    model = server.client_cls.build_model(build_model({"name": "cnn", "width": 4, "feature_dim": 16}, 1, 4), cfg)
    model.load_state_dict(server(cfg).frozen_arrays(model), strict=False)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def both_ways(server, cfg: dict, sizes=(21, 9, 3), rounds: int = 2, algo=None, batched_algo=None, received=None,
              uploads: list | None = None):
    """Yield (round, sequential, batched) per round; each a list over clients of (state dict, extra state).
    ``received``: the arrays every client gets from the server (``ctx.received``), the same each round.
    ``uploads``: when given, each round appends (sequential, batched), each a list over clients of its
    ``ctx.uploads``."""
    torch.set_num_threads(1)
    model, base = strategy_model(server, cfg)
    algo = algo or server.client_cls(cfg)
    batched_algo = batched_algo or algo
    datas = [synthetic_client(i, n) for i, n in enumerate(sizes)]
    seq_rec = bat_rec = [({}, {}) for _ in sizes]
    for rnd in range(1, rounds + 1):
        gens = lambda: [torch_generator(3, 2, rnd, c) for c in range(len(sizes))]  # noqa: E731
        seq, seq_up, bat_up = [], [], []
        for d, g, (personal, state) in zip(datas, gens(), seq_rec, strict=True):
            model.load_state_dict(base)
            model.load_state_dict(personal, strict=False)
            ctx = ClientContext(model=model, data=d, cfg=cfg, round=rnd, generator=g, state=dict(state),
                                received=dict(received or {}))
            algo.train(ctx)
            seq_up.append(dict(ctx.uploads))
            seq.append(({k: v.detach().clone() for k, v in model.state_dict().items()},
                        {k: v.detach().clone() for k, v in ctx.state.items()}))
        states, extra, _ = train_group(batched_algo, model, base, bat_rec, datas, gens(), cfg, rnd, "cpu",
                                       received=received, uploads=bat_up)
        if uploads is not None:
            uploads.append((seq_up, bat_up))
        bat = list(zip(states, extra, strict=True))
        yield rnd, seq, bat
        personal_of = lambda sd: {k: v for k, v in sd.items() if algo.is_personal(k)}  # noqa: E731
        seq_rec = [(personal_of(sd), st) for sd, st in seq]
        bat_rec = [(personal_of(sd), st) for sd, st in bat]
        base = {k: (seq[0][0][k] if algo.is_shared(k) else v) for k, v in base.items()}  # a common next start


def mismatches(seq, bat, atol: float = 1e-4, rtol: float = 1e-3) -> list[str]:
    """Keys (and extra-state keys) where the batched clients differ from the sequential ones: floats beyond the
    tolerance, integers (BatchNorm's num_batches_tracked) at all; extra state with other keys."""

    def same(a, b):
        return (torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol) if a.is_floating_point()
                else torch.equal(a, b))

    out = []
    for c, ((sa, ea), (sb, eb)) in enumerate(zip(seq, bat, strict=True)):
        out += [f"client {c}: {k}" for k in sa if not same(sa[k], sb[k])]
        if ea.keys() != eb.keys():
            out.append(f"client {c}: extra state keys {sorted(ea.keys() ^ eb.keys())[:3]}")
        else:  # float extra state (e.g. FedDyn's lambda_i, computed from the weights) within the same tolerance
            out += [f"client {c}: extra state {k}" for k in ea if not same(ea[k], eb[k])]
    return out
