"""Strategy checks on the real round loop and client step, in this process (no Ray), on a tiny Fashion-MNIST-LT
run: a run resumed from its round-2 checkpoint equals the uninterrupted one bit for bit (the strategy's server
state and its clients' state included), and losing that state changes the result (so the state matters)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedlt.core import checkpoint
from tests.core.probe import compose, run_inprocess

TINY = ("experiment=smoke", "model.width=8", "model.feature_dim=16", "num_clients=4", "participation=0.5",
        "eval.every=2", "checkpoint.every=1", "checkpoint.keep=0", "dataset.n_max=500")


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def same_tensors(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def config(strategy: str, *overrides: str, rounds: int = 3) -> dict:
    return compose(*TINY, f"strategy={strategy}", f"num_rounds={rounds}", *overrides)


def checkpoint_at(run_dir: Path, rnd: int) -> checkpoint.RunState:
    state, _, _ = checkpoint.load(run_dir / "checkpoints" / f"round-{rnd:06d}.pt")
    return state


def assert_resume_is_exact(strategy: str, tmp_path: Path, lose: str, *overrides: str):
    """Run 3 rounds; run 2 rounds and resume to 3 from the round-2 checkpoint: rows, global arrays, every client's
    state and the server state must be identical. Then resume again from the round-2 checkpoint with its
    ``lose`` part ("server": the strategy's server state, "clients": the clients' state) emptied: the result must
    differ. Returns (uninterrupted outcome, round-3 checkpoint)."""
    cfg = config(strategy, *overrides)
    full, _ = run_inprocess(cfg, tmp_path / "full")
    run_inprocess({**cfg, "num_rounds": 2}, tmp_path / "cut")
    state = checkpoint.latest(tmp_path / "cut", cfg)
    assert state.round == 2
    checkpoint.reset_run_dir(tmp_path / "cut", state)
    resumed, _ = run_inprocess(cfg, tmp_path / "cut", resume_from=state)
    assert without_time(resumed.rows) == without_time(full.rows)
    assert same_tensors(full.final_arrays.to_torch_state_dict(), resumed.final_arrays.to_torch_state_dict())
    a, b = checkpoint_at(tmp_path / "full", 3), checkpoint_at(tmp_path / "cut", 3)
    assert same_tensors(a.clients, b.clients) and same_tensors(a.server_state, b.server_state)

    lost = checkpoint_at(tmp_path / "full", 2)
    assert (lost.server_state if lose == "server" else lost.clients), f"nothing to lose in {lose} state"
    if lose == "server":
        lost.server_state = {}
    else:
        lost.clients = {}
    amnesic, _ = run_inprocess(cfg, tmp_path / "lost", resume_from=lost)
    assert without_time(amnesic.rows) != without_time(full.rows)
    return full, a
