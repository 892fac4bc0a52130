"""client_batching: the vectorised trainer gives each client the weights the one-client-at-a-time loop gives it
(float tolerance) -- for every strategy it accepts (personal state carried per client over two rounds), every
``loss=`` (per-client loss parameters) --, the Flower cohort reply is the sample-weighted average (or, for a
server with its own aggregate, every client's own reply), and the other strategies are refused naming why."""

import pytest
import torch

from fedlt.config import ConfigError
from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.core.cohort import check_supported, train_cohort
from strategies import get_strategy
from fedlt.models import build_model
from fedlt.seeding import torch_generator

from tests.core.batching import CFG, PLAN, synthetic_client


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model({"name": "cnn", "width": 4, "feature_dim": 16}, 1, 4)


def sequential(model, start, datas, gens):
    algo, out = ClientAlgorithm(CFG), []
    for d, g in zip(datas, gens, strict=True):
        model.load_state_dict(start)
        algo.train(ClientContext(model=model, data=d, cfg=CFG, round=1, generator=g))
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


# uneven sizes: clients finish at different steps and last batches differ (17 = 2x8 + 1 -> dropped single);
# equal full batches (the unmasked fast path); a client of 3 images (one short batch per epoch)
@pytest.mark.parametrize(("sizes", "steps"), [((21, 17, 32), (6, 4, 8)), ((16, 16, 16), (4, 4, 4)),
                                              ((40, 9, 3, 25), (10, 2, 2, 6))])
def test_vectorised_clients_match_the_sequential_loop(model, sizes, steps):
    torch.set_num_threads(1)
    datas = [synthetic_client(i, n) for i, n in enumerate(sizes)]
    gens = lambda: [torch_generator(3, 2, 1, c) for c in range(len(sizes))]  # noqa: E731
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seq = sequential(model, start, datas, gens())
    bat, metrics = train_cohort(model, start, datas, gens(), CFG)
    for a, b in zip(seq, bat, strict=True):
        for k in a:
            if a[k].is_floating_point():
                moved = float((a[k] - start[k]).abs().max())
                assert float((a[k] - b[k]).abs().max()) <= 1e-5 + 2e-3 * moved, k
            else:
                assert torch.equal(a[k], b[k]), k  # BatchNorm's step counter: each client's own number of steps
    assert [m["train/steps"] for m in metrics] == [float(n) for n in steps]
    # clients really differ (own data, own BatchNorm statistics): not one model copied K times
    rm = "backbone.body.1.running_mean"
    assert float((bat[0][rm] - bat[1][rm]).abs().max()) > 1e-3


