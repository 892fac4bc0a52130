"""FedLoGe under client batching (``backend.client_batching``): its batched hook (``FedLoGeClient.batched_loss`` and
``batched_groups``) gives every client what its own ``train`` gives it -- backbone, psi, the client's personal head
phi_k carried per client from round to round, BatchNorm running statistics and step counters -- on uneven clients
(one of 3 images); a hook without one of FedLoGe's defining terms is caught; the cohort message carries each
client's phi_k back under its own record and never uploads phi_k or the SSE-C; a run with client batching equals
the one-client-per-message run."""

from __future__ import annotations

import pytest
import torch

from fedlt.config import param_defaults
from fedlt.train.losses import masked_loss
from strategies.fedloge import FedLoGeClient, Server
from tests.core.batching import CFG, both_ways, mismatches

FEDLOGE = {**CFG, "strategy": {"name": "fedloge", **param_defaults(Server.params), "refine_steps": 200}}


def test_batched_fedloge_is_the_sequential_fedloge_client_by_client():
    for rnd, seq, bat in both_ways(Server, FEDLOGE, sizes=(21, 9, 3, 40)):
        assert not mismatches(seq, bat), (rnd, mismatches(seq, bat))
        heads = [sd["personal_head.weight"] for sd, _ in bat]
        assert not torch.allclose(heads[0], heads[1])  # each client its own phi_k, not one head copied
        assert all(torch.equal(sd["sse_c.weight"], seq[0][0]["sse_c.weight"]) for sd, _ in bat)  # frozen
        steps = [int(sd["backbone.body.1.num_batches_tracked"]) for sd, _ in bat]
        assert steps == [int(sd["backbone.body.1.num_batches_tracked"]) for sd, _ in seq]
        assert all(FedLoGeClient.PERSONAL_READY in st for _, st in bat)


class NoPersonalTerm(FedLoGeClient):
    def batched_loss(self, model, x, y, weight, terms):
        h = model.backbone(x)
        loss = masked_loss({}, model.sse_c(h), y, weight) + masked_loss({}, model.global_head(h.detach()), y, weight)
        return loss, {"train/loss": loss}


class NoGlobalTerm(FedLoGeClient):
    def batched_loss(self, model, x, y, weight, terms):
        h = model.backbone(x)
        loss = masked_loss({}, model.sse_c(h), y, weight) + masked_loss({}, model.personal_head(h.detach()), y,
                                                                        weight)
        return loss, {"train/loss": loss}


class HeadsNotDetached(FedLoGeClient):  # the heads' losses leak into the backbone
    def batched_loss(self, model, x, y, weight, terms):
        h = model.backbone(x)
        loss = sum(masked_loss({}, head(h), y, weight) for head in (model.sse_c, model.global_head,
                                                                     model.personal_head))
        return loss, {"train/loss": loss}


class OneOptimizer(FedLoGeClient):  # the heads with the backbone's weight decay
    def batched_groups(self, model, cfg):
        return [((), cfg["optimizer"])]


@pytest.mark.parametrize(("mutant", "broken"), [(NoPersonalTerm, "personal_head."), (NoGlobalTerm, "global_head."),
                                                 (HeadsNotDetached, "backbone."), (OneOptimizer, "_head.")])
def test_a_hook_without_a_defining_term_is_caught(mutant, broken):
    """The equivalence check is sharp: dropping phi_k's loss on detached features, psi's loss, the detach, or the
    heads' own optimizer settings each breaks it where expected."""
    _, seq, bat = next(both_ways(Server, FEDLOGE, rounds=1, batched_algo=mutant(FEDLOGE)))
    wrong = mismatches(seq, bat)
    assert any(broken in m for m in wrong), wrong


