"""Failure reasons a user reads in results.json and metrics.jsonl: one sentence naming the client, round, phase
and the error's type and first line -- never a piece of a traceback -- for every way a client can fail (an
exception, an allocation failure, a dead actor, a NaN update, no reply in time); long messages are cut at a
clause end and say how much is left out."""

import re

import pytest

from fedlt.core import failures
from fedlt.core.failures import clip, error_failure, error_of
from tests.conftest import needs_fmnist
from tests.core.probe import compose, run_inprocess

# A ClientApp exception as Flower 1.42 + Ray 2.55 hand it to the server (recorded from a real run; paths shortened)
RAY_RAISE = """<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m \
(pid=9491, ip=192.0.2.2, actor_id=c1b656a61c0d84f17fa2e31201000000, repr=<flwr.simulation.ray_transport.ray_actor.\
ClientAppActor object at 0x7fec968aaed0>)
                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/x/flwr/clientapp/client_app.py", line 161, in __call__
    return self._registered_funcs[full_name](message, context)
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/x/fedlt/core/faults.py", line 50, in act_out_fault
    raise RuntimeError(what)
RuntimeError: injected fault (fault_injection.mode=raise) in client 2, round 1, evaluate
second line of the message

The above exception was the direct cause of the following exception:

\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=9491, ip=192.0.2.2, actor_id=c1b656a61c0d84f17fa2e31201000000)
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/x/flwr/simulation/ray_transport/ray_actor.py", line 65, in run
    raise ClientAppException(str(ex)) from ex
flwr.clientapp.client_app.ClientAppException: 
Exception ClientAppException occurred. Message: injected fault (fault_injection.mode=raise) in client 2, round 1, \
evaluate'>"""
RAY_ACTOR_GONE = ("<class 'ray.exceptions.ActorUnavailableError'>:<'The actor 8ab95f30ab2d8dd1e832af3201000000 is "
                  "unavailable: The actor is temporarily unavailable: RpcError: RPC error: Socket closed rpc_code: 14. "
                  "The task may or may not have been executed on the actor.'>")
SENTENCE = re.compile(r"^client \d+ failed in round \d+ \((train|evaluate)\): \S.*[.!?]$")


def is_sentence(reason: str) -> bool:
    """One line, of the documented form, without traceback pieces."""
    return (bool(SENTENCE.match(reason)) and "\n" not in reason and "Traceback" not in reason
            and 'File "' not in reason and "^^^" not in reason and "ClientAppException" not in reason)


def test_a_ray_wrapped_client_exception_reads_as_its_own_type_and_first_line():
    assert error_of(RAY_RAISE) == (
        "RuntimeError", "injected fault (fault_injection.mode=raise) in client 2, round 1, evaluate", False)
    f = error_failure(2, 1, "evaluate", RAY_RAISE)
    assert f == {"client": 2, "round": 1, "phase": "evaluate", "kind": "error",
                 "reason": "client 2 failed in round 1 (evaluate): RuntimeError: injected fault "
                           "(fault_injection.mode=raise) in client 2, round 1, evaluate."}
    assert is_sentence(f["reason"])


def test_a_dead_actor_is_named_as_such_and_stops_nothing_by_itself():
    f = error_failure(3, 2, "train", RAY_ACTOR_GONE)
    assert f["kind"] == failures.ACTOR_DIED and failures.is_backend_failure(f)
    assert f["reason"].startswith("client 3 failed in round 2 (train): its actor process died (Ray's "
                                  "ActorUnavailableError: The actor 8ab95f30")
    assert f["reason"].endswith("may or may not have been executed on the actor).") and is_sentence(f["reason"])


def test_in_process_reasons_keep_the_exception_type_and_a_torch_oom_is_not_a_dead_actor():
    etype, message, died = error_of("<class 'torch.OutOfMemoryError'>:<'CUDA out of memory. Tried to allocate "
                                    "2.00 GiB.\nmore detail'>")
    assert (etype, message, died) == ("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB.", False)
    assert error_of("<class 'builtins.ValueError'>:<''>") == ("ValueError", "", False)
    assert error_failure(0, 1, "train", "<class 'builtins.ValueError'>:<''>")["reason"] == (
        "client 0 failed in round 1 (train): ValueError.")


