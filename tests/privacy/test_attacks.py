"""Membership inference (fedlt.privacy.attacks, fedlt-attack): a blind attack scores AUC ~ 0.5, an overfit model
leaks (AUC well above 0.5), members and non-members are matched class by class, and the CLI writes attack.json
for a real run (global and personal models) and refuses bad input."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from fedlt.attack import ATTACK_FILE, main, matched_sample
from fedlt.privacy.attacks import evaluate, example_scores, null_auc_std
from tests.conftest import needs_fmnist
from tests.core.probe import compose, register_probe, run_inprocess
from tests.privacy.helpers import TINY

K = 4
GROUPS = {"cumulative_75_95": {"head": [0, 1], "mid": [2], "tail": [3]}}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny toy models: intra-op threads only add synchronisation (100x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(n: int, gen: torch.Generator, centres: torch.Tensor):
    y = torch.randint(0, K, (n,), generator=gen)
    return centres[y] + 1.5 * torch.randn(n, centres.shape[1], generator=gen), y


def fit(model: nn.Module, x, y, steps: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def attack(model, members, non_members):
    with torch.no_grad():
        m, nm = example_scores(model(members[0]), members[1]), example_scores(model(non_members[0]), non_members[1])
    return evaluate(m, nm, members[1].numpy(), non_members[1].numpy(), K, GROUPS)


def test_blind_attack_auc_is_near_one_half():
    """Members and non-members both unseen by the model: any AUC difference from 0.5 is sampling noise. Under H0
    the AUC of n1 vs n0 examples has std sqrt((n1+n0+1)/(12 n1 n0)) = 0.018 for 500 vs 500; 4 std = 0.073."""
    gen = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(K, 8, generator=gen)
    model = fit(nn.Linear(8, K), *blobs(200, gen, centres), steps=200)
    res = attack(model, blobs(500, gen, centres), blobs(500, gen, centres))
    tol = 4 * null_auc_std(500, 500)
    assert abs(null_auc_std(500, 500) - 0.0183) < 1e-3
    for name in ("loss", "confidence"):
        assert abs(res[name]["auc"] - 0.5) < tol, (name, res[name]["auc"], tol)
        assert res[name]["advantage"] < 0.15


def test_overfit_small_model_leaks_membership():
    """A wide MLP memorises 40 noisy-cluster members (loss ~ 0 on them, not on fresh points of the same
    distribution): the loss attack's AUC is far above 0.5 (fails if the per-example loss is not the score)."""
    gen = torch.Generator().manual_seed(1)
    centres = 0.5 * torch.randn(K, 8, generator=gen)  # heavily overlapping classes: members can only be memorised
    members, non_members = blobs(40, gen, centres), blobs(40, gen, centres)
    torch.manual_seed(0)
    model = fit(nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, K)), *members, steps=600)
    res = attack(model, members, non_members)
    assert res["loss"]["auc"] > 0.85 and res["loss"]["advantage"] > 0.5
    assert res["confidence"]["auc"] > 0.75
    assert res["loss"]["yeom_advantage"] > 0.3
    assert res["n_members"] == res["n_non_members"] == 40
    assert len(res["loss"]["per_class_auc"]) == K and set(res["loss"]["groups"]["cumulative_75_95"]) == {
        "head", "mid", "tail"}


def test_non_members_match_the_members_class_by_class():
    rng = np.random.default_rng(0)
    member_class = np.repeat([0, 1, 2], [600, 60, 6])  # long-tailed members
    member_idx = np.arange(len(member_class))
    train_pool = {0: np.arange(1000, 1010), 1: np.arange(2000, 2500), 2: np.arange(3000, 3500)}  # head: few left
    test_pool = {0: np.arange(0, 1000), 1: np.arange(1000, 2000), 2: np.arange(2000, 3000)}
    d = matched_sample(member_idx, member_class, train_pool, test_pool, budget=333, rng=rng)
    got = np.bincount(member_class[d["members"]], minlength=3)
    assert got.tolist() == [300, 30, 3]  # the training class profile, subsampled by 333 / 666
    assert np.bincount(d["non_class"], minlength=3).tolist() == got.tolist()
    assert len(d["non_train"]) == 10 + 30 + 3 and len(d["non_test"]) == 290  # outside-training images first
    assert len(set(d["members"].tolist())) == len(d["members"])


@needs_fmnist
def test_cli_attacks_a_run_writes_attack_json_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    register_probe(monkeypatch)  # FedAvg with a personal head: the checkpoint holds personal state
    cfg = compose(*TINY, "strategy=fedavg", "strategy.name=reliability_probe", "num_rounds=1")
    run = tmp_path / "run"
    run_inprocess(cfg, run)
    (run / "results.json").write_text("{}")
    main([str(run), "--max-members", "300", "--max-members-per-client", "100"])
    res = json.loads((run / ATTACK_FILE).read_text())
    assert res["round"] == 1 and res["checkpoint"] == "round-000001.pt"
    g = res["global"]
    assert g["n_members"] == g["n_non_members"] and 250 <= g["n_members"] <= 320
    assert sum(g["non_members_from"].values()) == g["n_non_members"]
    assert 0.0 <= g["loss"]["auc"] <= 1.0 and set(g["loss"]["groups"]) == {
        "cumulative_75_95", "count_100_20", "fraction_50_30_20"}
    assert np.array(g["per_class_n"])[:, 0].tolist() == np.array(g["per_class_n"])[:, 1].tolist()
    p = res["personal"]
    assert p is not None and len(p["clients"]) >= 1 and len(p["loss"]["per_client_auc"]) == len(p["clients"])
    out = capsys.readouterr().out
    assert "global model" in out and "personal models" in out and "written:" in out
    assert (run / "results.json").read_text() == "{}"  # nothing else touched

    before = (run / ATTACK_FILE).read_text()
    with pytest.raises(SystemExit) as e:  # refuses to overwrite attack.json without --force
        main([str(run)])
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    assert (run / ATTACK_FILE).read_text() == before

    (tmp_path / "empty").mkdir()
    for bad, words in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no checkpoint"),
                       (run / "results.json", "not a folder")):
        with pytest.raises(SystemExit) as e:
            main([str(bad)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "empty" / ATTACK_FILE).exists()
