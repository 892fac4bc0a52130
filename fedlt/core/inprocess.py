"""Run fedlt's round loop and client step in this process, without Flower's transport or Ray: a Flower ``Grid``
that delivers each message by calling the client step directly, with one node Context per client (as Flower's
simulation runtime keeps them). The tests of checkpoint/resume and client state use it, and so does
``fedlt-bench``'s reference run: "Flower + Ray vs in process" then compares the same round loop and client step,
not two copies."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedlt.api.server import ServerAlgorithm
from fedlt.core.checkpoint import Checkpointer, RunState
from fedlt.core.client_step import configure_torch, handle, runtime
from fedlt.core.rounds import RunOutcome, run_rounds
from fedlt.data.federated import DataPlan
from fedlt.runlog import RunLogger


class InProcessGrid(Grid):
    """Messages are handled synchronously by ``app``; a ClientApp exception becomes an error reply (as in
    Flower's simulation runtime)."""

    def __init__(self, handler: Callable[[Message, Context], Message], num_clients: int):
        self.handler = handler
        claim_task_identity()
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
                out.append(self.handler(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as e:  # noqa: BLE001
                out.append(Message(Error(code=0, reason=f"<class '{type(e).__module__}.{type(e).__name__}'>:"
                                                       f"<'{e}'>"), reply_to=m))
        return out


def claim_task_identity(run_id: int = 1) -> None:
    """Flower stamps every new Message with the process's task identity, which its own runtime sets for a
    ServerApp; a process that runs the round loop itself (in-process grid) sets one unless it has one."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        TaskIdentity.run_id  # noqa: B018 -- raises when unset
    except RuntimeError:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0


def run_inprocess(cfg: dict, plan: DataPlan, server_cls: type[ServerAlgorithm], run_dir: Path | None = None,
                  resume_from: RunState | None = None, progress: bool = False) -> RunOutcome:
    """One run (or resumed run) of the real round loop over the in-process grid; with ``run_dir`` it logs and
    checkpoints there as a Flower run does. The strategy object is ``outcome.strategy``."""
    strategy = server_cls(cfg)
    rt = runtime(cfg, plan, server_cls.client_cls)
    grid = InProcessGrid(partial(_as_client, rt), int(cfg["num_clients"]))
    outcome = RunOutcome(strategy=strategy)
    start = resume_from.round if resume_from is not None else 0
    configure_torch({**cfg["backend"], "torch_threads": cfg["backend"].get("server_threads") or 1})
    logger = RunLogger(run_dir, int(cfg["num_rounds"]), start_round=start, progress=progress) if run_dir else None
    try:
        run_rounds(strategy, grid, cfg, plan, logger or _NullLogger(), outcome,
                   Checkpointer(cfg, run_dir, resume_from=resume_from))
    finally:
        if logger is not None:
            logger.close()
    return outcome


def _as_client(rt, msg: Message, context: Context) -> Message:
    """The client step with the clients' torch settings (the round loop's code runs with the server's)."""
    threads = torch.get_num_threads()
    configure_torch(rt.cfg["backend"])
    try:
        return handle(rt, msg, context)
    finally:
        torch.set_num_threads(threads)


class _NullLogger:
    """No run directory: nothing is written."""

    def train_round(self, rnd: int, values: dict) -> None:
        pass

    def eval_round(self, row: dict, detail: dict | None = None) -> None:
        pass
