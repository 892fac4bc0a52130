"""Checkpoints and resume on the real round loop and ClientApp, in this process (no Ray): a resumed run equals
the uninterrupted one bit for bit, personal and extra client state included; checkpoint files are atomic,
pruned, code-free and tied to their configuration."""

import json
import os
import pickle
import signal

import numpy as np
import pytest
import torch

from fedlt import rundir
from fedlt.core import checkpoint
from fedlt.core.checkpoint import CheckpointError, RunState
from fedlt.core.faults import injected_fault
from tests.conftest import needs_fmnist
from tests.core.probe import PROBE, compose, register_probe, run_inprocess

TINY = ("experiment=smoke", "model.width=8", "model.feature_dim=16", "num_clients=4", "participation=0.5",
        "eval.every=1", "checkpoint.every=1", "checkpoint.keep=0", f"strategy.name={PROBE}")


def without_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def arrays_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_fmnist
def test_resumed_run_equals_uninterrupted_run_bitwise_with_personal_state(tmp_path, monkeypatch):
    register_probe(monkeypatch)
    cfg = compose(*TINY, "num_rounds=3")
    full, _ = run_inprocess(cfg, tmp_path / "full")
    # "first process": stops after round 2 (its last round), leaving the round-2 checkpoint
    run_inprocess({**cfg, "num_rounds": 2}, tmp_path / "cut")
    state = checkpoint.latest(tmp_path / "cut", cfg)  # num_rounds may change on resume
    assert state.round == 2
    checkpoint.reset_run_dir(tmp_path / "cut", state)
    # "second process": new strategy, new ClientApp node contexts (empty context.state), state from the file
    resumed, strategy = run_inprocess(cfg, tmp_path / "cut", resume_from=state)
    assert without_time(resumed.rows) == without_time(full.rows)
    assert arrays_equal(full.final_arrays.to_torch_state_dict(), resumed.final_arrays.to_torch_state_dict())
    a, _, _ = checkpoint.load(tmp_path / "full" / "checkpoints" / "round-000003.pt")
    b, _, _ = checkpoint.load(tmp_path / "cut" / "checkpoints" / "round-000003.pt")
    assert a.clients.keys() == b.clients.keys() and len(a.clients) >= 2
    for cid in a.clients:
        for name in a.clients[cid]:
            assert arrays_equal(a.clients[cid][name], b.clients[cid][name]), (cid, name)
    assert a.server_state["aggregations"] == b.server_state["aggregations"] == strategy.aggregations == 3
    assert torch.equal(a.server_state["noise"], b.server_state["noise"])  # driver RNG: same draws after resume
    # the extra state counted every training round of every client, across the restart
    sampled = [c for rnd in (1, 2, 3) for c in strategy.sample_clients(rnd)]
    for cid, recs in b.clients.items():
        assert int(recs["fedlt.state"]["visits"]) == sampled.count(cid)
        assert set(recs["fedlt.personal"]) == {k for k in recs["fedlt.personal"] if k.startswith("head.")}
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]


@needs_fmnist
def test_resume_without_client_state_would_differ(tmp_path, monkeypatch):
    """The control for the test above: dropping the personal state changes the personalized metrics."""
    register_probe(monkeypatch)
    cfg = compose(*TINY, "num_rounds=2")
    full, _ = run_inprocess(cfg, tmp_path / "full")
    state = checkpoint.latest(tmp_path / "full", cfg)
    first, _, _ = checkpoint.load(tmp_path / "full" / "checkpoints" / "round-000001.pt")
    first.clients = {}
    resumed, _ = run_inprocess(cfg, tmp_path / "lost", resume_from=first)
    assert state.round == 2
    assert resumed.rows[-1]["personalized/accuracy"] != full.rows[-1]["personalized/accuracy"]


