"""Shared-backbone personalized evaluation (``eval.personalized_path``, fedlt/core/shared_eval.py): on a tiny
in-process run, one backbone pass on the server gives the federated path's personalized metrics (every client's
own heads on its own local test rows) and the same generic metrics, without one evaluate message; a mix-up of
clients' heads or test rows is caught; methods whose clients' predictors differ are kept federated or refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import fedlt.core.client_step as client_step
import fedlt.core.shared_eval as shared_eval
from fedlt.config import ConfigError
from fedlt.core.client_state import ClientStateStore
from fedlt.core.shared_eval import SharedEvaluation, problem
from fedlt.models import build_model
from strategies import get_strategy
from tests.core.probe import compose, run_inprocess

TINY = ("dataset=synthetic_lt", "dataset.num_classes=10", "dataset.train_per_class=60", "dataset.test_per_class=20",
        "dataset.image_size=8", "dataset.imbalance_factor=10", "model.width=4", "model.feature_dim=16",
        "num_clients=4", "participation=0.5", "local_epochs=1", "eval.every=1", "num_rounds=2", "eval.batch_size=64",
        "checkpoint.every=0")  # batch 64 < the 200 test images: the generic evaluation's batches are slices
EXTRA = {"fedloge": ("strategy.refine_steps=200",), "fedavg": ("eval.posthoc.enabled=true",)}  # + model+prior
_RUNS: dict = {}


def run(strategy: str, path: str, tmp: Path, tag: str = "", patch=None):
    """The tiny run's outcome (memoised per module); ``patch(monkeypatch)`` alters the code under test."""
    key = (strategy, path, tag)
    if key not in _RUNS:
        cfg = compose(*TINY, f"strategy={strategy}", *EXTRA.get(strategy, ()), f"eval.personalized_path={path}")
        with pytest.MonkeyPatch.context() as mp:
            calls = []
            original = client_step.evaluate
            mp.setattr(client_step, "evaluate", lambda *a: calls.append(1) or original(*a))
            if patch is not None:
                patch(mp)
            outcome, _ = run_inprocess(cfg, tmp / "-".join(k for k in key if k))
        _RUNS[key] = (outcome, len(calls))
    return _RUNS[key]


