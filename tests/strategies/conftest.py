"""Helpers for strategy unit tests: a tiny in-memory client (random 8x8 images), the run config a strategy sees,
the client context the core would build, and hand-made train replies."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedlt.data.federated import ClientData, DataPlan
from fedlt.api.client import ClientContext
from fedlt.models import build_model
from fedlt.seeding import INIT, derive_seed

NUM_CLASSES = 4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models: one thread is fastest, and multi-threaded torch stalls on a busy 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_data(counts=(12, 6, 0, 2), client_id: int = 0, seed: int = 0, augment: bool = False) -> ClientData:
    """A client holding ``counts[c]`` random 8x8 grey images of class c (class-dependent brightness so that
    there is something to learn) and a small local test set."""
    g = torch.Generator().manual_seed(seed)
    k = len(counts)
    plan = DataPlan(source_name="tiny", source_cache="", split_path=f"tiny-{seed}", mean=(0.5,), std=(0.25,),
                    num_classes=k, num_clients=1, augment_padding=1 if augment else 0, augment_hflip=False)
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    x = (torch.rand(len(y), 8, 8, 1, generator=g) * 128 + (y * 40)[:, None, None, None]).clamp(0, 255)
    test_y = torch.arange(k).repeat(2)
    test_x = torch.randn(len(test_y), 1, 8, 8, generator=g)
    return ClientData(client_id=client_id, train_x=x.to(torch.uint8), train_y=y, test_x=test_x, test_y=test_y,
                      train_counts=torch.bincount(y, minlength=k), test_counts=torch.bincount(test_y, minlength=k),
                      plan=plan)


def tiny_cfg(strategy: dict, **overrides) -> dict:
    cfg = {"seed": 1, "num_clients": 3, "num_rounds": 4, "participation": 1.0, "local_epochs": 1,
           "batch_size": 64, "optimizer": {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
           "loss": {"name": "ce"}, "model": {"name": "cnn", "width": 4, "feature_dim": 8},
           "eval": {"batch_size": 64, "mask_absent_classes": False}, "strategy": dict(strategy)}
    cfg.update(overrides)
    return cfg


def build(algo_cls, cfg: dict, num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    """The run model exactly as client and server build it (seeded by the INIT stream)."""
    torch.manual_seed(derive_seed(int(cfg["seed"]), INIT))
    return algo_cls.build_model(build_model(cfg["model"], 1, num_classes), cfg)


def context(model, data: ClientData, cfg: dict, rnd: int = 1, state: dict | None = None) -> ClientContext:
    return ClientContext(model=model, data=data, cfg=cfg, round=rnd, generator=torch.Generator().manual_seed(rnd),
                         state=dict(state or {}))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})


def changed(before: dict, after: dict, prefix: str, params_only: bool = True) -> bool:
    """Whether any tensor under ``prefix`` differs (running BatchNorm statistics ignored unless asked)."""
    keys = [k for k in before if k.startswith(prefix)
            and not (params_only and ("running_" in k or "num_batches" in k))]
    assert keys, f"no keys under {prefix!r}"
    return any(not torch.equal(before[k], after[k]) for k in keys)


def train_reply(client: int, n: int, arrays: dict, metrics: dict | None = None) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "client-id": client, "train/loss": 1.0,
                                                   **(metrics or {})})})
    return Message(content=content, dst_node_id=client + 100, message_type=MessageType.TRAIN)


def reply_from(model: torch.nn.Module, server, client: int, n: int, uploads: dict | None = None) -> Message:
    """A train reply carrying what the core would send: the shared model state (+ uploads)."""
    arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if server.client_cls.is_shared(k)}
    arrays.update({k: v.detach().numpy().copy() for k, v in (uploads or {}).items()})
    return train_reply(client, n, arrays)


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Every test here may build Flower messages by hand."""


def validate_strategy(server, cfg: dict) -> None:
    """The strategy's checks as ``fedlt.validate`` runs them: its typed ``params``, then its cross-option rules."""
    from fedlt.config import check_params

    check_params(cfg, "strategy", server.params)
    server.validate_config(cfg)
