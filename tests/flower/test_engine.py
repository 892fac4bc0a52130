"""fedlt's replacements for Flower 1.42's dispatcher and reply poll, on Flower's real in-memory link state and
grid (no Ray): every message is delivered exactly once, a node never has two messages in flight, every reply
comes back, and the patches are only installed on the Flower version they were written for."""

import threading
import time
import uuid
from queue import Empty, Queue

import pytest

from fedlt.flower import engine


@pytest.fixture
def link():
    """A run registered on an in-memory LinkState with 6 nodes, as flwr.simulation.run_simulation sets it up."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(run_id=4242)
    run.primary_task_id = 77
    run.federation_id = NOOP_FEDERATION_ID
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[77] = Task(task_id=77, run_id=run.run_id)
    nodes = _register_nodes(6, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    return state, grid, nodes


def test_dispatch_and_replies_on_flowers_link_state(link):
    from flwr.app import Message, MessageType, MetricRecord, RecordDict

    state, grid, nodes = link
    queue: Queue = Queue()
    stop = threading.Event()
    in_flight: set[int] = set()
    seen: list[str] = []
    overlap: list[int] = []

    def client_worker():  # stands in for the engine's worker threads + actors
        while not stop.is_set():
            try:
                msg = queue.get(timeout=0.05)
            except Empty:
                continue
            nid = msg.metadata.dst_node_id
            if nid in in_flight:
                overlap.append(nid)
            in_flight.add(nid)
            seen.append(msg.metadata.message_id)
            time.sleep(0.04)  # long enough that a per-pass dispatcher would hand out a node's 2nd message
            reply = Message(RecordDict({"metrics": MetricRecord({"node": nid})}), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            in_flight.discard(nid)
            state.store_message_res(reply)

    threads = [threading.Thread(target=engine._dispatch_messages, args=(state, queue, nodes, stop)),
               *[threading.Thread(target=client_worker) for _ in range(2)]]
    for t in threads:
        t.start()
    try:
        # two messages per node in one send: the second one of a node must wait for the first's reply
        msgs = [Message(RecordDict({"metrics": MetricRecord({"i": i})}), dst_node_id=nid,
                        message_type=MessageType.TRAIN) for i in range(2) for nid in nodes]
        replies = list(engine._send_and_receive(grid, msgs, timeout=30))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
    assert len(replies) == 12 and not any(r.has_error() for r in replies)
    assert len(seen) == len(set(seen)) == 12  # each message delivered exactly once
    assert sorted(int(r.content["metrics"]["node"]) for r in replies) == sorted(list(nodes) * 2)
    assert not overlap  # never two messages of one node in flight


def test_patches_apply_to_flower_1_42_only(monkeypatch):
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if not flwr.__version__.startswith("1.42."):
        assert engine.tune_flower() is False
        return
    assert engine.tune_flower() is True
    assert vce_api.add_messages_to_queue is engine._dispatch_messages
    assert InMemoryGrid.send_and_receive is engine._send_and_receive