@needs_fmnist
def test_failed_and_nan_clients_are_logged_by_id_and_never_aggregated(tmp_path, monkeypatch):
    register_probe(monkeypatch)
    cfg = compose(*TINY, "num_rounds=3", "num_clients=6", "fault_injection.probability=0.4",
                  "fault_injection.mode=[raise,oom,nan]", "fault_injection.phase=any")
    outcome, strategy = run_inprocess(cfg, tmp_path / "run")
    expected = {(c, rnd, "train", injected_fault(cfg, c, rnd, "train")) for rnd in (1, 2, 3)
                for c in strategy.sample_clients(rnd)} | {
        (c, rnd, "evaluate", injected_fault(cfg, c, rnd, "evaluate")) for rnd in (1, 2, 3) for c in range(6)}
    expected = {e for e in expected if e[3] is not None}
    assert {e[3] for e in expected} == {"raise", "oom", "nan"}  # the seed exercises every mode
    got = {(f["client"], f["round"], f["phase"]) for f in outcome.failures}
    assert got == {e[:3] for e in expected}
    reason = {"raise": "injected fault", "oom": "can't allocate memory", "nan": "non-finite update"}
    for c, rnd, phase, mode in expected:
        f = next(f for f in outcome.failures if (f["client"], f["round"], f["phase"]) == (c, rnd, phase))
        assert reason[mode] in f["reason"], (mode, f["reason"])
        assert f["reason"].startswith(f"client {c} failed in round {rnd} ({phase}): ") and "\n" not in f["reason"]
    for row in outcome.rows:  # every row lists the failures of its round, with the client id
        assert {(f["client"], f["phase"]) for f in row.get("failures", [])} == {
            (c, p) for c, rnd, p, _ in expected if rnd == row["round"]}
        train_failed = sum(1 for _, rnd, p, _ in expected if rnd == row["round"] and p == "train")
        assert row["train/clients"] == len(strategy.sample_clients(row["round"])) - train_failed
        assert np.isfinite(row["generic/accuracy"]) and np.isfinite(row.get("train/loss", 0.0))
    assert all(np.isfinite(a.numpy()).all() for a in outcome.final_arrays.values())
    # a rejected (NaN) update leaves the client's state untouched: visits count accepted trainings only
    last, _, _ = checkpoint.load(tmp_path / "run" / "checkpoints" / "round-000003.pt")
    for cid, recs in last.clients.items():
        accepted = sum(1 for rnd in (1, 2, 3) if cid in strategy.sample_clients(rnd)
                       and injected_fault(cfg, cid, rnd, "train") is None)
        assert int(recs["fedlt.state"]["visits"]) == accepted


# ------------------------------------------------------------------------------------------ the files
def _state(rnd: int) -> RunState:
    return RunState(round=rnd, arrays={"w": torch.arange(4.0)}, clients={0: {"fedlt.personal": {"h": torch.ones(2)}}},
                    server_state={"m": np.arange(3, dtype=np.float32), "n": 2, "t": (1, "a")},
                    rows=[{"round": rnd, "x": float("nan")}], rng=checkpoint.rng_state())


CFG = {"seed": 1, "num_rounds": 10, "strategy": {"name": "fedavg"}, "backend": {"num_cpus": 2},
       "checkpoint": {"every": 1, "keep": 2}}


def test_checkpoints_round_trip_prune_and_ignore_partial_writes(tmp_path):
    for rnd in (1, 2, 3):
        checkpoint.save(tmp_path, _state(rnd), CFG, keep=2)
    (tmp_path / "checkpoints" / ".round-000004.pt.tmp-1-2").write_bytes(b"half a checkpoint")  # a killed writer
    assert [r for r, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 3]
    state = checkpoint.latest(tmp_path, {**CFG, "num_rounds": 20, "backend": {"num_cpus": 8}})  # allowed changes
    assert state.round == 3 and torch.equal(state.arrays["w"], torch.arange(4.0))
    assert state.server_state["m"].dtype == np.float32 and state.server_state["t"] == (1, "a")
    assert np.isnan(state.rows[0]["x"])
    checkpoint.reset_run_dir(tmp_path, state)
    assert not list((tmp_path / "checkpoints").glob(".round-*"))


def test_checkpoint_of_another_configuration_is_refused_naming_the_difference(tmp_path):
    checkpoint.save(tmp_path, _state(1), CFG, keep=0)
    with pytest.raises(CheckpointError, match=r"seed: 1 vs 2"):
        checkpoint.latest(tmp_path, {**CFG, "seed": 2})


def test_loading_never_executes_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "checkpoints"
    d.mkdir()
    with open(d / "round-000001.pt", "wb") as f:
        pickle.dump({"format": 1, "x": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="round-000001.pt") as refused:
        checkpoint.latest(tmp_path, CFG)
    assert not marker.exists()
    # the refusal names what was refused in a whole sentence; torch's advice to load it unsafely is left out
    message = str(refused.value)
    assert "(UnpicklingError: Trying to load unsupported GLOBAL posix.system whose module posix is blocked.)" in message
    assert "weights_only" not in message and message.endswith("(or from the start).")


def test_truncated_checkpoint_is_reported_with_its_path(tmp_path):
    path = checkpoint.save(tmp_path, _state(1), CFG, keep=0)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt") as refused:
        checkpoint.latest(tmp_path, CFG)
    # not cut mid-sentence: torch's first sentence, whole (it was cut at 200 characters, mid-word)
    assert "(RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory.)" in str(
        refused.value)


def test_resume_accepts_only_whitelisted_overrides():
    assert rundir.override_keys(["resume=/r", "num_rounds=5", "+backend.init_args.x=1", "~foo"]) == [
        "resume", "num_rounds", "backend.init_args.x", "foo"]
    ident = checkpoint.identity({**CFG, "num_rounds": 3, "log_level": "INFO"})
    assert "num_rounds" not in ident and "seed" in ident and "backend.num_cpus" not in ident


def test_first_signal_requests_a_stop_and_handlers_are_restored():
    from fedlt.core.interrupt import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.event.wait(5) and stop.exit_code == 143
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before
