"""Whole runs of the real round loop and client step (in process, no Ray) on Fashion-MNIST-LT: dp_central
completes and logs epsilon; a resumed run reports the same epsilon and metrics bitwise; a spent budget ends the
run after an evaluated, checkpointed round."""

import json
import math

import torch

from fedlt.core import checkpoint
from fedlt.experiment import final_results
from fedlt.privacy.server import RunPrivacy
from tests.conftest import needs_fmnist, read_jsonl
from tests.core.probe import compose, run_inprocess
from tests.privacy.helpers import TINY

pytestmark = needs_fmnist
KEYS = ("privacy/epsilon", "privacy/delta", "privacy/noise_multiplier", "privacy/clip_norm")


def without_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_dp_central_smoke_run_completes_and_logs_epsilon(tmp_path):
    cfg = compose("experiment=smoke", "privacy=dp_central")  # 6 clients, 3 rounds, Poisson sampling
    outcome, _ = run_inprocess(cfg, tmp_path / "run")
    assert outcome.finished and outcome.last_round == 3
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [2, 3]
    for r in rows:
        assert all(k in r for k in KEYS)
        assert 0 < r["privacy/epsilon"] < math.inf and r["privacy/delta"] == 1e-5
        assert r["generic/accuracy"] is not None
    assert rows[0]["privacy/epsilon"] < rows[1]["privacy/epsilon"]
    results = final_results(cfg, outcome, 1.0, 1.0)
    assert results["privacy/epsilon"] == rows[-1]["privacy/epsilon"]
    assert results["privacy"]["sampling"] == "poisson"
    assert results["privacy"]["neighbouring_relation"] == "add/remove one client"
    assert results["privacy"]["rounds_accounted"] == 3
    json.dumps(results)  # results.json is plain JSON


def test_privacy_none_adds_nothing(tmp_path):
    outcome, _ = run_inprocess(compose(*TINY, "num_rounds=1"), tmp_path / "run")
    assert outcome.privacy == {}
    assert not any(k.startswith("privacy/") for r in outcome.rows for k in r)
    assert not final_results(compose(*TINY, "num_rounds=1"), outcome, 1.0, 1.0).get("privacy")


def test_resumed_run_reports_the_same_epsilon_and_metrics(tmp_path):
    cfg = compose(*TINY, "num_rounds=3", "privacy=dp_central", "privacy.noise_multiplier=0.5",
                  "privacy.adaptive_clipping=true", "privacy.clipped_count_stddev=1.0")
    full, _ = run_inprocess(cfg, tmp_path / "full")
    run_inprocess({**cfg, "num_rounds": 2}, tmp_path / "cut")  # the first process ends after round 2
    state = checkpoint.latest(tmp_path / "cut", cfg)
    assert state.round == 2 and state.privacy["rounds"] == 2
    checkpoint.reset_run_dir(tmp_path / "cut", state)
    resumed, _ = run_inprocess(cfg, tmp_path / "cut", resume_from=state)
    assert without_time(resumed.rows) == without_time(full.rows)
    assert [r["privacy/epsilon"] for r in resumed.rows] == [r["privacy/epsilon"] for r in full.rows]
    assert len({r["privacy/clip_norm"] for r in full.rows}) > 1  # adaptive clipping moved C: state was carried
    a, b = full.final_arrays.to_torch_state_dict(), resumed.final_arrays.to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.privacy == full.privacy


def test_spent_budget_stops_the_run_with_a_checkpoint(tmp_path):
    base = compose(*TINY, "num_rounds=5", "eval.every=0", "checkpoint.every=0", "privacy=dp_central",
                   "privacy.noise_multiplier=2.0")
    target = RunPrivacy(base).epsilon(2) * 1.001  # affords 2 rounds, not 3
    cfg = compose(*TINY, "num_rounds=5", "eval.every=0", "checkpoint.every=0", "privacy=dp_central",
                  "privacy.noise_multiplier=2.0", f"privacy.target_epsilon={target}", "privacy.on_budget=stop")
    outcome, _ = run_inprocess(cfg, tmp_path / "run")
    assert outcome.finished and outcome.last_round == 2
    assert outcome.privacy["stopped_on_budget"] and outcome.privacy["epsilon"] <= target
    assert [r["round"] for r in outcome.rows] == [2]  # the last round is evaluated although eval.every=0
    assert [r for r, _ in checkpoint.list_checkpoints(tmp_path / "run")] == [2]
    results = final_results(cfg, outcome, 1.0, 1.0)
    assert results["rounds_completed"] == 2 and results["privacy"]["stopped_on_budget"]
    # resuming a run that spent its budget runs no further round
    state = checkpoint.latest(tmp_path / "run", cfg)
    again, _ = run_inprocess(cfg, tmp_path / "run", resume_from=state)
    assert again.finished and again.last_round == 2 and again.rows == outcome.rows


def test_dp_local_run_accounts_the_busiest_client(tmp_path):
    cfg = compose(*TINY, "num_rounds=2", "privacy=dp_local", "privacy.epsilon=0.8")
    outcome, _ = run_inprocess(cfg, tmp_path / "run")
    assert outcome.finished
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["privacy/max_uploads"] for r in rows] == [1, 2]  # 2 of 4 clients a round; seed 1 picks one twice
    assert 0 < rows[0]["privacy/epsilon"] < rows[1]["privacy/epsilon"]
    assert outcome.privacy["mode"] == "dp_local" and outcome.privacy["epsilon_per_upload"] == 0.8