def test_cohort_message_keeps_phi_k_per_client_and_uploads_only_shared(monkeypatch):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from fedlt.core import client_step
    from fedlt.core.client_state import MODE_KEY, PERSONAL, STATE, ClientStateStore, cohort_key
    from fedlt.core.client_step import ClientRuntime
    from tests.core.batching import strategy_model, synthetic_client

    cfg = {**FEDLOGE, "backend": {"client_data_cache_mb": 0}}
    model, start = strategy_model(Server, cfg)
    datas = {5: synthetic_client(5, 24), 9: synthetic_client(9, 3)}
    rt = ClientRuntime(cfg, datas[5].plan, FedLoGeClient(cfg), model, start, "cpu")
    monkeypatch.setattr(client_step, "client_view", lambda plan, cid, budget=0: datas[cid])
    frozen = {k: v for k, v in start.items() if FedLoGeClient.is_frozen(k)}
    shared = {k: v for k, v in start.items() if FedLoGeClient.is_shared(k)}
    store = ClientStateStore()
    store.records[9] = {PERSONAL: ArrayRecord({"personal_head.weight": torch.full((4, 16), 0.01),
                                                "personal_head.bias": torch.zeros(4)}),
                        STATE: ArrayRecord({FedLoGeClient.PERSONAL_READY: torch.ones(1)})}
    msg = Message(RecordDict({"arrays": ArrayRecord(shared), "frozen": ArrayRecord(frozen),
                              "config": ConfigRecord({"server-round": 1, "cohort": [5, 9]})}),
                  dst_node_id=1, message_type=f"{MessageType.TRAIN}.cohort")
    store.attach_cohort(msg, [5, 9])
    assert msg.content["config"][MODE_KEY] == "server" and cohort_key(PERSONAL, 9) in msg.content
    reply = client_step.train_cohort_message(rt, msg, Context(run_id=1, node_id=1, node_config={},
                                                              state=RecordDict(), run_config={}))
    uploaded = set(reply.content["arrays"].keys())
    assert uploaded == set(shared) and not any(k.startswith(("personal_head.", "sse_c.")) for k in uploaded)
    heads = {c: reply.content[cohort_key(PERSONAL, c)].to_torch_state_dict()["personal_head.weight"] for c in (5, 9)}
    # client 9 started from the head the server held for it (near 0.01), client 5 from its own seeded init
    assert float((heads[9] - 0.01).abs().mean()) < float((heads[5] - 0.01).abs().mean())
    store.collect([reply], lambda r: 5)
    assert set(store.records) == {5, 9} and all(set(r) == {PERSONAL, STATE} for r in store.records.values())
    assert not any("/" in k for k in reply.content.keys())  # the per-client records were taken out


@pytest.mark.parametrize("strategy", ["fedloge", "fedavgm"])
def test_a_run_with_client_batching_equals_the_one_client_per_message_run(strategy, tmp_path):
    """The real round loop (in process): rows, global arrays and every client's state agree. fedavgm aggregates
    by itself, so its cohort replies carry every client's own reply (unpacked by the round loop). Tolerance: float
    rounding of ~100 vectorised SGD steps over two rounds (plain fedavg differs by as much); a lost or mixed-up
    personal head differs by ~0.1."""
    from tests.strategies._inprocess import config, run_inprocess

    extra = ("dataset.n_max=200", *(("strategy.refine_steps=100",) if strategy == "fedloge" else ()))
    runs = {}
    for batching in ("false", "true"):
        cfg = config(strategy, *extra, f"backend.client_batching={batching}", "backend.torch_threads=1",
                     "checkpoint.every=2", rounds=2)
        runs[batching], _ = run_inprocess(cfg, tmp_path / batching)
    a, b = (runs[k].final_arrays.to_torch_state_dict() for k in ("false", "true"))
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=5e-3, rtol=1e-2), k
    ra, rb = runs["false"].rows[-1], runs["true"].rows[-1]
    assert ra["train/clients"] == rb["train/clients"]
    assert abs(ra["personalized/accuracy"] - rb["personalized/accuracy"]) < 0.02
    from fedlt.core import checkpoint

    ca = checkpoint.latest(tmp_path / "false", config(strategy, *extra, rounds=2)).clients
    cb = checkpoint.latest(tmp_path / "true", config(strategy, *extra, "backend.client_batching=true",
                                                     rounds=2)).clients
    assert ca.keys() == cb.keys()
    for cid in ca:
        for name in ca[cid]:
            for k, v in ca[cid][name].items():
                assert torch.allclose(v.double(), cb[cid][name][k].double(), atol=5e-3, rtol=1e-2), (cid, k)
