"""Client failures as the round loop sees them: readable reasons, and telling a few failed clients (the run
goes on) from a dead backend (the run stops with a clear error instead of running on without clients).

Every failure record (``failures`` in metrics.jsonl rows, results.json and checkpoints) is
``{"client", "round", "phase", "kind", "reason"}``: ``kind`` is ``error`` (the client raised), ``actor-died``
(its actor process died), ``non-finite`` (NaN/inf update, rejected), ``timeout`` (no reply within
``backend.round_timeout_s``) or ``aborted`` (a whole round, client -1: secure aggregation below its threshold), and ``reason`` is one sentence naming the client, round, phase and the error's type
and first line, e.g. ``client 3 failed in round 2 (train): RuntimeError: CUDA out of memory.`` -- never a piece of
a traceback. Flower hands the server a ClientApp's exception as ``<class '...'>:<'...'>`` around the whole Ray
traceback; :func:`error_of` finds the original exception in it."""

from __future__ import annotations

import logging
import re

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("fedlt")

_ACTOR_GONE = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "WorkerCrashedError", "NodeDiedError",
               "OutOfMemoryError")
_REASON = re.compile(r"^<class '([^']+)'>:<'(.*)'>\s*$", re.S)
_CHAINED = re.compile(r"\n\s*(?:The above exception was the direct cause of the following exception:|"
                      r"During handling of the above exception, another exception occurred:)\s*\n")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::[ \t]?(.*))?$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLAUSE_END = re.compile(r"[.;:,!?](?=\s)")
DIED = "its actor process died"
ERROR, ACTOR_DIED, NON_FINITE, TIMEOUT, ABORTED = "error", "actor-died", "non-finite", "timeout", "aborted"
REASON_LIMIT = 400  # characters of an error message kept in a failure's reason (the log has all of it)


class BackendFailure(RuntimeError):
    """The client actors are gone: no client can run any more."""


def clip(text: str, limit: int = REASON_LIMIT, rest: str = "in the log") -> str:
    """``text`` if it fits in ``limit`` characters; otherwise cut at the last sentence or clause end (else the last
    word end) within the limit, saying how much was left out: "... (N more characters in the log)"."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    ends = [m.end() for m in _CLAUSE_END.finditer(text, 0, limit)]
    cut = ends[-1] if ends and ends[-1] > limit // 3 else (text.rfind(" ", 0, limit) if " " in text[:limit] else limit)
    kept = text[:cut].rstrip(" ,;:")
    return f"{kept} ({len(text) - len(kept)} more characters {rest})"


def _short(type_name: str) -> str:
    """``ray.exceptions.RayTaskError(ClientAppException)`` -> ``RayTaskError``; ``torch.OutOfMemoryError`` ->
    ``OutOfMemoryError``."""
    return type_name.split("(", 1)[0].rsplit(".", 1)[-1]


def _raised(traceback_text: str) -> tuple[str, str] | None:
    """(type, first line of message) of the exception a printed traceback ends with; None without frames."""
    lines = traceback_text.splitlines()
    frames = [i for i, ln in enumerate(lines) if ln.startswith("  File ")]
    if not frames:
        return None
    for ln in lines[frames[-1] + 1:]:
        if ln.strip() and not ln[0].isspace():
            m = _EXC_LINE.match(ln.rstrip())
            if m:
                return _short(m.group(1)), (m.group(2) or "").strip()
            return None
    return None


def error_of(reason: str) -> tuple[str, str, bool]:
    """(error type, first line of its message, whether the client's actor process died) of a failed reply's
    ``error.reason``. A ClientApp exception reaches the server wrapped twice (Ray's RayTaskError around Flower's
    ClientAppException, which keeps only the message); the original exception is the first one of the
    traceback's chain, so its type and message are read from there."""
    text = _ANSI.sub("", reason).strip()
    m = _REASON.match(text)
    cls, body = (m.group(1), m.group(2)) if m else ("", text)
    if cls.startswith("ray.") and _short(cls) in _ACTOR_GONE:
        first = next((ln.strip() for ln in body.splitlines() if ln.strip()), "")
        return _short(cls), first, True
    found = _raised(_CHAINED.split(body)[0])
    if found is not None:
        return found[0], found[1], False
    if "Message: " in body:  # Flower's ClientAppException without the traceback: the original message only
        rest = body.split("Message: ", 1)[1].strip()
        return "", (rest.splitlines() or [""])[0].strip(), False
    first = next((ln.strip() for ln in body.splitlines() if ln.strip()), "")
    return _short(cls) if cls else "", first, False


def failure(client: int, rnd: int, phase: str, kind: str, what: str) -> dict:
    """A failure record whose ``reason`` is one sentence: "client C failed in round R (phase): what." The whole
    sentence is logged (warning); the record keeps ``what`` up to :data:`REASON_LIMIT` characters."""
    def sentence(w: str) -> str:
        w = w.strip() or "no reason given"
        return f"client {client} failed in round {rnd} ({phase}): {w}{'' if w[-1] in '.!?' else '.'}"

    log.warning("%s", sentence(" ".join(what.split())))
    return {"client": client, "round": rnd, "phase": phase, "kind": kind, "reason": sentence(clip(what))}


def round_failure(rnd: int, phase: str, what: str) -> dict:
    """The failure record of a whole round (no one client to name; ``client`` -1): "round R failed (phase): what." """
    reason = f"round {rnd} failed ({phase}): {' '.join(what.split()).rstrip('.')}."
    log.warning("%s", reason)
    return {"client": -1, "round": rnd, "phase": phase, "kind": ABORTED, "reason": clip(reason)}


def error_failure(client: int, rnd: int, phase: str, reason: str) -> dict:
    """The failure record of a reply that carries an error (Flower's ``error.reason``)."""
    etype, message, died = error_of(reason)
    if died:
        message = message.rstrip(". ")
        return failure(client, rnd, phase, ACTOR_DIED, f"{DIED} (Ray's {etype}: {message})" if message else
                       f"{DIED} (Ray's {etype})")
    what = f"{etype}: {message}" if etype and message else (etype or message)
    return failure(client, rnd, phase, ERROR, what)


def is_backend_failure(failure: dict) -> bool:
    return failure.get("kind") == ACTOR_DIED


def check_actors_alive(grid: Grid, node_ids: list[int], timeout: float) -> None:
    """After a round in which no client succeeded and actors died: ask every node a trivial question. If none
    answers, the actor pool is dead (e.g. ``backend.actor_max_restarts`` exhausted, the Ray node lost) and the
    run stops with a clear error rather than logging failures for ever."""
    msgs = [Message(content=RecordDict({"config": ConfigRecord({"query": "client-id"})}), dst_node_id=nid,
                    message_type=MessageType.QUERY) for nid in node_ids]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    alive = [r for r in replies if not r.has_error()]
    if not alive:
        errors = sorted({error_of(str(r.error.reason))[:2] for r in replies if r.has_error()})
        why = clip(f"{errors[0][0]}: {errors[0][1]}".strip(": "), 300) if errors else "no node replied"
        raise BackendFailure(
            f"every client actor is dead, no client can run any more ({why}); check memory use and the Ray logs, "
            f"raise backend.actor_max_restarts, then continue the run from its last checkpoint")
    log.warning("%d of %d client nodes answer after a round without any usable update; going on",
                len(alive), len(node_ids))