def mismatches(a, b) -> list[str]:
    """Where two runs' evaluation rows and personalized detail differ: generic metrics must be equal bit for bit
    (the same computation), personalized ones to float tolerance (a backbone pass over other batches)."""
    out = []

    def close(x, y) -> bool:
        if isinstance(x, float) and isinstance(y, float):
            return x == y or (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return len(x) == len(y) and all(close(u, v) for u, v in zip(x, y, strict=True))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(close(x[k], y[k]) for k in x)
        return x == y

    for ra, rb in zip(a.rows, b.rows, strict=True):
        if set(ra) != set(rb):
            out.append(f"round {ra['round']}: keys {sorted(set(ra) ^ set(rb))}")
        for k in ra.keys() & rb.keys():
            if k.startswith("time/"):
                continue
            if k.startswith("generic/") and ra[k] != rb[k] and not (ra[k] != ra[k] and rb[k] != rb[k]):
                out.append(f"round {ra['round']}: {k} {ra[k]} != {rb[k]}")
            elif not close(ra[k], rb[k]):
                out.append(f"round {ra['round']}: {k} {ra[k]} != {rb[k]}")
    if not close(a.detail["personalized"], b.detail["personalized"]):
        out.append("eval_detail personalized differs")
    return out


@pytest.mark.parametrize("strategy", ["fedavg", "fedloge", "fedrod"])
def test_shared_backbone_gives_the_federated_records_without_evaluate_messages(strategy, tmp_path_factory):
    tmp = tmp_path_factory.getbasetemp()
    federated, sent_federated = run(strategy, "federated", tmp)
    shared, sent_shared = run(strategy, "shared_backbone", tmp)
    assert sent_federated == 2 * 4 and sent_shared == 0  # every client per evaluation round / none
    assert [r["eval/clients"] for r in shared.rows] == [4, 4]
    assert any(k.startswith("personalized/") for k in shared.rows[-1])
    if strategy == "fedavg":  # eval.posthoc's prior-corrected predictor, personalized too
        assert "personalized/model+prior/masked/accuracy" in shared.rows[-1]
    assert mismatches(federated, shared) == []
    # training is untouched: the same global model at the end
    fa, fb = federated.final_arrays.to_torch_state_dict(), shared.final_arrays.to_torch_state_dict()
    assert all((fa[k] == fb[k]).all() for k in fa)


def test_a_mixup_of_clients_heads_or_test_rows_is_caught(tmp_path_factory):
    """FedRoD's personal heads differ per client (2 of 4 clients trained by round 1): scoring client k with client
    k+1's heads, or on other rows of the test split than its own, must change the records."""
    tmp = tmp_path_factory.getbasetemp()
    federated, _ = run("fedrod", "federated", tmp)
    n = 4

    def wrong_heads(mp):
        original = SharedEvaluation.replies

        def rotated(self, rnd, model, node_of_client, states, received):
            other = ClientStateStore()
            other.records = {(c + 1) % n: r for c, r in states.records.items()}
            return original(self, rnd, model, node_of_client, other, received)

        mp.setattr(SharedEvaluation, "replies", rotated)

    def wrong_rows(mp):
        original = shared_eval.label_view
        def shifted(plan, cid):  # as many rows, each the next image of the test split
            data, rows = original(plan, cid)
            return data, (rows + 1) % len(shared_eval.open_plan(plan)[0].test_y)

        mp.setattr(shared_eval, "label_view", shifted)

    for tag, patch in (("heads", wrong_heads), ("rows", wrong_rows)):
        broken, _ = run("fedrod", "shared_backbone", tmp, tag, patch)
        assert mismatches(federated, broken), f"a mix-up of the clients' {tag} went unnoticed"


def tiny_model(strategy: str, cfg: dict):
    client_cls = get_strategy(strategy).client_cls
    return client_cls, client_cls.build_model(build_model({**cfg["model"], "width": 2, "feature_dim": 16}, 1, 3),
                                              cfg)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedloge", "fedrod", "fedper", "fedrep"])
def test_auto_takes_the_shared_path_where_it_gives_the_same_records(strategy):
    cfg = compose(f"strategy={strategy}")
    assert cfg["eval"]["personalized_path"] == "auto"
    assert problem(cfg, *tiny_model(strategy, cfg)) == ""


@pytest.mark.parametrize("strategy, overrides, reason", [
    ("ditto", (), "DittoClient.predictors is not split"),
    ("fedproto", (), "FedProtoClient.predictors is not split"),
    ("fedbn", (), "feature extractor holds personal arrays"),
    ("local", (), "feature extractor holds personal arrays"),
    ("ccvr", (), "eval uploads"),
    ("fedbabu", (), "not a head on features shared by every client"),
    ("fedavg", ("personalization.finetune_epochs=1",), "personalization.finetune_epochs=1"),
    ("fedrod", ("eval.local_test=holdout",), "eval.local_test=holdout"),
    ("fedavg", ("eval.decoupled.enabled=true",), "eval.decoupled.enabled=true"),
    ("fedloge", ("fault_injection.probability=0.5", "fault_injection.phase=evaluate"), "fault_injection.phase"),
])
def test_clients_whose_predictors_differ_stay_federated_and_shared_backbone_is_refused(strategy, overrides, reason):
    cfg = compose(f"strategy={strategy}", *overrides)
    assert reason in problem(cfg, *tiny_model(strategy, cfg))  # auto: the federated path
    with pytest.raises(ConfigError) as e:
        compose(f"strategy={strategy}", *overrides, "eval.personalized_path=shared_backbone")
    assert f"eval.personalized_path=shared_backbone with strategy={strategy}" in str(e.value)
    assert reason in str(e.value) and "eval.personalized_path=auto" in str(e.value)
    compose(f"strategy={strategy}", *overrides, "eval.personalized_path=federated")  # always selectable


def test_fedbabu_without_finetuning_shares_the_backbone():
    cfg = compose("strategy=fedbabu", "strategy.finetune_epochs=0", "eval.personalized_path=shared_backbone")
    assert problem(cfg, *tiny_model("fedbabu", cfg)) == ""


def test_row_slice_recognises_row_views_only():
    import torch

    base = torch.arange(120.0).view(10, 3, 2, 2)
    for rows in (slice(4, 7), slice(0, 10), slice(0, 10, 3), slice(1, 9, 2), slice(5, 6), slice(3, 3)):
        s = shared_eval.row_slice(base[rows], base)  # contiguous (generic batches), strided (FedLoGe's diagnostics)
        assert s is not None and torch.equal(base[s], base[rows]), rows
    assert shared_eval.row_slice(base[4:7].clone(), base) is None
    assert shared_eval.row_slice(base[:, :2], base) is None


@pytest.mark.parametrize("path", ["federated", "shared_backbone"])
def test_a_client_without_local_test_images_is_evaluated_not_failed(path, tmp_path):
    """A tiny split can leave a client with no local test image (here client 1 of 3): its predictors give empty
    (0, classes) logits, so its evaluation is an empty record, not a failed client (federated) or a crashed run
    (shared backbone), and both paths agree."""
    from fedlt.core.inprocess import run_inprocess as run_grid
    from fedlt.data.federated import prepare

    cfg = compose("dataset=synthetic_lt", "dataset.num_classes=4", "dataset.train_per_class=40",
                  "dataset.test_per_class=10", "dataset.image_size=8", "dataset.imbalance_factor=10", "num_clients=3",
                  "num_rounds=2", "participation=1.0", "local_epochs=1", "model.width=4", "model.feature_dim=8",
                  "eval.every=2", f"cache_dir={tmp_path}", f"eval.personalized_path={path}")
    plan, split, _ = prepare(cfg)
    assert min(len(t) for t in split.client_test) == 0
    out = run_grid(cfg, plan, get_strategy("fedavg"))
    assert out.failures == [] and out.rows[-1]["eval/clients"] == 3
    assert out.rows[-1]["personalized/accuracy"] == pytest.approx(0.5267857142857143)


def test_the_server_pass_runs_on_the_clients_gpu_only_when_the_driver_sees_one(monkeypatch):
    import torch

    def where(**backend):
        return shared_eval.server_pass_device({"backend": {"device": "auto", "num_gpus_per_client": 0, **backend}})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert where() == where(device="cuda") == where(num_gpus_per_client=0.25) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert where(num_gpus_per_client=0.25) == "cuda" and where(device="cuda:1") == "cuda:1"
    assert where() == where(device="cpu") == "cpu"  # CPU clients: the server stays on the CPU too
