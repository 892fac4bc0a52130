"""Test helpers: an algorithm with personal and extra state (the "probe"), and composing configs as the CLI
does."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

from fedlt.api.client import ClientAlgorithm
from fedlt.api.server import ServerAlgorithm
from strategies.fedavg import FedAvgParams

ROOT = Path(__file__).resolve().parents[2]
PROBE = "reliability_probe"


class ProbeClient(ClientAlgorithm):
    """FedAvg with a personal head (kept per client, never averaged) and an extra per-client tensor counting
    the client's training rounds: both must survive checkpoint/resume bit for bit."""

    personal_prefixes = ("head.",)

    def train(self, ctx):
        out = super().train(ctx)
        ctx.state["visits"] = ctx.state.get("visits", torch.zeros(1)) + 1
        return out


class ProbeServer(ServerAlgorithm):
    client_cls = ProbeClient
    params = FedAvgParams  # composed from strategy=fedavg with strategy.name=reliability_probe

    def __init__(self, cfg):
        super().__init__(cfg)
        self.aggregations = 0

    def after_aggregate(self, server_round, arrays, replies):
        self.aggregations += 1
        return arrays

    def server_state(self) -> dict:
        return {"aggregations": self.aggregations, "noise": torch.rand(3)}  # global RNG: reseeded per round

    def load_server_state(self, state: dict) -> None:
        self.aggregations = int(state["aggregations"])


def register_probe(monkeypatch) -> None:
    """Make ``strategy.name=reliability_probe`` resolvable for this test (in this process only)."""
    import strategies

    module = types.ModuleType(f"strategies.{PROBE}")
    module.Server = ProbeServer
    monkeypatch.setitem(sys.modules, f"strategies.{PROBE}", module)
    monkeypatch.setattr(strategies, "STRATEGIES", tuple(sorted((*strategies.STRATEGIES, PROBE))))


def compose(*overrides: str) -> dict:
    """The validated config the CLI would build from these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from fedlt.validate import validate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    return validate(OmegaConf.to_container(cfg, resolve=True))


def run_inprocess(cfg: dict, run_dir: Path, resume_from=None):
    """One run (or resumed run) of the real round loop over the in-process grid; returns (outcome, strategy)."""
    from fedlt.core.inprocess import run_inprocess as run
    from fedlt.data.federated import prepare
    from strategies import get_strategy

    run_dir.mkdir(parents=True, exist_ok=True)
    plan, _, _ = prepare(cfg)
    outcome = run(cfg, plan, get_strategy(cfg["strategy"]["name"]), run_dir, resume_from)
    return outcome, outcome.strategy
