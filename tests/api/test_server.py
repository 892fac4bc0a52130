"""The server-side strategy base: weighted aggregation, sampling, reply filtering, dtype-preserving merge."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedlt.core.rounds import Dispatch, client_of
from strategies.fedavg import Server as FedAvgServer

CFG = {"participation": 0.3, "num_clients": 40, "seed": 7}


def reply(client: int, n: int, arrays: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "client-id": client, "train/loss": 1.0})})
    return Message(content=content, dst_node_id=client + 100, message_type=MessageType.TRAIN)


def test_aggregation_is_weighted_by_sample_counts():
    s = FedAvgServer(CFG)
    replies = [reply(0, 10, {"w": np.array([1.0, 0.0], dtype=np.float32)}),
               reply(1, 30, {"w": np.array([5.0, 4.0], dtype=np.float32)})]
    arrays = s.aggregate(1, ArrayRecord(), replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [4.0, 3.0])


def test_sampling_is_seeded_by_round_and_independent_of_history():
    s1, s2 = FedAvgServer(CFG), FedAvgServer(CFG)
    a = s1.sample_clients(5)
    s2.sample_clients(1), s2.sample_clients(2)
    assert a == s2.sample_clients(5)
    assert len(a) == 12 and len(set(a)) == 12 and all(0 <= c < 40 for c in a)
    assert s1.sample_clients(6) != a


def test_non_finite_updates_are_rejected_and_replies_sorted_by_client():
    s = Dispatch(FedAvgServer(CFG), CFG)
    s.client_of_node = {100: 0, 101: 1, 102: 2}
    good2 = reply(2, 5, {"w": np.ones(2, dtype=np.float32)})
    bad = reply(1, 5, {"w": np.array([np.nan, 1.0], dtype=np.float32)})
    good0 = reply(0, 5, {"w": np.ones(2, dtype=np.float32)})
    ok, failures = s.split_replies([], [good2, bad, good0], 1.0)
    assert [client_of(r) for r in ok] == [0, 2]
    assert len(failures) == 1 and "non-finite" in failures[0]["reason"]


def test_merge_keeps_integer_buffers_integer_and_untouched_keys():
    old = ArrayRecord({"bn.num_batches_tracked": Array(np.array(3, dtype=np.int64)),
                       "w": Array(np.zeros(2, dtype=np.float32)), "kept": Array(np.ones(1, dtype=np.float32))})
    new = ArrayRecord({"bn.num_batches_tracked": Array(np.array(5.0)), "w": Array(np.ones(2, dtype=np.float32))})
    merged = FedAvgServer.merge(old, new)
    assert merged["bn.num_batches_tracked"].numpy().dtype == np.int64
    assert int(merged["bn.num_batches_tracked"].numpy()) == 5
    np.testing.assert_array_equal(merged["kept"].numpy(), [1.0])
    sd = merged.to_torch_state_dict()
    assert sd["w"].dtype == torch.float32


@pytest.mark.parametrize("participation,expected", [(1.0, 40), (0.01, 1), (0.5, 20)])
def test_sample_size(participation, expected):
    assert len(FedAvgServer({**CFG, "participation": participation}).sample_clients(1)) == expected
