"""LDAM-DRW trains when its scale s = 30 acts on cosine logits (model.head=cosine, as the official code), and does
not on the raw logits of a linear head (why loss=ldam_drw refuses one)."""

import pytest
import torch

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.data.augment import to_float
from fedlt.data.federated import ClientData, DataPlan
from fedlt.models import build_model
from fedlt.train.losses import validate_loss

K, ROUNDS = 4, 10
COUNTS = (60, 30, 12, 6)  # long-tailed local data


@pytest.fixture(autouse=True)
def one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def images(counts, seed):
    """8x8 images of noise, class c lighting up quadrant c: an easy task (a working loss reaches ~100 %)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    x = torch.rand(len(y), 8, 8, 1, generator=g) * 100
    for c in range(K):
        r, q = divmod(c, 2)
        x[y == c, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 150
    return x.to(torch.uint8), y


def client_data() -> ClientData:
    plan = DataPlan(source_name="quadrants", source_cache="", split_path="quadrants", mean=(0.5,), std=(0.25,),
                    num_classes=K, num_clients=1, augment_padding=0, augment_hflip=False)
    x, y = images(COUNTS, 0)
    tx, ty = images((20,) * K, 1)  # balanced test set
    return ClientData(client_id=0, train_x=x, train_y=y, test_x=to_float(tx, plan.mean, plan.std), test_y=ty,
                      train_counts=torch.bincount(y, minlength=K), test_counts=torch.bincount(ty, minlength=K),
                      plan=plan)


def run(head: str):
    """ROUNDS rounds of local LDAM-DRW training (DRW from round 9 on); per-round train loss, test accuracy."""
    cfg = {"seed": 1, "num_rounds": ROUNDS, "local_epochs": 2, "batch_size": 16,
           "optimizer": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
           "loss": {"name": "ldam_drw", "max_margin": 0.5, "scale": 30.0, "drw_start": 0.8, "drw_beta": 0.9999},
           "model": {"name": "cnn", "width": 8, "feature_dim": 32, "head": head}}
    data = client_data()
    torch.manual_seed(0)
    model = build_model(cfg["model"], 1, K)
    losses, accs = [], []
    for r in range(1, ROUNDS + 1):
        ctx = ClientContext(model=model, data=data, cfg=cfg, round=r, generator=torch.Generator().manual_seed(r))
        losses.append(ClientAlgorithm(cfg).train(ctx)["train/loss"])
        model.eval()
        with torch.no_grad():
            accs.append(float((model(data.test_x).argmax(1) == data.test_y).float().mean()))
    return cfg, losses, accs


def test_ldam_drw_on_a_cosine_head_trains():
    cfg, losses, accs = run("cosine")
    validate_loss(cfg)  # the supported configuration
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert max(losses) < 20, losses  # s * (cosine - margin) is bounded by 30 * 1.5
    assert losses[-1] < 1.0, losses
    assert accs[-1] > 0.9, accs  # chance is 0.25


def test_ldam_drw_on_a_linear_head_does_not_train():
    """The old behaviour (s = 30 on raw logits): the loss explodes and accuracy stays at chance."""
    _, losses, accs = run("linear")
    assert losses[0] > 1e3, losses
    assert accs[-1] <= 0.3, accs
