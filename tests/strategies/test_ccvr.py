"""CCVR: the global covariance from the clients' uploads equals the pooled one; calibration on virtual features
changes the FedAvg head and raises balanced accuracy on a skewed toy problem; the server step reads nothing but
the uploaded statistics; the eval-uploads pass reaches every client; resume is exact; DP refuses the uploads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, RecordDict

from fedlt.config import ConfigError
from strategies.ccvr import (COUNT, COV, HEAD_B, HEAD_W, MEAN, Server, calibrate_head, class_statistics,
                             global_gaussians)
from tests.core.probe import compose, run_inprocess
from tests.strategies._inprocess import checkpoint_at, config, without_time

K, D = 4, 8


class Reply:
    """What the server hook reads of a reply: its content (``arrays``)."""

    def __init__(self, arrays: dict[str, torch.Tensor]):
        self.content = RecordDict({"arrays": ArrayRecord({k: v.contiguous() for k, v in arrays.items()})})


def skewed_clients(seed: int = 0, counts=((600, 100, 20, 0), (300, 150, 10, 6), (100, 50, 10, 4))):
    """Gaussian features of K classes (unit covariance, class means 1.2 apart in random directions) split over
    three clients with a long-tailed, non-IID class mix; returns [(features, labels)] and the class means."""
    g = torch.Generator().manual_seed(seed)
    centres = 1.2 * F.normalize(torch.randn(K, D, generator=g), dim=1) * 2
    clients = []
    for row in counts:
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(row)])
        clients.append((centres[labels] + torch.randn(len(labels), D, generator=g), labels))
    return clients, centres


def test_global_covariance_equals_the_pooled_covariance():
    clients, _ = skewed_clients()
    stats = [class_statistics(f, y, K) for f, y in clients]
    assert f"{COV}3" not in stats[0] and f"{COV}3" in stats[1]  # absent class: no covariance uploaded
    one = class_statistics(torch.randn(1, D), torch.tensor([3]), K)  # a single sample: count and mean only
    assert set(one) == {COUNT, MEAN}
    stats.append(one)
    feats = torch.cat([f for f, _ in clients] + [one[MEAN][3:4]]).double()
    labels = torch.cat([y for _, y in clients] + [torch.tensor([3])])
    total, mu, covs = global_gaussians(stats)
    for c in range(K):
        pooled = feats[labels == c]
        assert int(total[c]) == len(pooled)
        torch.testing.assert_close(mu[c], pooled.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(covs[c], torch.cov(pooled.T), rtol=1e-5, atol=1e-5)  # unbiased, N_c - 1


def balanced_accuracy(weight, bias, feats, labels) -> float:
    pred = (feats @ weight.T + bias).argmax(1)
    return float(torch.stack([(pred[labels == c] == c).float().mean() for c in range(K)]).mean())


def fedavg_like_head(clients) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head trained with plain CE on the pooled skewed features: biased towards the head classes."""
    x = torch.cat([f for f, _ in clients])
    y = torch.cat([lab for _, lab in clients])
    head = torch.nn.Linear(D, K)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(head(x), y).backward()
        opt.step()
    return head.weight.detach().clone(), head.bias.detach().clone()


def server_cfg(**strategy) -> dict:
    """Everything the server step may read: no data, no clients -- only seed, options and the optimiser."""
    return {"seed": 3, "batch_size": 32, "optimizer": {"lr": 0.05},
            "strategy": {"name": "ccvr", "virtual_per_class": 200, "calibration_epochs": 1, "calibration_lr": None,
                         "calibration_momentum": 0.0, "calibration_batch_size": None, **strategy}}


def test_calibrated_head_differs_from_fedavg_and_raises_balanced_accuracy_using_only_the_uploads():
    clients, centres = skewed_clients()
    weight, bias = fedavg_like_head(clients)
    replies = [Reply(class_statistics(f, y, K)) for f, y in clients]
    arrays = ArrayRecord({"head.weight": weight, "head.bias": bias})
    server = Server(server_cfg(calibration_epochs=5))  # the server sees the replies and the global head, nothing else
    sent = server.after_eval_uploads(4, arrays, replies)
    w, b = sent[HEAD_W], sent[HEAD_B]
    assert (w, b) == server.calibrated and not torch.allclose(w, weight)

    g = torch.Generator().manual_seed(99)  # a balanced test set from the same class distributions
    test_y = torch.arange(K).repeat_interleave(500)
    test_x = centres[test_y] + torch.randn(len(test_y), D, generator=g)
    before, after = balanced_accuracy(weight, bias, test_x, test_y), balanced_accuracy(w, b, test_x, test_y)
    assert after > before + 0.05, (before, after)

    again = Server(server_cfg(calibration_epochs=5)).after_eval_uploads(4, arrays, replies)
    assert torch.equal(again[HEAD_W], w)  # seeded by (seed, round): reproducible
    moved = [Reply({**class_statistics(f, y, K), MEAN: class_statistics(f + 1, y, K)[MEAN]}) for f, y in clients]
    other = Server(server_cfg(calibration_epochs=5)).after_eval_uploads(4, arrays, moved)
    assert not torch.allclose(other[HEAD_W], w)  # the head follows the uploaded statistics
    assert Server(server_cfg()).after_eval_uploads(4, arrays, []) == {}  # nobody answered: no calibration


