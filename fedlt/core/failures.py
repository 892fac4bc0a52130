"""Client failures as the round loop sees them: readable reasons, and telling a few failed clients (the run
goes on) from a dead backend (the run stops with a clear error instead of running on without clients)."""

from __future__ import annotations

import logging
import re

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("fedlt")

_ACTOR_GONE = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "WorkerCrashedError", "NodeDiedError",
               "OutOfMemoryError")
_ERROR = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)", re.S)
DIED = "the client's actor process died"


class BackendFailure(RuntimeError):
    """The client actors are gone: no client can run any more."""


def describe(reason: str, limit: int = 500) -> str:
    """A failure reason for the logs: when the client's actor process died (Ray's error class is at the start of
    Flower's reason), say so with the error's first sentence; otherwise the end of the reason (a ClientApp
    exception's message is at the end of its traceback)."""
    m = _ERROR.match(reason.strip())
    if m and m.group(1) in _ACTOR_GONE:
        first = m.group(2).strip().splitlines()[0] if m.group(2).strip() else ""
        return f"{DIED} ({m.group(1)}: {first[:200]})"
    return reason[-limit:]


def is_backend_failure(failure: dict) -> bool:
    return str(failure.get("reason", "")).startswith(DIED)


def check_actors_alive(grid: Grid, node_ids: list[int], timeout: float) -> None:
    """After a round in which no client succeeded and actors died: ask every node a trivial question. If none
    answers, the actor pool is dead (e.g. ``backend.actor_max_restarts`` exhausted, the Ray node lost) and the
    run stops with a clear error rather than logging failures for ever."""
    msgs = [Message(content=RecordDict({"config": ConfigRecord({"query": "client-id"})}), dst_node_id=nid,
                    message_type=MessageType.QUERY) for nid in node_ids]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    alive = [r for r in replies if not r.has_error()]
    if not alive:
        reasons = sorted({describe(str(r.error.reason)) for r in replies if r.has_error()})
        raise BackendFailure(
            f"every client actor is dead, no client can run any more ({(reasons or ['no reply'])[0]}); check "
            f"memory use and the Ray logs, raise backend.actor_max_restarts, then continue the run from its last "
            f"checkpoint")
    log.warning("%d of %d client nodes answer after a round without any usable update; going on",
                len(alive), len(node_ids))
