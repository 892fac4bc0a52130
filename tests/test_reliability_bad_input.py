"""Bad input, table-driven: each case goes through the real ``fedlt`` entry point (``fedlt.cli.main``, i.e.
Hydra composition, validation, the resume checks, data preparation) in this process -- a subprocess costs ~4 s
each -- and a few through the installed console script. Every case must give one paragraph naming the
offending value, a non-zero exit, no traceback, no Ray, and no run directory left that looks like a run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_fedlt

# (id, overrides, text the error must contain). RUN / FILE / DATA are replaced by per-test paths.
CASES = [
    # types
    ("type-int", ["num_clients=abc"], "num_clients='abc'"),
    ("type-float", ["optimizer.lr=abc"], "optimizer.lr='abc'"),
    ("type-bool", ["eval.mask_absent_classes=maybe"], "eval.mask_absent_classes='maybe'"),
    ("type-seed-float", ["seed=1.5"], "seed=1.5"),
    ("type-on-signal", ["checkpoint.on_signal=sometimes"], "checkpoint.on_signal='sometimes'"),
    # ranges
    ("range-clients", ["num_clients=0"], "num_clients=0"),
    ("range-seed", ["seed=-1"], "seed=-1"),
    ("range-rounds", ["num_rounds=0"], "num_rounds=0"),
    ("range-participation-0", ["participation=0"], "participation=0"),
    ("range-participation-big", ["participation=1.5"], "participation=1.5"),
    ("range-epochs", ["local_epochs=-1"], "local_epochs=-1"),
    ("range-batch", ["batch_size=0"], "batch_size=0"),
    ("range-lr", ["optimizer.lr=0"], "optimizer.lr=0"),
    ("range-momentum", ["optimizer.momentum=1.0"], "optimizer.momentum=1.0"),
    ("range-eval-every", ["eval.every=-2"], "eval.every=-2"),
    ("range-imbalance", ["dataset.imbalance_factor=0.5"], "dataset.imbalance_factor=0.5"),
    ("range-alpha-0", ["partition.alpha=0"], "partition.alpha=0"),
    ("range-alpha-neg", ["partition.alpha=-1"], "partition.alpha=-1"),
    ("range-mu", ["strategy=fedprox", "strategy.mu=-1"], "strategy.mu=-1"),
    ("range-threads", ["backend.torch_threads=0"], "backend.torch_threads=0"),
    ("range-timeout", ["backend.round_timeout_s=0"], "backend.round_timeout_s=0"),
    ("range-ckpt-every", ["checkpoint.every=-1"], "checkpoint.every=-1"),
    ("range-ckpt-keep", ["checkpoint.keep=-3"], "checkpoint.keep=-3"),
    ("range-fault-p", ["fault_injection.probability=2"], "fault_injection.probability=2"),
    ("range-port", ["backend.address=10.0.0.1:99999"], "backend.address='10.0.0.1:99999'"),
    # unknown names
    ("unknown-key", ["num_round=3"], "num_round"),
    ("unknown-strategy-group", ["strategy=nope"], "strategy/nope"),
    ("unknown-strategy-name", ["strategy.name=nope"], "strategy.name='nope'"),
    ("unknown-model", ["model.name=vgg"], "model.name='vgg'"),
    ("unknown-profile", ["dataset.profile=linear"], "dataset.profile='linear'"),
    ("range-label-noise", ["dataset.label_noise.rate=1"], "dataset.label_noise.rate=1"),
    ("unknown-label-noise", ["dataset.label_noise.kind=uniform"], "dataset.label_noise.kind='uniform'"),
    ("local-lt-on-a-long-tail", ["partition=local_lt"], "partition=local_lt with dataset.imbalance_factor=100"),
    ("unknown-fault-mode", ["fault_injection.mode=explode"], "fault_injection.mode='explode'"),
    ("unknown-fault-phase", ["fault_injection.phase=never"], "fault_injection.phase='never'"),
    ("bad-address", ["backend.address=localhost"], "backend.address='localhost'"),
    # incompatible combinations
    ("address-with-cpus", ["backend.address=127.0.0.1:6379", "backend.num_cpus=2"], "backend.num_cpus=2"),
    ("min-clients-unreachable", ["num_clients=6", "participation=0.5", "backend.min_clients_per_round=4"],
     "backend.min_clients_per_round=4"),
    ("cpus-per-client", ["backend.num_cpus=2", "backend.num_cpus_per_client=4"], "backend.num_cpus_per_client=4"),
    ("nan-at-evaluation", ["fault_injection.mode=[nan]", "fault_injection.phase=evaluate"],
     "fault_injection.phase='evaluate'"),
    # missing / corrupt data
    ("data-missing", ["dataset.path=/nonexistent/fmnist"], "/nonexistent/fmnist"),
    ("data-corrupt", ["dataset.path=DATA", "cache_dir=DATA/cache"], "corrupt"),
    ("too-many-clients", ["num_clients=100000"], "num_clients=100000"),
    ("server-data-negative", ["server_data.per_class=-1"], "server_data.per_class=-1"),
    ("server-data-too-large", ["server_data.per_class=60"], "server_data.per_class=60"),  # smallest class: 60
    ("server-data-off-for-ratioloss", ["strategy=ratioloss", "server_data.per_class=0"], "server_data.per_class=0"),
    # resume
    ("resume-missing-dir", ["resume=/nonexistent/run"], "resume='/nonexistent/run'"),
    ("resume-a-file", ["resume=FILE"], "is not a directory"),
    ("resume-not-a-run", ["resume=EMPTY"], "not a fedlt run directory"),
    ("resume-corrupt-config", ["resume=GARBLED"], "cannot be read"),
    ("resume-other-override", ["resume=RUN", "strategy=fedprox"], "strategy cannot be changed"),
    ("resume-other-config-ckpt", ["resume=FOREIGN"], "different configuration"),
    ("resume-corrupt-ckpt", ["resume=BROKEN"], "corrupt"),
    ("resume-fewer-rounds", ["resume=RUN", "num_rounds=1"], "num_rounds=1"),
    # caught before Ray (issue: every bad value caught before Ray)
    ("log-level", ["log_level=loud"], "log_level='loud'"),
    ("model-width", ["model.width=0"], "model.width=0"),
    ("model-widths", ["model=resnet8", "model.widths=[0,0,0]"], "model.widths=[0, 0, 0]"),
    ("model-feature-dim", ["model.feature_dim=-5"], "model.feature_dim=-5"),
    ("model-head", ["model.head=foo"], "model.head='foo'"),
    ("model-norm", ["model.norm=layer"], "model.norm='layer'"),
    ("dp-sgd-batchnorm", ["privacy=dp_sgd"], "privacy=dp_sgd with model.norm=batch"),
    ("secagg-strategy", ["privacy.secagg=true", "strategy=scaffold"], "privacy.secagg=true with strategy=scaffold"),
    ("local-epochs-0", ["local_epochs=0"], "local_epochs=0"),
    ("server-threads-0", ["backend.server_threads=0"], "backend.server_threads=0"),
    ("malloc-arenas-negative", ["backend.malloc_arena_max=-1"], "backend.malloc_arena_max=-1"),
    ("round-timeout-tiny", ["backend.round_timeout_s=0.001"], "backend.round_timeout_s=0.001"),
    ("num-cpus-above-machine", ["backend.num_cpus=4096"], "backend.num_cpus=4096"),
    ("plus-unknown-key", ["+anything=1"], "anything"),
    ("strategy-unknown-option", ["strategy.no_such=1"], "no_such"),
    ("strategy-option-type", ["strategy=fedloge", "model.feature_dim=16", "strategy.gamma=abc"],
     "strategy.gamma='abc'"),
    ("resume-tilde", ["resume=~"], "resume"),
    ("run-dir-holds-a-run", ["hydra.run.dir=RUN"], "already holds a run"),
    ("empty-clients", ["num_clients=40", "partition.alpha=0.001"], "have no training data"),
    ("recursive-interpolation", ["num_rounds=${num_rounds}"], "at num_rounds: Recursive interpolation"),
    ("episodic-too-big", ["sampler=episodic", "sampler.shots=16"], "ways x shots = 4 x 16 = 64"),
    ("decoupled-no-linear-head", ["strategy=fedloge", "eval.decoupled.enabled=true"],
     "eval.decoupled.enabled=true with strategy=fedloge"),
    ("smote-without-decoupled", ["eval.decoupled.smote_ratio=0.5"], "eval.decoupled.smote_ratio=0.5"),
    ("personalized-path-unknown", ["eval.personalized_path=fast"], "eval.personalized_path='fast'"),
    ("personalized-path-ditto", ["strategy=ditto", "eval.personalized_path=shared_backbone"],
     "eval.personalized_path=shared_backbone with strategy=ditto"),
    ("feature-smote-strategy", ["feature_smote.ratio=1.0", "strategy=scaffold"],
     "feature_smote.ratio=1.0 with strategy=scaffold"),
]
if torch.cuda.device_count() == 0:
    CASES.append(("gpu-without-gpu", ["backend.num_gpus_per_client=1"], "backend.num_gpus_per_client=1"))
if os.geteuid() != 0:  # root reads everything
    CASES.append(("resume-unreadable", ["resume=LOCKED"], "cannot be read and written"))
NEEDS_DATA = {"too-many-clients", "empty-clients", "server-data-too-large"}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Run directories to resume: a valid one with a round-2 checkpoint, and broken variants."""
    from fedlt.core import checkpoint
    from fedlt.core.checkpoint import RunState
    from tests.core.probe import compose

    root = tmp_path_factory.mktemp("places")
    cfg = compose("experiment=smoke", "num_rounds=3")
    state = RunState(round=2, arrays={"w": torch.zeros(2)}, clients={}, server_state={})

    def run_dir(name: str, ckpt_cfg: dict | None = cfg) -> Path:
        d = root / name
        d.mkdir()
        from omegaconf import OmegaConf

        (d / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
        if ckpt_cfg is not None:
            checkpoint.save(d, state, ckpt_cfg, keep=0)
        return d

    broken = run_dir("broken")
    next(broken.joinpath("checkpoints").iterdir()).write_bytes(b"\x80\x02garbage")
    garbled = root / "garbled"
    garbled.mkdir()
    (garbled / "config.yaml").write_text("{{{: not yaml")
    data = root / "data"
    data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (data / name).write_bytes(b"not gzip at all")
    (root / "file").write_text("x")
    (root / "empty").mkdir()
    locked = run_dir("locked")
    locked.chmod(0)
    yield {"RUN": run_dir("run"), "FOREIGN": run_dir("foreign", {**cfg, "seed": 99}), "BROKEN": broken,
           "GARBLED": garbled, "DATA": data, "FILE": root / "file", "EMPTY": root / "empty", "LOCKED": locked}
    locked.chmod(0o755)


def substitute(args: list[str], places: dict) -> list[str]:
    out = []
    for a in args:
        for k, v in places.items():
            a = a.replace(f"={k}", f"={v}")
        out.append(a)
    return out


def snapshot(d: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in d.rglob("*")} if d.is_dir() else {}


def assert_refused(code, err: str, named: str, run_dir: Path) -> None:
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    paragraph = [ln for ln in lines if ln.startswith("fedlt: error:")]
    assert len(paragraph) == 1, err  # one paragraph, fedlt's own
    assert named in paragraph[0], (named, paragraph[0])
    # nothing left that looks like a run
    assert not any((run_dir / f).exists() for f in ("config.yaml", "metrics.jsonl", "results.json", "tb"))


@pytest.mark.parametrize("case,overrides,named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process(case, overrides, named, places, tmp_path, monkeypatch, capsys):
    from fedlt import cli
    from fedlt.flower.ray_backend import ray_descendants
    from tests.conftest import fmnist_available

    if case in NEEDS_DATA and not fmnist_available():
        pytest.skip("needs Fashion-MNIST")
    run_dir = tmp_path / "run"
    args = substitute(overrides, places)
    # a folder that already holds a run (resumed, or named as a new run's folder) must be left as it was
    resumed = next((Path(a.split("=", 1)[1]) for a in args if a.startswith(("resume=", "hydra.run.dir="))), None)
    before = snapshot(resumed) if resumed else {}
    given_dir = any(a.startswith("hydra.run.dir=") for a in args)
    monkeypatch.setattr(sys, "argv", ["fedlt", *args, *([] if given_dir else [f"hydra.run.dir={run_dir}"])])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert_refused(exit_info.value.code, err, named, run_dir)
    assert ray_descendants() == []  # no Ray started
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized()
    if resumed is not None and resumed.exists():  # a refused resume leaves the run directory as it was
        assert snapshot(resumed) == before, case
        assert not (resumed / "results.json").exists() and not (resumed / "metrics.jsonl").exists()


SUBPROCESS = [  # the same refusals through the installed console script, as a user meets them
    (["num_round=3"], "num_round"),
    (["optimizer.lr=abc"], "optimizer.lr='abc'"),
    (["dataset.path=/nonexistent/fmnist"], "/nonexistent/fmnist"),
    (["resume=/nonexistent/run"], "resume='/nonexistent/run'"),
    (["backend.address=localhost"], "backend.address='localhost'"),
]


@pytest.mark.parametrize("overrides,named", SUBPROCESS, ids=[s[0][0] for s in SUBPROCESS])
def test_bad_input_console_script(overrides, named, tmp_path):
    run_dir = tmp_path / "run"
    res = run_fedlt(*overrides, run_dir=run_dir, timeout=120)
    assert_refused(res.returncode, res.stderr + res.stdout, named, run_dir)
    assert res.returncode == 2
    # the folder Hydra made for this command is gone (it stayed when importing took over a second, as on a
    # loaded machine: the command's start was taken after Hydra had made it)
    assert not run_dir.exists()