def test_in_float64_the_vectorised_clients_are_the_sequential_ones_to_rounding(monkeypatch):
    """Over many steps float32 rounding differences are amplified by training itself (a 1e-6 relative nudge of
    the start weights moves a 12-step CNN update by up to 1e-3), so float32 agreement is only checked over a few
    steps; in float64 the vectorised trainer must agree with the one-client loop to rounding after 3 epochs of
    uneven clients (short masked batches, a 3-image client) -- any real difference in the update would show."""
    import fedlt.core.cohort
    import fedlt.data.federated
    from fedlt.data import augment

    def to_float64(x, mean, std):
        return augment.to_float(x, mean, std).double()

    monkeypatch.setattr(fedlt.core.cohort, "to_float", to_float64)
    monkeypatch.setattr(fedlt.data.federated, "to_float", to_float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model({"name": "cnn", "width": 8, "feature_dim": 16}, 1, 4).double()
    cfg = {**CFG, "local_epochs": 3}
    datas = [synthetic_client(i, n) for i, n in enumerate((83, 45, 3))]
    gens = lambda: [torch_generator(3, 2, 1, c) for c in range(3)]  # noqa: E731
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seq = []
    for d, g in zip(datas, gens(), strict=True):
        model.load_state_dict(start)
        ClientAlgorithm(cfg).train(ClientContext(model=model, data=d, cfg=cfg, round=1, generator=g))
        seq.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    bat, metrics = train_cohort(model, start, datas, gens(), cfg)
    assert [m["train/steps"] for m in metrics] == [33.0, 18.0, 3.0]
    for a, b in zip(seq, bat, strict=True):
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.allclose(a[k], b[k], rtol=0, atol=1e-10), k


def test_bf16_autocast_trains_near_the_float32_weights(model):
    """``backend.batched_autocast=bf16``: the vectorised step really runs in bfloat16 (the weights are not the
    float32 ones) yet each client's update stays within bf16 rounding of the float32 update; BatchNorm's step
    counters and the weights' dtype are unchanged."""
    torch.set_num_threads(1)
    datas = [synthetic_client(i, n) for i, n in enumerate((21, 9, 3))]
    gens = lambda: [torch_generator(3, 2, 1, c) for c in range(3)]  # noqa: E731
    start = {k: v.clone() for k, v in model.state_dict().items()}
    fp32, _ = train_cohort(model, start, datas, gens(), CFG)
    bf16, metrics = train_cohort(model, start, datas, gens(), {**CFG, "backend": {"batched_autocast": "bf16"}})
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics)
    for a, b in zip(fp32, bf16, strict=True):
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            if not a[k].is_floating_point():
                assert torch.equal(a[k], b[k]), k
        w = "head.weight"
        update, diff = (a[w] - start[w]).norm(), (a[w] - b[w]).norm()
        assert 0 < diff < 0.2 * update, (float(diff), float(update))


def test_bf16_autocast_needs_client_batching():
    from tests.core.probe import compose

    with pytest.raises(ConfigError, match=r"backend\.batched_autocast='bf16'.*client_batching=true"):
        compose("experiment=smoke", "backend.batched_autocast=bf16")
    with pytest.raises(ConfigError, match=r"backend\.batched_autocast='fp16'.*none, bf16"):
        compose("experiment=smoke", "backend.client_batching=true", "backend.batched_autocast=fp16")
    assert compose("experiment=smoke", "backend.client_batching=true",
                   "backend.batched_autocast=bf16")["backend"]["batched_autocast"] == "bf16"