def test_calibration_without_steps_keeps_the_fedavg_head():
    clients, _ = skewed_clients()
    weight, bias = fedavg_like_head(clients)
    feats, labels = torch.randn(40, D), torch.arange(K).repeat(10)
    w, b = calibrate_head(weight, bias, feats, labels, 0.1, 0.0, 0, 32, torch.Generator().manual_seed(0))
    assert torch.equal(w, weight) and torch.equal(b, bias)


def test_every_client_uploads_statistics_both_predictors_are_scored_and_resume_is_exact(tmp_path: Path,
                                                                                         monkeypatch):
    """One 2-round in-process run (evaluated at round 2): the eval-uploads pass reaches every client, sampled or
    not, with only ccvr.* statistics; ``ccvr`` (primary) and ``fedavg`` are scored, generic and personalized. The
    calibration is recomputed from fresh statistics at each evaluation (seeded by round, no server state): the
    run resumed from its round-1 checkpoint logs the same rows."""
    seen = []
    hook = Server.after_eval_uploads

    def spy(self, rnd, arrays, replies):
        seen.append((rnd, [sorted(r.content["arrays"].keys()) for r in replies]))
        return hook(self, rnd, arrays, replies)

    monkeypatch.setattr(Server, "after_eval_uploads", spy)
    cfg = config("ccvr", rounds=2)
    full, _ = run_inprocess(cfg, tmp_path / "full")
    assert [r for r, _ in seen] == [2]  # evaluation rounds only (eval.every=2)
    keys = seen[0][1]
    assert len(keys) == int(cfg["num_clients"])  # every client, sampled or not
    assert all(k[0] == COUNT and all(x.startswith("ccvr.") for x in k) for k in keys)
    row = full.rows[-1]
    assert row["generic/accuracy"] == row["generic/ccvr/accuracy"]
    assert row["generic/ccvr/balanced_accuracy"] != row["generic/fedavg/balanced_accuracy"]
    variant = "masked" if cfg["eval"]["mask_absent_classes"] else "unmasked"
    assert row["personalized/accuracy"] == row[f"personalized/ccvr/{variant}/accuracy"]
    assert "personalized/fedavg/masked/accuracy" in row and not full.failures
    assert checkpoint_at(tmp_path / "full", 2).server_state == {}

    state = checkpoint_at(tmp_path / "full", 1)
    resumed, _ = run_inprocess(cfg, tmp_path / "resumed", resume_from=state)
    assert without_time(resumed.rows) == without_time(full.rows)
    assert len(seen) == 2 and seen[1][0] == 2


def test_client_level_dp_refuses_the_unprotected_statistics():
    with pytest.raises(ConfigError, match="per-class feature means, covariances and counts"):
        compose("experiment=smoke", "strategy=ccvr", "privacy=dp_central")
    with pytest.raises(ConfigError, match="model.head"):
        compose("experiment=smoke", "strategy=ccvr", "model.head=cosine")


def test_under_client_level_dp_the_client_step_withholds_the_statistics():
    """Second line of defence behind the refusal: the eval-uploads reply carries no array under DP, only the count
    of withheld ones (the round loop then stops the run, as for undeclared ctx.uploads)."""
    from types import SimpleNamespace

    from flwr.app import Message

    from fedlt.core import client_step
    from fedlt.privacy.clipping import WITHHELD

    clients, _ = skewed_clients()
    stats = class_statistics(*clients[0], K)
    algo = SimpleNamespace(eval_uploads=lambda ctx: stats)
    ctx = SimpleNamespace(data=SimpleNamespace(num_train=7, client_id=2))
    msg = Message(content=RecordDict({}), dst_node_id=1, message_type="evaluate")
    for privacy, sent in (({"name": "none"}, len(stats)), ({"name": "dp_central"}, 0)):
        rt = SimpleNamespace(cfg={"privacy": privacy}, algorithm=algo)
        reply = client_step.eval_uploads(rt, ctx, msg)
        assert len(reply.content["arrays"]) == sent
        assert reply.content["metrics"].get(WITHHELD, 0) == (0 if sent else len(stats))

