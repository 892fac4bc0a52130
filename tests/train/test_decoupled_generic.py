"""Generic (federated) cRT and LWS (``eval.decoupled``, fedlt/train/decoupled.py): at every evaluation each client
re-trains a head (from the round's common re-initialisation) and LWS scales on its frozen features of the GLOBAL
model with class-aware sampling and returns them in its evaluate reply; the server averages them weighted by n_k
and scores ``generic/crt/*`` and ``generic/lws/*`` beside the strategy's own generic predictors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedlt.api.server import ServerAlgorithm
from fedlt.eval.generic import GenericEvaluation
from fedlt.train import decoupled
from fedlt.train.decoupled import CRT_BIAS, CRT_WEIGHT, LWS_SCALES
from tests.train.test_decoupled import TINY_RUN, toy_client

K, D = 3, 8


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Tests here build Flower messages by hand."""


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def evaluate_reply(client: int, train_counts: list[int], heads: dict[str, torch.Tensor]) -> Message:
    """An evaluate reply as the client step builds it (metrics + the generic heads)."""
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in heads.items()}),
                          "metrics": MetricRecord({"num-examples": 9, "client-id": client,
                                                   "train-total": list(train_counts)})})
    return Message(content=content, dst_node_id=client + 100, message_type=MessageType.EVALUATE)


def random_heads(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {CRT_WEIGHT: torch.randn(K, D, generator=g), CRT_BIAS: torch.randn(K, generator=g),
            LWS_SCALES: torch.rand(K, generator=g) + 0.5}


def tiny_model():
    from fedlt.models import build_model

    torch.manual_seed(0)
    return build_model({"name": "cnn", "width": 4, "feature_dim": D}, 1, K).eval()


def test_the_generic_head_and_scales_are_the_n_k_weighted_mean_of_the_clients():
    heads = [random_heads(s) for s in range(3)]
    sizes = [[10, 0, 0], [20, 5, 5], [1, 2, 7]]  # n_k = 10, 30, 10
    mean = ServerAlgorithm.decoupled_heads([evaluate_reply(c, n, h) for c, (n, h) in enumerate(zip(sizes, heads))])
    for key in (CRT_WEIGHT, CRT_BIAS, LWS_SCALES):
        expected = (10 * heads[0][key].double() + 30 * heads[1][key].double() + 10 * heads[2][key].double()) / 50
        assert torch.allclose(mean[key].double(), expected, atol=1e-6)
    # a reply without heads (a failed or older client) is left out, and none at all gives nothing to score
    bare = Message(content=RecordDict({"metrics": MetricRecord({"client-id": 9, "train-total": [5, 5, 5]})}),
                   dst_node_id=109, message_type=MessageType.EVALUATE)
    assert torch.equal(ServerAlgorithm.decoupled_heads([evaluate_reply(0, sizes[0], heads[0]), bare])[CRT_WEIGHT],
                       heads[0][CRT_WEIGHT])
    assert ServerAlgorithm.decoupled_heads([bare]) == {}


def test_generic_lws_with_every_scale_one_scores_exactly_as_the_unchanged_model():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 1, 8, 8, generator=g), torch.arange(K).repeat(20)
    evaluation = GenericEvaluation(y, K, train_counts=[100, 20, 4])
    cfg = {"seed": 1, "eval": {}}
    server = ServerAlgorithm(cfg)
    own, _ = server.generic_metrics(model, x, y, K, 16, evaluation)
    heads = {CRT_WEIGHT: model.head.weight.detach().clone(), CRT_BIAS: model.head.bias.detach().clone(),
             LWS_SCALES: torch.ones(K)}
    extra, detail = server.decoupled_metrics(model, [evaluate_reply(0, [5, 5, 5], heads)], x, y, 16, evaluation)
    assert {k for k in extra if not k.startswith(("generic/crt/", "generic/lws/"))} == set()  # primary untouched
    for name in ("lws", "crt"):  # crt here is the model's own head: the same scores too
        for key, value in own.items():
            if not key.startswith("generic/test_agnostic/"):
                got = extra[f"generic/{name}/{key[len('generic/'):]}"]
                assert got == value or (got != got and value != value), (name, key)  # NaN: an empty group
    assert "generic/lws/cumulative_75_95/tail_accuracy" in extra and "lws/per_class_accuracy" in detail


