"""Run fedlt's real round loop (``run_rounds``) and real ClientApp in this process, without Ray: a Flower
``Grid`` that delivers each message by calling the ClientApp directly, one node Context per client (as Flower's
simulation runtime keeps them). Fast enough for unit tests of checkpoint/resume and client state; the Ray path
is covered by the end-to-end tests."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedlt.federation.algorithm import ClientAlgorithm
from fedlt.federation.strategy import FedLTStrategy

ROOT = Path(__file__).resolve().parents[2]
PROBE = "reliability_probe"


class InProcessGrid(Grid):
    """Messages are handled synchronously by ``app``; a ClientApp exception becomes an error reply (as in
    Flower's simulation runtime)."""

    def __init__(self, app, num_clients: int):
        self.app = app
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i,
                                                                                 "num-partitions": num_clients},
                                          state=RecordDict(), run_config={}) for i in range(num_clients)}

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return None

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for m in messages:
            try:
                out.append(self.app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as e:  # noqa: BLE001
                out.append(Message(Error(code=0, reason=f"<class '{type(e).__module__}.{type(e).__name__}'>:"
                                                       f"<'{e}'>"), reply_to=m))
        return out


# ------------------------------------------------------------- an algorithm with personal and extra state
class ProbeClient(ClientAlgorithm):
    """FedAvg with a personal head (kept per client, never averaged) and an extra per-client tensor counting
    the client's training rounds: both must survive checkpoint/resume bit for bit."""

    personal_prefixes = ("head.",)

    def train(self, ctx):
        out = super().train(ctx)
        ctx.state["visits"] = ctx.state.get("visits", torch.zeros(1)) + 1
        return out


class ProbeServer(FedLTStrategy):
    client_cls = ProbeClient

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

    from fedlt.config import validate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    return validate(OmegaConf.to_container(cfg, resolve=True))


def run_inprocess(cfg: dict, run_dir: Path, resume_from=None):
    """One run (or resumed run) of the real round loop; returns (outcome, strategy)."""
    from fedlt.data.federated import prepare
    from fedlt.federation.checkpoint import Checkpointer
    from fedlt.federation.client_app import make_client_app
    from fedlt.federation.server_app import RunOutcome, run_rounds
    from fedlt.runlog import RunLogger
    from strategies import get_strategy

    run_dir.mkdir(parents=True, exist_ok=True)
    plan, _, _ = prepare(cfg)
    grid = InProcessGrid(make_client_app(cfg, plan), int(cfg["num_clients"]))
    strategy = get_strategy(cfg["strategy"]["name"])(cfg)
    outcome = RunOutcome(strategy=strategy)
    start = resume_from.round if resume_from is not None else 0
    logger = RunLogger(run_dir, int(cfg["num_rounds"]), start_round=start, progress=False)
    try:
        run_rounds(strategy, grid, cfg, plan, logger, outcome, Checkpointer(cfg, run_dir, resume_from=resume_from))
    finally:
        logger.close()
    return outcome, strategy