def test_cohort_reply_is_the_sample_weighted_average(model, tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from fedlt.core import client_step
    from fedlt.core.client_step import ClientRuntime

    cfg = {**CFG, "backend": {"client_data_cache_mb": 0}}
    datas = {5: synthetic_client(5, 24), 9: synthetic_client(9, 8)}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rt = ClientRuntime(cfg, PLAN, ClientAlgorithm(cfg), model, start, "cpu")
    old = client_step.client_view
    client_step.client_view = lambda plan, cid, budget=0: datas[cid]
    try:
        msg = Message(RecordDict({"arrays": ArrayRecord({k: v for k, v in start.items()}),
                                  "config": ConfigRecord({"server-round": 1, "cohort": [5, 9]})}),
                      dst_node_id=1, message_type=f"{MessageType.TRAIN}.cohort")
        ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        reply = client_step.train_cohort_message(rt, msg, ctx)
    finally:
        client_step.client_view = old
    m = reply.content["metrics"]
    assert m["num-examples"] == 32 and m["num-clients"] == 2 and m["client-id"] == 5
    states, _ = train_cohort(model, start, [datas[5], datas[9]], [torch_generator(3, 2, 1, c) for c in (5, 9)],
                             cfg)
    got = reply.content["arrays"].to_torch_state_dict()
    k = "head.weight"
    torch.testing.assert_close(got[k], states[0][k] * 0.75 + states[1][k] * 0.25)


def test_unsupported_strategy_is_refused():
    """Centralized training (one client on the pooled data) is refused naming why; a strategy whose train has
    no batched form is refused naming the method and the hooks it would need."""
    from strategies.fedavg import FedAvgClient
    from strategies.fedavg import Server as FedAvgServer

    cfg = {**CFG, "strategy": {"name": "centralized"}}
    with pytest.raises(ConfigError, match=r"backend\.client_batching=true for strategy=centralized.*own train\(\) "
                                          r"\(CentralizedClient\.train\) with no batched form because it trains one "
                                          r"virtual client on the pooled training set"):
        check_supported(cfg, get_strategy("centralized"))

    class OwnLoop(FedAvgClient):
        def train(self, ctx):
            return super().train(ctx)

    class OwnLoopServer(FedAvgServer):
        client_cls = OwnLoop

    with pytest.raises(ConfigError, match=r"\(OwnLoop\.train\) with no batched form \(the ClientAlgorithm\.batched_\* "
                                          r"hooks, declared by batched_ready = True in OwnLoop\)"):
        check_supported({**CFG, "strategy": {"name": "fedavg"}}, OwnLoopServer)
    check_supported(CFG, get_strategy("fedavg"))  # fedavg is supported
    check_supported({**CFG, "loss": {"name": "focal"}}, get_strategy("fedavg"))  # so is every loss=


@pytest.mark.parametrize("name", __import__("strategies").STRATEGIES)
def test_every_strategy_is_batched_like_the_sequential_loop_or_refused(name, monkeypatch):
    """The batching matrix: each strategy either trains under client batching exactly as its own sequential
    client step does (float tolerance; two rounds, so personal state carried per client counts too; uneven
    clients, one of 3 images; BatchNorm counters exact), or is refused before Ray with the reasons (never
    silently trained with plain cross-entropy, as FedLC/FedETF once were)."""
    from fedlt.config import param_defaults
    from fedlt.core.cohort import unsupported_reasons
    from tests.core.batching import both_ways, mismatches

    server = get_strategy(name)
    cfg = {**CFG, "strategy": {"name": name, **param_defaults(server.params)}}
    if name == "feddyn":  # adaptive alpha_i reads the mean client size from the split: the synthetic clients' own
        monkeypatch.setattr("strategies.feddyn.mean_client_size", lambda split_path: 11.0)
    reasons = unsupported_reasons(server, cfg)
    if reasons:
        with pytest.raises(ConfigError, match=f"strategy={name}.*" + reasons[0].split("(")[0][:30]):
            check_supported(cfg, server)
        return
    for rnd, seq, bat in both_ways(server, cfg):
        assert not mismatches(seq, bat), (name, rnd, mismatches(seq, bat))


def test_ratioloss_is_batched_with_the_received_class_weights():
    """The matrix passes no ``received``, i.e. only Ratio Loss's plain-CE rounds; with the server's non-trivial
    per-class weights each client's weighted CE (a plain mean of alpha_y * CE) is batched as it trains alone."""
    from fedlt.config import param_defaults
    from strategies.ratioloss import WEIGHTS
    from tests.core.batching import both_ways, mismatches

    server = get_strategy("ratioloss")
    cfg = {**CFG, "strategy": {"name": "ratioloss", **param_defaults(server.params)}}
    received = {WEIGHTS: torch.tensor([1.0, 3.5, 0.6, 8.0])}
    for rnd, seq, bat in both_ways(server, cfg, received=received):
        assert not mismatches(seq, bat), (rnd, mismatches(seq, bat))


def test_fednh_is_batched_with_the_received_prototypes_and_uploads_the_same_class_means():
    """FedNH under client batching: the received global prototypes (not the initial ones) classify during the
    batched local SGD, and each client uploads the class means and counts its own ``train`` uploads."""
    import torch.nn.functional as F

    from fedlt.config import param_defaults
    from strategies.fednh import GLOBAL, UP, FedNHClient, set_prototypes
    from tests.core.batching import both_ways, mismatches

    class Sequential(FedNHClient):  # leaves the initial prototypes in the shared model, as a fresh node holds
        def train(self, ctx):
            metrics = super().train(ctx)
            set_prototypes(ctx.model, None)  # W is not in the state dict: the trained weights are unchanged
            return metrics

    server = get_strategy("fednh")
    cfg = {**CFG, "strategy": {"name": "fednh", **param_defaults(server.params)}}
    received = {GLOBAL: F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(5)), dim=1)}
    uploads: list = []
    for rnd, seq, bat in both_ways(server, cfg, algo=Sequential(cfg), batched_algo=FedNHClient(cfg),
                                   received=received, uploads=uploads):
        assert not mismatches(seq, bat), (rnd, mismatches(seq, bat))
    for seq_up, bat_up in uploads:
        for a, b in zip(seq_up, bat_up, strict=True):
            assert set(a) == set(b) == {UP + "proto", UP + "count"}
            for k in a:
                assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k


