"""Secure aggregation (privacy.secagg, fedlt/privacy/secagg.py): the unmasked SecAgg+ sum equals fedlt's plain
sample-weighted aggregate within the quantization error, also when a client drops out after sharing its keys; the
server never receives an individual update in the clear; the masks really hide (and are really removed); below the
threshold a round fails with a failure sentence; strategies that need more than the mean are refused; and a
Flower + Ray run with dp_central finishes and logs its privacy metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedlt.config import ConfigError
from fedlt.core.failures import ABORTED
from fedlt.privacy import secagg
from fedlt.privacy.secagg import MASKED, MODULUS, SECAGG, SecAggServer
from fedlt.seeding import FAULT, numpy_rng
from tests.conftest import needs_fmnist, read_jsonl, run_fedlt
from tests.core.probe import compose, run_inprocess
from tests.privacy.helpers import arrays, run_cfg

SHAPES = {"conv.weight": (4, 3), "conv.bias": (4,), "bn.running_var": (4,), "head.weight": (2, 4)}
QUANT_ERROR = 1e-5  # 2 * clipping_range / 2^22 per entry, over a few clients, divided by the total weight


def setup(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sent = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    sent["bn.num_batches_tracked"] = torch.tensor(7)
    trained = {c: {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3
                   for k, v in sent.items()} for c in range(n)}
    sizes = {c: 50 + 37 * c for c in range(n)}
    return sent, trained, sizes


class Clients:
    """The clients' side of the protocol, delivered in process; ``drop``: phase -> clients that fail in it;
    ``received``: every reply the server got."""

    def __init__(self, sent, trained, sizes, drop=None, seed: int = 3):
        self.sent, self.trained, self.sizes, self.seed = sent, trained, sizes, seed
        self.drop = drop or {}
        self.state = {c: RecordDict() for c in trained}
        self.received: list[Message] = []

    def exchange(self, phase: str, msgs: list[Message]) -> list[Message]:
        out = []
        for m in msgs:
            c = m.metadata.dst_node_id - 100
            if c in self.drop.get(phase, ()):
                continue
            if phase == "train":
                vec = secagg.masked_upload(self.state[c], m.content[SECAGG], m.content["arrays"], self.trained[c],
                                           self.sizes[c], None, self.seed, c)
                content = RecordDict({"arrays": ArrayRecord({MASKED: Array(vec)}),
                                      "metrics": MetricRecord({"client-id": c, "num-examples": self.sizes[c]})})
            else:
                content = secagg.client_stage(m.content, self.state[c], c)
            out.append(Message(content, reply_to=m))
        self.received += out
        return out

    def run(self, mode: str = "none", **privacy):
        cfg = run_cfg(mode, num_clients=len(self.trained), participation=1.0, seed=self.seed, **privacy)
        rec = arrays(self.sent)
        msgs = [Message(RecordDict({"arrays": rec, "config": ConfigRecord({"server-round": 1})}), dst_node_id=100 + c,
                        message_type=MessageType.TRAIN) for c in sorted(self.trained)]
        server = SecAggServer(cfg, max(self.sizes.values()))
        return server.run(1, rec, msgs, {100 + c: c for c in self.trained}, self.exchange)


def plain_mean(sent, trained, sizes, clients):
    total = sum(sizes[c] for c in clients)
    return {k: sum(trained[c][k].double() * sizes[c] for c in clients) / total
            for k, v in sent.items() if v.is_floating_point()}


def secure_mean(result, sent) -> dict[str, torch.Tensor]:
    return result.mean_reply(arrays(sent)).content["arrays"].to_torch_state_dict()


def max_error(got: dict, want: dict) -> float:
    return max(float((got[k].double() - want[k]).abs().max()) for k in want)


def test_secure_aggregate_equals_the_plain_weighted_aggregate():
    sent, trained, sizes = setup()
    result = Clients(sent, trained, sizes).run()
    assert result.failure is None and result.metrics["secagg/clients"] == 5
    got = secure_mean(result, sent)
    assert max_error(got, plain_mean(sent, trained, sizes, range(5))) < QUANT_ERROR
    assert int(got["bn.num_batches_tracked"]) == 7  # integer buffers keep the server's value


def test_a_client_dropped_after_sharing_its_keys_is_unmasked_and_left_out():
    """Also the test that fails if the dropped client's pairwise masks are not removed: they are uniform in
    [0, 2^32) and would wreck every entry."""
    sent, trained, sizes = setup()
    clients = Clients(sent, trained, sizes, drop={"train": {2}})
    result = clients.run()
    assert result.failure is None
    assert result.metrics["secagg/clients"] == 4 and result.metrics["secagg/dropouts_recovered"] == 1
    assert max_error(secure_mean(result, sent), plain_mean(sent, trained, sizes, [0, 1, 3, 4])) < QUANT_ERROR
    assert [int(r.content["metrics"]["client-id"]) for r in result.replies] == [0, 1, 3, 4]


def test_dp_central_sums_with_equal_weights_and_counts_unclipped_bits_securely():
    sent, trained, sizes = setup(4)
    result = Clients(sent, trained, sizes).run("dp_central")
    want = {k: sum(trained[c][k].double() - sent[k].double() for c in range(4)) for k in result.total}
    assert result.weight == 4.0  # every weight is 1: the SUM of (clipped) updates goes to RunPrivacy.release
    assert max(float((result.total[k] - want[k]).abs().max()) for k in want) < 4 * QUANT_ERROR


def test_the_server_never_receives_an_individual_update():
    sent, trained, sizes = setup()
    clients = Clients(sent, trained, sizes)
    clients.run()
    uploads = [r for r in clients.received if MASKED in r.content.get("arrays", {})]
    assert len(uploads) == 5
    for r in clients.received:  # key material and ciphertexts only, besides the masked vectors
        assert all(not np.issubdtype(a.numpy().dtype, np.floating)
                   for rec in r.content.array_records.values() for a in rec.values())
    target = 2**22
    for r in uploads:
        c = int(r.content["metrics"]["client-id"])
        ratio = round(sizes[c] / max(sizes.values()) * target) / target
        update = torch.cat([(trained[c][k].double() - sent[k].double()).flatten() * ratio
                            for k in secagg.float_keys(arrays(sent))]).numpy()
        true = (update + 8.0) * target / 16.0
        masked = r.content["arrays"][MASKED].numpy()[secagg.HEADER:]
        assert np.abs(masked - true).mean() > MODULUS / 8  # uniform noise: ~2^32 / 3 away; true is ~2^21
        # no linear trace of the update: |r| within 4 null stds (1/sqrt(n); n = 28 entries here, so a fixed 0.5
        # bound failed ~1 % of runs by chance with the OS-random keys)
        assert abs(np.corrcoef(masked, true)[0, 1]) < 4 / np.sqrt(len(true))


def test_each_upload_is_hidden_by_its_self_mask_alone(monkeypatch):
    """Fails if the self mask is skipped: with the pairwise masks switched off, the self mask alone must hide
    every upload, and the server must still remove it exactly."""
    monkeypatch.setattr(secagg, "pairwise_mask", lambda sk1, pk1, length: np.zeros(length, np.int64))
    sent, trained, sizes = setup(3)
    clients = Clients(sent, trained, sizes)
    result = clients.run()
    assert max_error(secure_mean(result, sent), plain_mean(sent, trained, sizes, range(3))) < QUANT_ERROR
    for r in clients.received:
        if MASKED in r.content.get("arrays", {}):
            assert r.content["arrays"][MASKED].numpy()[secagg.HEADER:].mean() > 2**29  # not ~2^21: masked


def test_below_the_threshold_the_round_fails_with_a_sentence():
    sent, trained, sizes = setup(3)
    result = Clients(sent, trained, sizes, drop={"train": {0, 1}}).run()  # 3 clients, threshold 2: one left
    assert result.total is None and result.replies == []
    assert "fewer than the reconstruction threshold 2" in result.failure
    assert result.not_sent == set()  # every train message went out


def test_non_ready_strategies_and_options_are_refused():
    for overrides, named in [(("strategy=scaffold",), "privacy.secagg=true with strategy=scaffold"),
                             (("strategy=ccvr",), "privacy.secagg=true with strategy=ccvr"),
                             (("backend.client_batching=true",), "backend.client_batching=true"),
                             (("num_clients=4", "participation=0.25"), "1 client per round")]:
        with pytest.raises(ConfigError, match=named):
            compose("experiment=smoke", "privacy.secagg=true", *overrides)
    for strategy in ("fedavg", "fedprox", "fedloge", "fedbn", "fedrep", "fedavgm"):
        assert compose("experiment=smoke", "privacy=dp_local", "privacy.secagg=true",
                       f"strategy={strategy}")["privacy"]["secagg"]


def test_in_process_run_survives_a_dropout_and_matches_the_survivors_mean(tmp_path, monkeypatch):
    """The real client step and round loop over the in-process grid: 5 clients, one fails in training (after it
    shared its keys); the new global model is the plain sample-weighted mean of the other four."""
    seen = {}
    real = secagg.masked_upload

    def spy(state, cfg, sent, shared, num_examples, unclipped, seed, cid):
        seen[cid] = ({k: v.clone() for k, v in shared.items()}, num_examples)
        return real(state, cfg, sent, shared, num_examples, unclipped, seed, cid)

    monkeypatch.setattr(secagg, "masked_upload", spy)
    draws = sorted((numpy_rng(3407, FAULT, 1, c).random(), c) for c in range(5))
    p = (draws[0][0] + draws[1][0]) / 2  # exactly one client fails in round 1
    cfg = compose("experiment=smoke", "dataset=synthetic_lt", "dataset.num_classes=10", "dataset.train_per_class=60",
                  "dataset.test_per_class=10", "dataset.imbalance_factor=10", "model.width=8", "model.feature_dim=16",
                  "num_clients=5", "participation=1.0", "num_rounds=1", "seed=3407", "checkpoint.every=0",
                  "privacy.secagg=true", f"fault_injection.probability={p}", "fault_injection.mode=raise")
    outcome, _ = run_inprocess(cfg, tmp_path / "run")
    assert outcome.finished and sorted(seen) == sorted(c for _, c in draws[1:])
    row = outcome.rows[-1]
    assert row["secagg/clients"] == 4 and row["secagg/dropouts_recovered"] == 1
    assert [f["client"] for f in outcome.failures] == [draws[0][1]]
    total = sum(n for _, n in seen.values())
    got = outcome.final_arrays.to_torch_state_dict()
    for k, v in got.items():
        if v.is_floating_point():
            want = sum(s[k].double() * n for s, n in seen.values()) / total
            assert float((v.double() - want).abs().max()) < QUANT_ERROR, k
    assert outcome.privacy["secure_aggregation"]["share_fraction"] == 0.6


@pytest.mark.e2e
@needs_fmnist
def test_flower_ray_run_with_dp_central_and_secagg(tmp_path):
    run_dir = tmp_path / "run"
    res = run_fedlt("experiment=smoke", "privacy=dp_central", "privacy.secagg=true", "num_rounds=2",
                    run_dir=run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows and all(k in rows[-1] for k in ("privacy/epsilon", "privacy/noise_multiplier", "secagg/clients"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["privacy"]["mode"] == "dp_central" and "secure_aggregation" in results["privacy"]
    assert results["rounds_completed"] == 2 and 0 < results["privacy/epsilon"] < float("inf")
    assert rows[-1]["secagg/clients"] >= 2  # this seed's Poisson sample: 1 client in round 1, 2 in round 2
    assert all("a secure sum needs at least 2" in f["reason"] for f in results["failures"] if f["kind"] == ABORTED)
