"""Client samplers (``sampler=``, fedlt/train/samplers.py): uniform draws exactly what fedlt drew before samplers;
ros/rus balance each epoch, class_balanced/sqrt/progressive draw classes with the stated probabilities; every
sampler draws only the client's own samples; every strategy's local SGD and client batching get the sampler."""

from __future__ import annotations

import pytest
import torch

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.config import ConfigError
from fedlt.data.augment import crop_flip_draws
from fedlt.data.federated import ClientData, DataPlan
from fedlt.train.local import batch_draws, run_local_epochs
from fedlt.train.samplers import (SAMPLERS, class_probabilities, epoch_draw, resample_targets, sampler_spec,
                                  validate_sampler)

COUNTS = (300, 60, 0, 12, 3)  # a long-tailed client that lacks class 2
PLAN = DataPlan(source_name="tiny", source_cache="", split_path="tiny-samplers", mean=(0.5,), std=(0.25,),
                num_classes=len(COUNTS), num_clients=1, augment_padding=1, augment_hflip=True)


def client(counts=COUNTS, cid: int = 0, shuffle: bool = True) -> ClientData:
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    if shuffle:  # labels in no particular order, as in a real split
        y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(cid))]
    x = (y * 40).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 6, 6, 1).contiguous()
    k = len(counts)
    return ClientData(client_id=cid, train_x=x, train_y=y, test_x=torch.zeros(0, 1, 6, 6), test_y=y[:0],
                      train_counts=torch.bincount(y, minlength=k), test_counts=torch.zeros(k, dtype=torch.long),
                      plan=PLAN)


def cfg_with(name: str, num_rounds: int = 5, **options) -> dict:
    return {"seed": 1, "num_rounds": num_rounds, "local_epochs": 1, "batch_size": 16, "loss": {"name": "ce"},
            "optimizer": {"lr": 0.05}, "strategy": {"name": "fedavg"}, "sampler": {"name": name, **options}}