@pytest.mark.parametrize(("local_epochs", "body_epochs"), [(3, 1), (2, 0)])
def test_fedrep_is_batched_as_its_head_phase_then_its_body_phase(local_epochs, body_epochs):
    """FedRep's two phases (head epochs with the body frozen, then body epochs with the head frozen, fresh SGD
    each) under client batching: the same weights and the same reported metrics as its own train; training the
    head and body jointly (one phase, FedPer's update) would not be."""
    from fedlt.api.client import ClientAlgorithm
    from fedlt.config import param_defaults
    from fedlt.core.client_step import train_group
    from strategies.fedrep import FedRepClient
    from tests.core.batching import both_ways, mismatches, strategy_model

    server = get_strategy("fedrep")
    cfg = {**CFG, "local_epochs": local_epochs,
           "strategy": {"name": "fedrep", **param_defaults(server.params), "body_epochs": body_epochs}}
    for rnd, seq, bat in both_ways(server, cfg):
        assert not mismatches(seq, bat), (rnd, mismatches(seq, bat))

    class Joint(FedRepClient):  # the defining step removed: one phase over every parameter
        batched_phases = ClientAlgorithm.batched_phases
        batched_metrics = ClientAlgorithm.batched_metrics

    _, seq, joint = next(both_ways(server, cfg, batched_algo=Joint(cfg)))
    assert mismatches(seq, joint)
    model, base = strategy_model(server, cfg)
    algo, datas = FedRepClient(cfg), [synthetic_client(i, n) for i, n in enumerate((21, 9))]
    gens = lambda: [torch_generator(3, 2, 1, c) for c in range(2)]  # noqa: E731
    expected = []
    for d, g in zip(datas, gens(), strict=True):
        model.load_state_dict(base)
        expected.append(algo.train(ClientContext(model=model, data=d, cfg=cfg, round=1, generator=g)))
    _, _, metrics = train_group(algo, model, base, [({}, {})] * 2, datas, gens(), cfg, 1, "cpu")
    for want, got in zip(expected, metrics, strict=True):
        assert got.keys() == want.keys() and got["train/steps"] == want["train/steps"]
        assert all(abs(got[k] - want[k]) < 1e-4 for k in want), (want, got)


def test_fedproto_is_batched_with_the_received_prototypes_and_uploads_its_last_epochs_class_means():
    """FedProto under client batching: the prototype pull towards the received global prototypes (a class without
    one pulls nothing) and the upload of the per-class mean features of the LAST local epoch's batches, taken in
    training mode before each step's update (batched_collect), as its own train computes them."""
    import torch.nn.functional as F

    from fedlt.config import param_defaults
    from strategies.fedproto import GLOBAL, PRESENT, UP
    from tests.core.batching import both_ways, mismatches

    server = get_strategy("fedproto")
    cfg = {**CFG, "local_epochs": 3, "strategy": {"name": "fedproto", **param_defaults(server.params), "lamda": 1.0}}
    received = {GLOBAL: F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(7)), dim=1),
                PRESENT: torch.tensor([1.0, 0.0, 1.0, 1.0])}
    for rec in (None, received):
        uploads: list = []
        for rnd, seq, bat in both_ways(server, cfg, received=rec, uploads=uploads):
            assert not mismatches(seq, bat), (rnd, mismatches(seq, bat))
        for seq_up, bat_up in uploads:
            for a, b in zip(seq_up, bat_up, strict=True):
                assert set(a) == set(b) == {UP + "proto", UP + "count"}
                assert torch.equal(a[UP + "count"], b[UP + "count"])  # one epoch's label histogram
                assert torch.allclose(a[UP + "proto"], b[UP + "proto"], atol=1e-4, rtol=1e-3)
        counts = [u[UP + "count"].sum() for seq_up, _ in uploads[:1] for u in seq_up]
        assert counts == [21.0, 8.0, 3.0]  # the last epoch only (of 3; 9 = 8 + a batch of one, never drawn)


