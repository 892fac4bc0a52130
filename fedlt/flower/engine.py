"""Making Flower 1.42's simulation engine cheap: what fedlt does around ``run_simulation``.

Measured costs of the stock engine (fedlt-bench, README "Performance"):

* **Ray start-up** (3-15 s on a 2-core box): fedlt starts Ray itself (``fedlt.flower.ray_backend``, with a
  watchdog and a reachability probe); Flower reuses the initialised Ray.
* **Dispatch polling**: the engine's dispatcher thread asks the link state, every 0.1 s and *for every node*,
  for one pending message (``get_message_ins(node_id, limit=1)``), and each such call scans every stored
  message. A round therefore waited up to 0.1 s before its messages moved, and with N clients and M messages
  in flight a pass cost O(N x M): with 1,000 clients an evaluation round (1,000 messages) was quadratic.
  ``_dispatch_messages`` does one pass over the stored messages per tick (O(M)), hands a node at most one
  message at a time (Flower: one per node per 0.1 s pass), keeps Flower's expiry check, and ticks every 2 ms
  while the store changes.
* **Shutdown**: actors are killed (``ray.kill``) instead of sent a ``terminate`` task, which Ray reports as
  a failed task on every successful run when task retries are on.
* **Reply polling**: ``InMemoryGrid.send_and_receive`` slept 0.1 s between pulls and each pull re-verified all
  pending ids. ``_send_and_receive`` pulls only the ids that have a reply (a dict look-up each), polls every
  2 ms, and still does a full pull every second so expired messages turn into error replies as before.

The patches apply only to the Flower version they were written against (1.42.x, pinned in pyproject.toml);
on any other version ``tune_flower`` leaves Flower untouched and says so at debug level. ``FEDLT_STOCK_FLOWER=1``
leaves it untouched too (for A/B measurements).

Flower names they touch -- this module is the only place in fedlt that does:

* replaced: ``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`` (module function),
  ``flwr.superlink.grid.inmemory_grid.InMemoryGrid.send_and_receive`` (method) and
  ``flwr.simulation.ray_transport.ray_actor.BasicActorPool.terminate_all_actors`` (method; quiet shutdown);
* read: ``InMemoryLinkState.message_ins_store``, ``.lock``, ``.message_ins_id_to_message_res_id`` (private
  attributes), ``Message.metadata.delivered_at`` / ``created_at``;
* called: ``InMemoryLinkState._check_stored_messages`` (private), ``.get_message_ins`` and
  ``InMemoryGrid.push_messages`` / ``pull_messages`` / ``pull_interval`` (public), ``flwr.supercore.date.now``.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("fedlt")

TICK_S = 0.002  # dispatch / pull period while messages are moving
IDLE_S = 0.02  # dispatch period while nothing changed
FULL_PULL_S = 1.0  # how often the reply poll re-verifies every pending id (expiry -> error replies)


# ------------------------------------------------------------------------------------ Flower engine tuning
_TUNED = False


def tune_flower() -> bool:
    """Install the dispatcher and reply poll described above (idempotent). Returns whether they are active."""
    global _TUNED
    if _TUNED:
        return True
    if os.environ.get("FEDLT_STOCK_FLOWER"):  # A/B measurements against Flower's own engine
        return False
    try:
        import flwr
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError as e:  # pragma: no cover - a different Flower layout
        log.debug("fedlt: Flower engine left as is (%s)", e)
        return False
    version = getattr(flwr, "__version__", "") or _flwr_version()
    needed = [hasattr(InMemoryLinkState, a) for a in ("_check_stored_messages", "get_message_ins")]
    if not version.startswith("1.42.") or not all(needed) or not hasattr(vce_api, "add_messages_to_queue"):
        log.debug("fedlt: Flower %s engine left as is", version)
        return False
    vce_api.add_messages_to_queue = _dispatch_messages
    InMemoryGrid.send_and_receive = _send_and_receive
    try:
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool

        BasicActorPool.terminate_all_actors = _kill_all_actors
    except ImportError:  # pragma: no cover - a different Flower layout
        pass
    _TUNED = True
    return True


def _kill_all_actors(self) -> None:
    """Replacement for ``BasicActorPool.terminate_all_actors`` at the end of a simulation: ``ray.kill`` each
    actor instead of sending it a ``terminate`` task that calls ``exit_actor()``. With task retries on (fedlt's
    ``backend.actor_task_retries``), Ray reports every such intentional exit as a failed task to be retried
    ("(raylet) Task ClientAppActor.terminate failed ... IntentionalSystemExit") on a run that succeeded."""
    import ray

    for actor in self.pool:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 -- an actor already gone is fine
            pass


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def _dispatch_messages(state, queue, nodes_mapping, f_stop) -> None:
    """Replacement for ``vce_api.add_messages_to_queue`` (same signature and semantics, O(messages) a pass)."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if store is None or lock is None:  # not the in-memory link state: Flower's own loop
        return _stock_dispatch(state, queue, nodes_mapping, f_stop)
    from flwr.supercore.date import now

    nodes = set(nodes_mapping)
    last_len, last_full = -1, 0.0
    while not f_stop.is_set():
        picked = []
        clock = time.monotonic()
        if len(store) != last_len or clock - last_full > IDLE_S * 5:
            last_full = clock
            with lock:
                pending = {mid for mid, m in list(store.items()) if m.metadata.delivered_at == ""}
                if pending:
                    state._check_stored_messages(pending)  # drops expired/invalid messages, as Flower does
                    replied = getattr(state, "message_ins_id_to_message_res_id", {})
                    # a node with a message still being processed gets no second one (its Context would race)
                    busy = {m.metadata.dst_node_id for mid, m in store.items()
                            if m.metadata.delivered_at != "" and mid not in replied}
                    stamp = now().isoformat()
                    for mid in pending:
                        m = store.get(mid)
                        if m is None or m.metadata.delivered_at != "":
                            continue
                        nid = m.metadata.dst_node_id
                        if nid in nodes and nid not in busy:  # at most one message per node at a time
                            busy.add(nid)
                            m.metadata.delivered_at = stamp
                            picked.append(m)
                last_len = len(store) if not picked else -1
        for m in sorted(picked, key=lambda m: m.metadata.created_at):
            queue.put(m)
        f_stop.wait(TICK_S if picked or last_len == -1 else IDLE_S)


def _stock_dispatch(state, queue, nodes_mapping, f_stop) -> None:
    while not f_stop.is_set():
        for node_id in nodes_mapping.keys():
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(0.1)


def _send_and_receive(self, messages, *, timeout: float | None = None):
    """Replacement for ``InMemoryGrid.send_and_receive``: same contract, cheap polls."""
    msg_ids = set(self.push_messages(messages))
    del messages
    replies_of = getattr(self.state, "message_ins_id_to_message_res_id", None)
    end_time = time.time() + (timeout if timeout is not None else 0.0)
    ret: list = []
    last_full = time.monotonic()
    while timeout is None or time.time() < end_time:
        full = replies_of is None or time.monotonic() - last_full > FULL_PULL_S
        ready = msg_ids if full else {m for m in msg_ids if m in replies_of}
        if ready:
            if full:
                last_full = time.monotonic()
            res_msgs = list(self.pull_messages(ready))
            ret.extend(res_msgs)
            msg_ids.difference_update({msg.metadata.reply_to_message_id for msg in res_msgs})
        if not msg_ids:
            break
        time.sleep(TICK_S if replies_of is not None else self.pull_interval)
    return ret