def epoch_label_counts(data: ClientData, spec, epochs: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """Per epoch: how often each class was drawn (through batch_draws, the one draw path)."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(list(batch_draws(data.num_train, 10**9, 1, torch.Generator(), sampler=spec,
                                     labels=data.train_y)))  # batches per epoch with one huge batch: 1
    assert per_epoch == 1
    out = []
    for idx, *_ in batch_draws(data.num_train, 10**9, epochs, g, sampler=spec, labels=data.train_y):
        out.append(torch.bincount(data.train_y[idx], minlength=len(COUNTS)))
    return out


# ------------------------------------------------------------------------------------------- uniform
def old_batch_draws(n, batch_size, epochs, generator, padding=0, hflip=False):
    """fedlt's batch_draws before samplers existed (copied verbatim from the commit before): the reference."""
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if idx.numel() < 2 and n > 1:
                continue
            yield (idx, *crop_flip_draws(idx.numel(), padding, hflip, generator))


@pytest.mark.parametrize(("n", "bs", "epochs", "padding", "hflip"),
                         [(375, 32, 3, 2, True), (17, 8, 2, 0, False), (1, 4, 2, 1, True), (33, 32, 1, 4, False)])
def test_uniform_draws_are_bitwise_the_old_draws(n, bs, epochs, padding, hflip):
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    new = list(batch_draws(n, bs, epochs, a, padding, hflip, sampler=sampler_spec(cfg_with("uniform"))))
    old = list(old_batch_draws(n, bs, epochs, b, padding, hflip))
    assert len(new) == len(old)
    for x, y in zip(new, old, strict=True):
        for u, v in zip(x, y, strict=True):
            assert (u is None and v is None) or torch.equal(u, v)
    assert torch.equal(a.get_state(), b.get_state())  # the generator was consumed identically


def test_uniform_leaves_the_client_view_untouched():
    data = client()
    ctx = ClientContext(model=torch.nn.Linear(1, 1), data=data, cfg=cfg_with("uniform"), round=1,
                        generator=torch.Generator())
    assert ctx.data is data and data.sampler is None  # no copy, no sampler: the draws of every run so far
    ctx = ClientContext(model=torch.nn.Linear(1, 1), data=data, cfg={k: v for k, v in cfg_with("x").items()
                                                                      if k != "sampler"}, round=1,
                        generator=torch.Generator())
    assert ctx.data is data  # a config without the group (older run directories): uniform


# --------------------------------------------------------------------------------------------- ros / rus
def test_ros_resampled_epoch_is_exactly_balanced_and_keeps_every_sample():
    data = client()
    spec = sampler_spec(cfg_with("ros", ratio=1.0, epoch="resampled"))
    for counts in epoch_label_counts(data, spec, epochs=3):
        assert counts.tolist() == [300, 300, 0, 300, 300]  # every class raised to the largest
    g = torch.Generator().manual_seed(1)
    idx = epoch_draw(spec, data.num_train, data.train_y)(g)
    assert set(idx.tolist()) == set(range(data.num_train))  # over-sampling adds copies, drops nothing


def test_ros_same_length_epoch_is_balanced_within_sampling_error():
    data = client()
    spec = sampler_spec(cfg_with("ros", ratio=1.0, epoch="same"))
    counts = torch.stack(epoch_label_counts(data, spec, epochs=20)).double()
    assert (counts.sum(1) == data.num_train).all()  # uniform's epoch length
    share = counts.sum(0) / counts.sum()
    held = torch.tensor(COUNTS) > 0
    assert torch.allclose(share[held], torch.full((4,), 0.25, dtype=torch.float64), atol=0.02)  # uniform: .80 .16 ...
    assert share[~held].sum() == 0


def test_ros_ratio_raises_classes_to_the_ratio():
    spec = sampler_spec(cfg_with("ros", ratio=0.1, epoch="resampled"))
    assert resample_targets(torch.tensor(COUNTS), spec).tolist() == [300, 60, 0, 30, 30]


def test_rus_resampled_epoch_is_balanced_with_fewer_distinct_samples():
    data = client()
    spec = sampler_spec(cfg_with("rus", ratio=1.0, epoch="resampled"))
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        idx = epoch_draw(spec, data.num_train, data.train_y)(g)
        assert torch.bincount(data.train_y[idx], minlength=5).tolist() == [3, 3, 0, 3, 3]
        assert len(set(idx.tolist())) == idx.numel() == 12 < data.num_train  # without replacement
    assert resample_targets(torch.tensor(COUNTS), sampler_spec(cfg_with("rus", ratio=0.5))).tolist() == [6, 6, 0, 6, 3]


def test_rus_same_length_epoch_chains_balanced_sets():
    data = client()
    spec = sampler_spec(cfg_with("rus", ratio=1.0, epoch="same"))
    for counts in epoch_label_counts(data, spec, epochs=3):
        assert counts.sum() == data.num_train
        held = counts[torch.tensor(COUNTS) > 0]
        assert held.max() - held.min() <= 3  # whole balanced sets of 4 x 3, the last one cut


# ---------------------------------------------------------------------------------- per-draw samplers
def draw_shares(spec, data: ClientData, epochs: int = 60, seed: int = 3) -> torch.Tensor:
    counts = torch.stack(epoch_label_counts(data, spec, epochs=epochs, seed=seed)).double()
    assert (counts.sum(1) == data.num_train).all()  # n draws per epoch
    return counts.sum(0) / counts.sum()


def test_class_balanced_draws_each_held_class_equally_often():
    data = client()
    share = draw_shares(sampler_spec(cfg_with("class_balanced")), data)
    # 60 x 375 draws: sd of a share about 0.0025; the instance shares would be .80 .16 .03 .008
    assert torch.allclose(share, torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25], dtype=torch.float64), atol=0.012)


def test_sqrt_draws_classes_in_proportion_to_the_square_root_of_their_counts():
    data = client()
    want = torch.tensor(COUNTS, dtype=torch.float64).sqrt()
    want /= want.sum()
    share = draw_shares(sampler_spec(cfg_with("sqrt", q=0.5)), data)
    assert torch.allclose(share, want, atol=0.012)
    assert torch.allclose(class_probabilities(torch.tensor(COUNTS), sampler_spec(cfg_with("sqrt", q=0.5))), want)