def test_ditto_is_batched_as_its_personal_phase_then_its_global_phase():
    """Ditto under client batching: first each client's personal model v (from its own state, else the received
    w) with the proximal pull to w for ``personal_epochs``, kept in its state; then w as FedAvg. The same w and v
    as its own train over two rounds; dropping the proximal term (the defining step) would not be."""
    from fedlt.config import param_defaults
    from strategies.ditto import DittoClient
    from tests.core.batching import both_ways, mismatches

    server = get_strategy("ditto")
    cfg = {**CFG, "strategy": {"name": "ditto", **param_defaults(server.params), "lam": 5.0, "personal_epochs": 1}}
    for rnd, seq, bat in both_ways(server, cfg):
        assert not mismatches(seq, bat), (rnd, mismatches(seq, bat))
        assert all(k.startswith("personal_model.") for _, state in bat for k in state) and bat[0][1]

    no_pull = {**cfg, "strategy": {**cfg["strategy"], "lam": 0.0}}
    _, seq, bat = next(both_ways(server, cfg, batched_algo=DittoClient(no_pull)))
    assert any("extra state personal_model." in m for m in mismatches(seq, bat))


def test_fedgrab_is_batched_with_its_balancer_state_and_leave_out_draws():
    """Fed-GraB under client batching once the prior exists: each step's PID controller update, per-logit weights,
    random leave-out draws (same generator, same order) and gradient-magnitude sums, carried over two rounds in
    the client's state, as its own train; the matrix above covers the warm-up rounds (no prior, plain BCE)."""
    from fedlt.config import param_defaults
    from strategies.fedgrab import ERR, POS, PRIOR
    from tests.core.batching import both_ways, mismatches

    server = get_strategy("fedgrab")
    cfg = {**CFG, "strategy": {"name": "fedgrab", **param_defaults(server.params)}}
    received = {PRIOR: torch.tensor([0.5, 0.3, 0.15, 0.05])}
    for rnd, seq, bat in both_ways(server, cfg, received=received):
        assert not mismatches(seq, bat), (rnd, mismatches(seq, bat))
        assert all(state[POS].abs().sum() > 0 and state[ERR].shape == (3, 4) for _, state in bat)


@pytest.mark.parametrize("loss", [
    {"name": "focal", "gamma": 2.0}, {"name": "class_balanced", "beta": 0.99, "base": "focal", "gamma": 1.0},
    {"name": "class_balanced", "beta": 0.99, "base": "ce", "gamma": 2.0}, {"name": "balanced_softmax"},
    {"name": "logit_adjustment", "tau": 0.5}, {"name": "logit_calibration", "tau": 1.0}, {"name": "gce", "q": 0.7},
    {"name": "sce", "alpha": 0.1, "beta": 1.0, "one_hot_floor": 1e-4},
    {"name": "ldam_drw", "max_margin": 0.5, "scale": 3.0, "drw_start": 0.0, "drw_beta": 0.99},
])
def test_every_loss_is_batched_with_per_client_parameters(loss):
    """``loss=`` under client batching: each client's own class counts give its own loss parameters (stacked and
    vmapped), and the result is the sequential loop's (uneven clients; DRW weights switched on for LDAM)."""
    from tests.core.batching import both_ways, mismatches

    cfg = {**CFG, "loss": loss}
    check_supported(cfg, get_strategy("fedavg"))
    for rnd, seq, bat in both_ways(get_strategy("fedavg"), cfg, rounds=1):
        assert not mismatches(seq, bat), (loss, mismatches(seq, bat))