def test_each_client_trains_both_heads_with_class_aware_sampling_from_a_common_init(monkeypatch):
    """The defining step: cRT and LWS epochs are class-aware draws (balanced over the held classes), and every
    client's cRT starts from the same head. Fails if the class-aware sampler is replaced by plain shuffles."""
    draws = []
    real = decoupled.class_aware

    def spy(labels, per_class, generator):
        epoch = real(labels, per_class, generator)

        def recorded():
            idx = epoch()
            draws.append(torch.bincount(labels[idx], minlength=K))
            return idx

        return recorded

    inits = []
    real_fresh = decoupled.fresh_head
    monkeypatch.setattr(decoupled, "class_aware", spy)
    monkeypatch.setattr(decoupled, "fresh_head", lambda *a: inits.append(real_fresh(*a).weight.clone()) or
                        real_fresh(*a))
    cfg = {"seed": 1, "eval": {"batch_size": 64, "decoupled": {"enabled": True, "batch_size": 16, "crt_epochs": 2,
                                                                "lws_epochs": 1}}}
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ups = [decoupled.generic_uploads(model, toy_client(cid, counts=(60, 12, 3)), cfg, 5) for cid in (0, 1)]
    assert len(draws) == 2 * (2 + 1)  # per client: 2 cRT epochs + 1 LWS epoch, all class-aware
    for counts in draws:
        assert counts.max() - counts.min() <= 4 and counts.sum() == 3 * 60  # C x max n_c, balanced (groups of 4)
    assert len(inits) == 2 and torch.equal(inits[0], inits[1])  # the round's common re-initialisation
    assert not torch.equal(ups[0][CRT_WEIGHT], ups[1][CRT_WEIGHT])  # then each client's own training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and not model.training


def test_generic_cRT_and_LWS_apply_only_where_features_and_head_are_the_global_ones():
    from strategies import get_strategy
    from tests.strategies.conftest import build, tiny_cfg

    x = torch.randn(2, 1, 8, 8)
    cfg = tiny_cfg({"name": "x"})
    for name in ("fedavg", "fedrod", "fedbabu", "ditto", "ccvr"):
        cls = get_strategy(name).client_cls
        assert decoupled.generic_problem(cfg, build(cls, cfg), cls.is_personal, x) == "", name
    for name, key in (("fedper", "head.weight"), ("fedbn", "local_bn."), ("local", "backbone.")):
        cls = get_strategy(name).client_cls
        why = decoupled.generic_problem(cfg, build(cls, cfg), cls.is_personal, x)
        assert "personal state" in why and key in why, (name, why)
    fedavg = get_strategy("fedavg").client_cls
    assert "privacy=dp_central" in decoupled.generic_problem({**cfg, "privacy": {"name": "dp_central"}},
                                                             build(fedavg, cfg), fedavg.is_personal, x)


def test_a_run_logs_generic_crt_and_lws_beside_the_unchanged_generic_predictors(tmp_path):
    from fedlt.core.inprocess import run_inprocess
    from fedlt.data.federated import prepare
    from strategies import get_strategy
    from tests.core.probe import compose

    rows = {}
    for enabled in (False, True):
        cfg = compose(*TINY_RUN, f"cache_dir={tmp_path}", f"eval.decoupled.enabled={str(enabled).lower()}")
        plan, _, _ = prepare(cfg)
        rows[enabled] = run_inprocess(cfg, plan, get_strategy("fedavg")).rows[-1]
    on, off = rows[True], rows[False]
    for name in ("crt", "lws"):
        assert 0.0 <= on[f"generic/{name}/accuracy"] <= 1.0
        assert f"generic/{name}/cumulative_75_95/tail_accuracy" in on
    own = [k for k in off if k.startswith("generic/")]
    assert own and all(on[k] == off[k] for k in own)  # the strategy's own generic predictors: unchanged