def test_progressive_moves_from_instance_to_class_balanced_over_the_rounds():
    data = client()
    n = torch.tensor(COUNTS, dtype=torch.float64)
    held = (n > 0).double()
    for rnd, t in ((1, 0.0), (3, 0.5), (5, 1.0)):
        spec = sampler_spec(cfg_with("progressive", num_rounds=5), rnd)
        assert spec.progress == t
        want = (1 - t) * n / n.sum() + t * held / held.sum()
        assert torch.allclose(class_probabilities(torch.tensor(COUNTS), spec), want)
        assert torch.allclose(draw_shares(spec, data, epochs=40, seed=rnd), want, atol=0.015)
    with pytest.raises(ValueError, match="needs the round"):
        sampler_spec(cfg_with("progressive"))


# ---------------------------------------------------------------------------------- own indices only
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_draws_only_the_clients_own_samples(name):
    data = client()
    spec = sampler_spec(cfg_with(name), 2)
    seen = set()
    for idx, *_ in batch_draws(data.num_train, 16, 4, torch.Generator().manual_seed(5), sampler=spec,
                               labels=data.train_y):
        assert idx.dtype == torch.long and 2 <= idx.numel() <= 16
        assert int(idx.min()) >= 0 and int(idx.max()) < data.num_train
        seen.update(data.train_y[idx].tolist())
    assert 2 not in seen  # a class the client does not hold is never drawn


# ----------------------------------------------------------------------- every strategy's local SGD
def test_the_client_step_gives_every_local_update_the_sampler():
    """The client step attaches the run's sampler to the client's data (``with_sampler``), so
    ``run_local_epochs(ctx.data, ...)`` -- how every strategy trains -- draws with it."""
    from fedlt.core.client_step import with_sampler

    cfg = cfg_with("ros", epoch="resampled")
    data = with_sampler(client(), cfg, 1)
    assert data.sampler == sampler_spec(cfg) and client().sampler is None
    seen = []

    def step(x, y):
        seen.append(torch.bincount(y, minlength=5))
        return 0.0

    out = run_local_epochs(data, 1, 64, torch.Generator(), step)
    assert torch.stack(seen).sum(0).tolist() == [300, 300, 0, 300, 300]
    assert out["train/samples"] == 1200.0


def test_progressive_reads_the_round_from_the_client_step():
    from fedlt.core.client_step import with_sampler

    cfg = cfg_with("progressive", num_rounds=3)
    for rnd, t in ((1, 0.0), (2, 0.5), (3, 1.0)):
        assert with_sampler(client(), cfg, rnd).sampler.progress == t