@pytest.mark.parametrize("privacy", [(), ("privacy=dp_central", "privacy.sampling=fixed", "privacy.noise_multiplier=0",
                                          "privacy.clip_norm=0.05")], ids=["none", "dp_central"])
def test_a_server_with_its_own_aggregate_gets_every_clients_own_reply(tmp_path, privacy, monkeypatch):
    """fedavgm (Flower's FedAvgM) aggregates by itself: a cohort reply carries each client's own arrays and
    metrics (clipped one by one under DP, as alone), the round loop unpacks them, so aggregate() sees the same
    replies (one per client, in client order) and releases the one-client-per-message run's model (a small
    plain-SGD step: float rounding stays ~1e-6)."""
    from strategies import fedavgm
    from tests.core.probe import compose, run_inprocess

    seen = []
    real = fedavgm.Server.aggregate

    def spy(self, server_round, sent, replies):
        seen.append([int(r.content["metrics"]["client-id"]) for r in replies])
        return real(self, server_round, sent, replies)

    monkeypatch.setattr(fedavgm.Server, "aggregate", spy)
    run = ("experiment=smoke", "model.width=8", "model.feature_dim=16", "num_rounds=1", "eval.every=0",
           "checkpoint.every=0", "checkpoint.keep=0", "backend.batching_group=2", "optimizer.lr=0.001",
           "optimizer.momentum=0", "dataset.n_max=200", "strategy=fedavgm", *privacy)
    out = {}
    for batching in ("false", "true"):
        outcome, _ = run_inprocess(compose(*run, f"backend.client_batching={batching}"), tmp_path / batching)
        assert outcome.finished
        out[batching] = outcome.final_arrays.to_torch_state_dict()
    if not privacy:  # under dp_central the strategy sees the one noised reply either way
        assert len(seen) == 2 and seen[0] == seen[1] and len(seen[1]) == 3  # 3 clients in 2 cohort messages
    for k, a in out["false"].items():
        b = out["true"][k]
        assert float(((a.double() - b.double()).abs() / b.double().abs().clamp(min=1)).max()) <= 1e-5, k


@pytest.mark.parametrize("strategy", ["ditto", "fedproto", "fedgrab"])
def test_round_loop_with_client_batching_matches_one_message_per_client(tmp_path, strategy):
    """Through the real round loop (in-process grid): two rounds of a strategy whose batched form carries state
    between rounds (Ditto's personal model, FedProto's uploads and personal models, Fed-GraB's prior and
    balancer state) give the one-message-per-client run's global model and personalized accuracy."""
    from tests.core.probe import compose, run_inprocess

    run = ("experiment=smoke", "model.width=8", "model.feature_dim=16", "num_rounds=2", "eval.every=2",
           "checkpoint.every=0", "checkpoint.keep=0", "backend.batching_group=2", "optimizer.lr=0.001",
           "optimizer.momentum=0", "dataset.n_max=200", "participation=1.0", f"strategy={strategy}")
    out = {}
    for batching in ("false", "true"):
        outcome, _ = run_inprocess(compose(*run, f"backend.client_batching={batching}"), tmp_path / batching)
        assert outcome.finished and not outcome.failures
        out[batching] = outcome
    a, b = (out[x].final_arrays.to_torch_state_dict() for x in ("false", "true"))
    for k in a:
        assert float(((a[k].double() - b[k].double()).abs() / b[k].double().abs().clamp(min=1)).max()) <= 1e-4, k
    pa, pb = (out[x].rows[-1]["personalized/accuracy"] for x in ("false", "true"))
    assert pa == pytest.approx(pb, abs=0.01)

