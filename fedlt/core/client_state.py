"""Every client's persistent state (personal model arrays, the algorithm's extra tensors), held by the server.

Why here and not in Flower's ``context.state``: in simulation, Flower keeps each node's Context in the driver
process, but inside private objects of its simulation runtime (``DeprecatedRunInfoStore`` instances local to
``flwr.server.superlink.fleet.vce.vce_api.start_vce``): nothing outside Flower can read them for a checkpoint or
put them back on resume, and they vanish with the process. So fedlt holds the state itself, in the same driver
process where Flower would hold it: the server sends a client its records with every message and takes the
updated records back from its train reply. Memory and traffic are the same as with ``context.state`` (Flower
ships the whole Context to the actor and back with every message), there is one source of truth, a rejected
update (an error, a NaN) never touches the client's state, and a checkpoint is one ``state_dict()``.

A message carries ``config["fedlt.client-state"] = "server"`` in this mode; a ClientApp that receives no such
flag (e.g. under Flower's Deployment Engine, where state should stay on the client's machine) keeps using
``context.state`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, Message

PERSONAL, STATE = "fedlt.personal", "fedlt.state"
RECORDS = (PERSONAL, STATE)
MODE_KEY = "fedlt.client-state"  # message config key; value "server" = state travels with the messages


def cohort_key(name: str, client: int) -> str:
    """The record name of one client's record ``name`` in a client-batching (``train.cohort``) message and its
    reply, which carry the records of every client of the group."""
    return f"{name}/{client}"


def server_held(msg: Message) -> bool:
    """Does this message carry (and its reply return) the client's state?"""
    return "config" in msg.content and msg.content["config"].get(MODE_KEY) == "server"


class ClientStateStore:
    """client id -> {record name -> ArrayRecord}."""

    def __init__(self) -> None:
        self.records: dict[int, dict[str, ArrayRecord]] = {}

    def attach(self, msg: Message, client: int) -> Message:
        """Add the client's records (and the mode flag) to a message for it."""
        msg.content["config"][MODE_KEY] = "server"
        for name, rec in self.records.get(client, {}).items():
            msg.content[name] = rec
        return msg

    def attach_cohort(self, msg: Message, clients: Iterable[int]) -> Message:
        """Add the records of every client of a client-batching group (under :func:`cohort_key` names)."""
        msg.content["config"][MODE_KEY] = "server"
        for client in clients:
            for name, rec in self.records.get(client, {}).items():
                msg.content[cohort_key(name, client)] = rec
        return msg

    def collect(self, replies: Iterable[Message], client_of: Callable[[Message], int]) -> None:
        """Take the updated records out of accepted train replies (so the rest is a plain Flower reply with one
        ArrayRecord and one MetricRecord, as Flower's aggregation expects); a cohort reply's per-client records
        go to their clients."""
        for r in replies:
            recs = {name: r.content.pop(name) for name in RECORDS if name in r.content}
            if recs:
                self.records.setdefault(client_of(r), {}).update(recs)
            for key in [k for k in r.content.keys() if k.partition("/")[0] in RECORDS and "/" in k]:
                name, _, client = key.partition("/")
                self.records.setdefault(int(client), {})[name] = r.content.pop(key)

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
        return {cid: {name: rec.to_torch_state_dict() for name, rec in recs.items()}
                for cid, recs in sorted(self.records.items())}

    def load_state_dict(self, state: dict) -> None:
        self.records = {int(cid): {name: ArrayRecord(sd) for name, sd in recs.items()}
                        for cid, recs in state.items()}