# ------------------------------------------------------------------------------------ client batching
def test_client_batching_draws_with_the_sampler_like_the_sequential_loop():
    from fedlt.core.client_step import with_sampler
    from fedlt.core.cohort import _schedule, train_cohort
    from fedlt.models import build_model
    from fedlt.seeding import torch_generator

    torch.set_num_threads(1)
    cfg = {**cfg_with("ros", epoch="resampled"), "local_epochs": 2, "batch_size": 32,
           "optimizer": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}}
    datas = [client((40, 8, 0, 3, 1), cid=0), client((2, 30, 5, 0, 0), cid=1)]
    gens = lambda: [torch_generator(3, 2, 1, c) for c in range(len(datas))]  # noqa: E731
    order, table = _schedule(datas, gens(), cfg)
    for lane, i in enumerate(order):  # each lane indexes only its own client's rows of the stacked images
        lo = sum(d.num_train for d in datas[:i])
        own = table["index"][:, lane][table["valid"][:, lane]]
        counts = datas[i].train_counts
        assert own.numel() == 2 * int((counts > 0).sum() * counts.max())  # 2 epochs of the over-sampled set
        assert int(own.min()) >= lo and int(own.max()) < lo + datas[i].num_train
    torch.manual_seed(0)
    model = build_model({"name": "cnn", "width": 4, "feature_dim": 16}, 1, 5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    algo, seq = ClientAlgorithm(cfg), []
    for d, g in zip(datas, gens(), strict=True):
        model.load_state_dict(start)
        algo.train(ClientContext(model=model, data=with_sampler(d, cfg, 1), cfg=cfg, round=1, generator=g))
        seq.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    bat, _ = train_cohort(model, start, datas, gens(), cfg)
    for a, b in zip(seq, bat, strict=True):
        for k in a:
            if a[k].is_floating_point():
                assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k


def test_client_batching_tells_progressive_the_round():
    """A cohort message passes its round to the vectorised trainer, so ``progressive`` draws each client's
    batches as the sequential client step does in that round."""
    from fedlt.core.client_step import train_group, with_sampler
    from fedlt.core.cohort import _schedule, unsupported_reasons
    from fedlt.models import build_model
    from fedlt.seeding import torch_generator
    from strategies import get_strategy

    fedavg = get_strategy("fedavg")
    assert unsupported_reasons(fedavg, cfg_with("progressive")) == []
    with pytest.raises(ValueError, match="needs the round"):
        _schedule([client()], [torch.Generator()], cfg_with("progressive"))
    torch.set_num_threads(1)
    cfg = {**cfg_with("progressive", num_rounds=3), "local_epochs": 1, "batch_size": 16, "seed": 3,
           "optimizer": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}}
    datas = [client((40, 8, 0, 3, 1), cid=0), client((2, 30, 5, 0, 0), cid=1)]
    gens = lambda: [torch_generator(3, 2, 2, c) for c in range(len(datas))]  # noqa: E731
    torch.manual_seed(0)
    model = build_model({"name": "cnn", "width": 4, "feature_dim": 16}, 1, 5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    algo, seq = ClientAlgorithm(cfg), []
    for d, g in zip(datas, gens(), strict=True):
        model.load_state_dict(start)
        algo.train(ClientContext(model=model, data=with_sampler(d, cfg, 2), cfg=cfg, round=2, generator=g))
        seq.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    bat, _, _ = train_group(algo, model, start, [({}, {})] * 2, [with_sampler(d, cfg, 2) for d in datas], gens(),
                            cfg, 2, "cpu")
    for a, b in zip(seq, bat, strict=True):
        for k in a:
            assert torch.allclose(a[k].double(), b[k].double(), atol=2e-5, rtol=1e-4), k


# ---------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("sampler", "message"), [
    ({"name": "smote"}, "sampler.name"),
    ({"name": "ros", "ratio": 0.0, "epoch": "same"}, "sampler.ratio"),
    ({"name": "ros", "ratio": 1.5, "epoch": "same"}, "sampler.ratio"),
    ({"name": "rus", "ratio": 1.0, "epoch": "twice"}, "sampler.epoch"),
    ({"name": "ros", "ratio": 1.0}, "missing option sampler.epoch"),
    ({"name": "sqrt", "q": 2.0}, "sampler.q"),
    ({"name": "class_balanced", "q": 0.5}, "unknown option sampler.q"),
    ("ros", "sampler=NAME"),
])
def test_bad_sampler_options_are_config_errors(sampler, message):
    with pytest.raises(ConfigError, match=message):
        validate_sampler({"sampler": sampler})


def test_every_sampler_yaml_holds_its_typed_defaults():
    from pathlib import Path

    import yaml

    from fedlt.config import param_defaults

    folder = Path(__file__).resolve().parents[2] / "configs" / "sampler"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(SAMPLERS)
    for name, params in SAMPLERS.items():
        node = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert node == {"name": name, **param_defaults(params)}
        validate_sampler({"sampler": node})


def test_samplers_compose_from_the_command_line():
    from tests.core.probe import compose

    cfg = compose("sampler=ros", "sampler.ratio=0.5")
    assert cfg["sampler"] == {"name": "ros", "ratio": 0.5, "epoch": "same"}
    assert compose()["sampler"] == {"name": "uniform"}
    assert compose("sampler=progressive", "backend.client_batching=true")["sampler"]["name"] == "progressive"


