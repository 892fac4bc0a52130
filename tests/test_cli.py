"""The `fedlt` console script as a user runs it: the smoke experiment end to end through Flower + Ray on real
Fashion-MNIST, and bad input refused before anything expensive starts."""

import json

import pytest

from tests.conftest import needs_fmnist, read_jsonl, run_fedlt

REQUIRED = ("round", "generic/accuracy", "personalized/accuracy", "train/loss", "time/round_s")


@pytest.mark.e2e
@needs_fmnist
def test_smoke_experiment_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    res = run_fedlt("experiment=smoke", run_dir=run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == f"run_dir: {run_dir.resolve()}"
    assert "Traceback" not in res.stderr
    noise = [ln for ln in (res.stderr + res.stdout).splitlines()
             if "raylet" in ln or "task_manager" in ln or "setup plugin" in ln or "fontManager" in ln]
    assert not noise, noise  # a clean run prints fedlt's lines only (no Ray, alembic or matplotlib chatter)
    assert not any(oct((run_dir / n).stat().st_mode)[-3:] != "644" for n in ("partition.png", "results.json"))
    for name in ("config.yaml", "metrics.jsonl", "results.json", "partition.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [2, 3]  # eval.every=2 in the smoke preset, plus the last round
    for r in rows:
        assert all(k in r for k in REQUIRED)
    results = json.loads((run_dir / "results.json").read_text())
    assert all(k in results for k in REQUIRED)
    assert results["generic/accuracy"] > 0.2 and results["personalized/accuracy"] > 0.2  # chance is 0.1
    assert results["personalized/stage"] == "before"
    # TensorBoard carries the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"generic/accuracy", "personalized/accuracy", "train/loss", "time/round_s"} <= tags
    part = json.loads((run_dir / "partition.json").read_text())
    assert sum(part["client_train_sizes"]) == part["train_size"]


# Bad input (these nine cases and 40 more) is covered by tests/test_reliability_bad_input.py.


def test_help_describes_every_option_with_its_documentation():
    from fedlt.cli import describe_options

    text = describe_options()
    assert "num_rounds: 15" in text and "# federated rounds" in text  # root options with their comments
    assert "mu: 0.01" in text and "proximal strength" in text  # a group's option with its comment
    for group in ("strategy:", "dataset:", "sampler:", "privacy:", "experiment:"):
        assert f"\n{group}\n" in text
    assert "hydra:" not in text.split("== Config groups")[0]


def test_a_sweep_with_one_bad_job_is_refused_before_any_job_starts(tmp_path):
    sweep_dir = tmp_path / "sweep"
    res = run_fedlt("-m", "experiment=smoke", "num_rounds=2,abc", f"hydra.sweep.dir={sweep_dir}", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("fedlt: error:")]
    assert len(errors) == 1 and "sweep job #1" in errors[0] and "num_rounds='abc'" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and not sweep_dir.exists()  # nothing ran, nothing was written