def test_long_messages_are_cut_at_a_clause_end_saying_how_much_is_left_out():
    message = "CUDA out of memory. " + "Tried to allocate 20.00 MiB, " * 30 + "see the documentation."
    cut = clip(message, 200)
    assert len(cut) < 240 and cut.endswith(f"({len(message) - len(cut.split(' (')[0])} more characters in the log)")
    assert cut.split(" (")[0].endswith(("MiB", "memory."))  # a clause end, never inside a word or a number
    assert clip("short.", 200) == "short."
    f = error_failure(1, 4, "train", f"<class 'builtins.RuntimeError'>:<'{message}'>")
    assert is_sentence(f["reason"]) and "more characters in the log)." in f["reason"]


@pytest.mark.parametrize("text", ["no punctuation at all " * 40, "x" * 900])
def test_a_cut_never_splits_a_word(text):
    kept = clip(text, 100).split(" (")[0]
    assert len(kept) <= 100 and (text.startswith(kept + " ") or set(kept) == {"x"})


@needs_fmnist
def test_every_fault_mode_is_recorded_as_a_sentence_in_process(tmp_path, monkeypatch):
    """raise, oom and nan through the real client step; a reply lost in transit (what a timeout looks like to
    the round loop) by a grid that drops one client's reply. ``exit`` needs a real actor process:
    tests/test_reliability_e2e.py."""
    from fedlt.core.faults import injected_fault
    from fedlt.core.inprocess import InProcessGrid

    send = InProcessGrid.send_and_receive

    def lose_client_1_in_round_2(self, messages, *, timeout=None):
        messages = list(messages)
        replies = send(self, messages, timeout=timeout)
        if any(m.content["config"].get("server-round") == 2 for m in messages):
            replies = [r for r in replies if r.metadata.src_node_id != 101]  # node 100 + i is client i
        return replies

    monkeypatch.setattr(InProcessGrid, "send_and_receive", lose_client_1_in_round_2)
    cfg = compose("experiment=smoke", "model.width=8", "model.feature_dim=16", "num_clients=4", "participation=1",
                  "num_rounds=2", "eval.every=1", "dataset.n_max=600", "seed=5", "fault_injection.probability=0.3",
                  "fault_injection.mode=[raise,oom,nan]", "fault_injection.phase=any")
    outcome, strategy = run_inprocess(cfg, tmp_path / "run")
    by_key = {(f["client"], f["round"], f["phase"]): f for f in outcome.failures}
    expected = {(c, r, p): injected_fault(cfg, c, r, p) for r in (1, 2) for c in range(4) for p in ("train",
                                                                                                   "evaluate")}
    expected = {k: m for k, m in expected.items() if m is not None}
    assert set(expected.values()) == {"raise", "oom", "nan"}  # the seed exercises every mode
    for phase in ("train", "evaluate"):
        expected[(1, 2, phase)] = "timeout"  # its reply never arrives, whatever it held
    assert set(by_key) == set(expected)
    what = {"raise": r"RuntimeError: injected fault \(fault_injection\.mode=raise\) in client {c}, round {r}, {p}\.$",
            "oom": r"RuntimeError: .*can't allocate memory",
            "nan": r"non-finite update \(NaN or inf values in [\w.]+(, [\w.]+)*( and \d+ more arrays)?\); it was "
                   r"rejected\.$",
            "timeout": r"no reply within backend\.round_timeout_s=\d+ s; the round went on without it\.$"}
    for (c, r, p), mode in expected.items():
        f = by_key[(c, r, p)]
        assert is_sentence(f["reason"]), f
        head = f"client {c} failed in round {r} ({p}): "
        assert f["reason"].startswith(head) and re.match(what[mode].format(c=c, r=r, p=p), f["reason"][len(head):]), f
        assert f["kind"] == {"raise": "error", "oom": "error", "nan": "non-finite", "timeout": "timeout"}[mode]
