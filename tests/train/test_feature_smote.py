"""Feature SMOTE inside the local SGD step (``feature_smote``, fedlt/train/feature_smote.py): every batch's head
loss gets SMOTE features of the client's tail classes (k-NN interpolation inside a per-class memory of this round's
features), so the head sees the held classes at the stated ratio of the batch's largest class; seeded per
(seed, round, client) without touching the batch draws; refused where it cannot apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.config import ConfigError, param_defaults
from fedlt.train.feature_smote import FeatureMemory, FeatureSmoteParams, nearest, smote_points
from tests.strategies.conftest import build, tiny_cfg, tiny_data

COUNTS = (40, 12, 0, 3)  # a skewed client: head, mid, an absent class, tail


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smote_points_lie_on_segments_to_one_of_the_k_nearest_same_class_features_as_sklearn_finds_them():
    from sklearn.neighbors import NearestNeighbors

    pool = torch.randn(30, 6, generator=torch.Generator().manual_seed(0))
    k = 4
    _, sk = NearestNeighbors(n_neighbors=k + 1).fit(pool.double().numpy()).kneighbors(pool.double().numpy())
    assert torch.equal(nearest(pool, torch.arange(30), k), torch.from_numpy(sk[:, 1:]))  # self excluded, ordered
    pts, base, nbr = smote_points(pool, 200, k, torch.Generator().manual_seed(1))
    for p, b, n in zip(pts, base.tolist(), nbr.tolist(), strict=True):
        assert n in sk[b, 1:].tolist()
        seg = pool[n] - pool[b]
        lam = float((p - pool[b]) @ seg / (seg @ seg))
        assert 0.0 <= lam <= 1.0 and torch.allclose(pool[b] + lam * seg, p, atol=1e-5)
    again, _, _ = smote_points(pool, 200, k, torch.Generator().manual_seed(1))
    assert torch.equal(pts, again)  # seeded
    one, _, _ = smote_points(pool[:1], 3, k, torch.Generator())
    assert torch.equal(one, pool[:1].expand(3, -1))  # a single remembered feature: copies


def test_memory_keeps_the_most_recent_n_c_features_of_each_class():
    mem = FeatureMemory(torch.tensor([2, 0, 3]))
    mem.add(torch.arange(5.0)[:, None].repeat(1, 2), torch.tensor([0, 0, 0, 2, 2]))
    assert sorted(mem.features(0)[:, 0].tolist()) == [1.0, 2.0]  # a ring of size n_0 = 2: the oldest (0) dropped
    assert mem.features(2)[:, 0].tolist() == [3.0, 4.0] and 1 not in mem.bank  # an absent class keeps nothing
    mem.add(torch.full((1, 2), 9.0), torch.tensor([2]))
    assert sorted(mem.features(2)[:, 0].tolist()) == [3.0, 4.0, 9.0]


class Recorder:
    """A loss that records the labels of every call: with the option, two per step (the backbone's loss on the real
    batch, then the head's loss on real + synthetic features)."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, logits, y):
        self.steps.append(y.detach().clone())
        return F.cross_entropy(logits, y)


def train_recorded(ratio, epochs: int = 3, batch_size: int = 16):
    smote = {"ratio": ratio, "k": 5}
    cfg = tiny_cfg({"name": "fedavg"}, local_epochs=epochs, batch_size=batch_size, feature_smote=smote)
    data = tiny_data(COUNTS)
    model = build(ClientAlgorithm, cfg)
    recorder = Recorder()

    class Client(ClientAlgorithm):
        def loss_fn(self, ctx):
            return recorder

    ctx = ClientContext(model=model, data=data, cfg=cfg, round=1, generator=torch.Generator().manual_seed(7))
    metrics = Client(cfg).train(ctx)
    steps = recorder.steps if ratio is None else recorder.steps[1::2]  # what the head's loss saw
    if ratio is not None:
        assert [y.tolist() for y in recorder.steps[0::2]] == [y[: len(r)].tolist() for y, r in
                                                               zip(steps, recorder.steps[0::2], strict=True)]
    return steps, len(steps) // epochs, metrics, model


def test_the_head_sees_every_held_class_balanced_once_it_is_remembered_and_fails_without_the_synthetic_features():
    steps, per_epoch, metrics, _ = train_recorded(1.0)
    assert metrics["train/steps"] == len(steps)
    for y in steps[per_epoch:]:  # from the 2nd epoch on every held class is in memory: every batch is balanced
        counts = torch.bincount(y, minlength=4)
        assert counts[2] == 0  # a class the client does not hold is never synthesised
        assert counts[0] == counts[1] == counts[3], counts.tolist()
    epoch2 = torch.bincount(torch.cat(steps[per_epoch: 2 * per_epoch]), minlength=4)
    assert epoch2[3] == epoch2[0] and epoch2[1] == epoch2[0]  # per epoch: tail == mid == head
    # the real labels are the first ones of each step, in the order of the run without the option
    plain, _, _, _ = train_recorded(None)
    assert [y[: len(p)].tolist() for y, p in zip(steps, plain, strict=True)] == [p.tolist() for p in plain]
    real = torch.bincount(torch.cat(plain[per_epoch: 2 * per_epoch]), minlength=4)
    assert real[3] * 5 < real[0]  # without the synthetic features the head sees the client's skew


def test_a_ratio_below_one_raises_the_tail_to_that_share_of_the_batchs_largest_class():
    steps, per_epoch, _, _ = train_recorded(0.5)
    for y in steps[per_epoch:]:
        counts = torch.bincount(y, minlength=4)
        target = -(-int(counts.max()) // 2)  # ceil(0.5 * max)
        assert counts[1] >= target and counts[3] >= target
        assert counts[3] == target or counts[3] == counts.max()


def test_the_backbone_gets_exactly_the_plain_gradient_and_the_head_the_augmented_one():
    from fedlt.train.feature_smote import smote_step
    from fedlt.train.local import supervised_step

    cfg = tiny_cfg({"name": "fedavg"})
    data = tiny_data(COUNTS)
    idx = torch.arange(0, len(data.train_y), 2)  # every class the client holds: synthetic features are needed
    x, y = data.normalise(data.train_x[idx]), data.train_y[idx]
    grads = {}
    for name in ("plain", "smote"):
        model = build(ClientAlgorithm, cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the weights, read the gradients
        if name == "plain":
            supervised_step(model, opt, F.cross_entropy)(x, y)
        else:
            smote_step(model, opt, F.cross_entropy, data.train_counts, FeatureSmoteParams(1.0, 5),
                       torch.Generator().manual_seed(0))(x, y)
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    body = [k for k in grads["plain"] if not k.startswith("head.")]
    assert all(torch.allclose(grads["plain"][k], grads["smote"][k], atol=1e-6) for k in body)
    assert not torch.allclose(grads["plain"]["head.weight"], grads["smote"]["head.weight"])


def test_training_with_feature_smote_changes_the_head_and_is_reproducible():
    _, _, _, a = train_recorded(1.0)
    _, _, _, b = train_recorded(1.0)
    _, _, _, c = train_recorded(None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.head.weight, c.head.weight)


# ------------------------------------------------------------------------------------------ config and a run
@pytest.mark.parametrize(("overrides", "message"), [
    (("strategy=fedrod",), "strategy=fedrod: its local update .FedRoDClient.train. is not a single"),
    (("strategy=scaffold",), "strategy=scaffold"),
    (("strategy=fedbabu",), "strategy=fedbabu: its head is frozen"),
    (("model.head=cosine",), "model.head=cosine: its classifier is not a plain linear head"),
    (("privacy=dp_sgd", "model.norm=group"), "privacy=dp_sgd: a SMOTE feature interpolates"),
    (("backend.client_batching=true",), "backend.client_batching=true"),
])
def test_feature_smote_is_refused_before_the_run_where_it_cannot_apply(overrides, message):
    from tests.core.probe import compose

    with pytest.raises(ConfigError, match=message):
        compose("feature_smote.ratio=1.0", *overrides)


@pytest.mark.parametrize("bad", ["feature_smote.ratio=0", "feature_smote.ratio=1.5", "feature_smote.k=0",
                                 "+feature_smote.bank=epoch"])
def test_bad_feature_smote_values_are_refused(bad):
    from tests.core.probe import compose

    with pytest.raises(ConfigError, match="feature_smote"):
        compose(bad)


def test_config_yaml_holds_the_typed_defaults_and_linear_head_strategies_are_accepted():
    from tests.core.probe import compose

    assert compose()["feature_smote"] == param_defaults(FeatureSmoteParams)
    for strategy in ("fedavg", "fedprox", "fedper", "fedlc", "ccvr"):
        compose(f"strategy={strategy}", "feature_smote.ratio=1.0")


def test_an_inprocess_run_with_feature_smote_finishes_and_trains_differently(tmp_path):
    from fedlt.core.inprocess import run_inprocess
    from fedlt.data.federated import prepare
    from strategies import get_strategy
    from tests.core.probe import compose

    tiny = ("dataset=synthetic_lt", "dataset.num_classes=4", "dataset.train_per_class=40",
            "dataset.test_per_class=10", "dataset.image_size=8", "dataset.imbalance_factor=10", "num_clients=3",
            "num_rounds=2", "participation=1.0", "local_epochs=1", "model.width=4", "model.feature_dim=8",
            "eval.every=2", f"cache_dir={tmp_path}")
    rows = {}
    for ratio in ("null", "1.0"):
        cfg = compose(*tiny, f"feature_smote.ratio={ratio}")
        plan, _, _ = prepare(cfg)
        rows[ratio] = run_inprocess(cfg, plan, get_strategy("fedavg")).rows[-1]
    assert 0.0 <= rows["1.0"]["generic/accuracy"] <= 1.0
    assert rows["1.0"]["train/steps"] == rows["null"]["train/steps"]  # the same batches
    assert rows["1.0"]["train/loss"] != rows["null"]["train/loss"]