# ---------------------------------------------------------------------------------------------- episodic
def test_episodic_batches_hold_ways_classes_times_shots_and_keep_the_epoch_length():
    data = client()  # 4 held classes: 300, 60, 12, 3 samples
    spec = sampler_spec({**cfg_with("episodic", ways=3, shots=4), "batch_size": 12})
    assert dict(spec.options) == {"ways": 3, "shots": 4}
    per_epoch = []
    for epoch in range(3):
        g = torch.Generator().manual_seed(epoch)
        got = list(batch_draws(data.num_train, 12, 1, g, sampler=spec, labels=data.train_y))
        per_epoch.append(len(got))
        for idx, *_ in got:
            counts = torch.bincount(data.train_y[idx], minlength=5)
            assert idx.numel() == 12 and sorted(c for c in counts.tolist() if c) == [4, 4, 4]  # 3 ways x 4 shots
            assert counts[2] == 0
    assert per_epoch == [max(1, (375 + 12 - 2) // 12)] * 3 == [32] * 3  # uniform's batches of 12 from 375: 32
    # class 4 (3 samples < 4 shots): all three, plus one drawn again
    g = torch.Generator().manual_seed(9)
    for idx, *_ in batch_draws(data.num_train, 12, 2, g, sampler=spec, labels=data.train_y):
        tail = idx[data.train_y[idx] == 4]
        if tail.numel():
            assert tail.numel() == 4 and len(set(tail.tolist())) == 3


def test_episodic_with_fewer_classes_than_ways_puts_every_class_in_every_batch():
    data = client((20, 0, 7, 0, 0))
    spec = sampler_spec({**cfg_with("episodic", ways=5), "batch_size": 16})  # shots = 16 // 5 = 3
    assert spec.option("shots") == 3
    got = list(batch_draws(data.num_train, 16, 1, torch.Generator().manual_seed(1), sampler=spec,
                           labels=data.train_y))
    assert len(got) == (27 + 6 - 2) // 6 == 5  # episodes of 2 x 3 = 6 from 27 samples
    for idx, *_ in got:
        assert torch.bincount(data.train_y[idx], minlength=5).tolist() == [3, 0, 3, 0, 0]


def test_episodic_is_seeded_and_runs_under_client_batching_like_the_sequential_loop():
    from fedlt.core.cohort import _schedule

    cfg = {**cfg_with("episodic", ways=2, shots=3), "batch_size": 8}
    spec = sampler_spec(cfg)
    data = client()
    a = [i for i, *_ in batch_draws(data.num_train, 8, 2, torch.Generator().manual_seed(4), sampler=spec,
                                    labels=data.train_y)]
    b = [i for i, *_ in batch_draws(data.num_train, 8, 2, torch.Generator().manual_seed(4), sampler=spec,
                                    labels=data.train_y)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    datas = [client((40, 8, 0, 3, 1), cid=0), client((2, 30, 0, 0, 0), cid=1)]
    order, table = _schedule(datas, [torch.Generator().manual_seed(c) for c in range(2)], cfg)
    for lane, i in enumerate(order):
        valid = table["valid"][:, lane]
        steps = valid.any(1)
        assert (valid[steps].sum(1) == 6).all()  # every batch one episode of 2 ways x 3 shots (<= batch 8)
        assert int(steps.sum()) == max(1, (datas[i].num_train + 4) // 6)


@pytest.mark.parametrize(("options", "bs", "message"), [
    ({"ways": 4, "shots": 16}, 32, "ways x shots = 4 x 16 = 64"),
    ({"ways": 20, "shots": None}, 32, "at least 2 shots"),
    ({"ways": 0, "shots": None}, 32, "sampler.ways"),
    ({"ways": 2, "shots": 1}, 32, "sampler.shots"),
])
def test_episodic_refuses_episodes_that_do_not_fit_a_batch(options, bs, message):
    with pytest.raises(ConfigError, match=message):
        validate_sampler({"batch_size": bs, "sampler": {"name": "episodic", **options}})
