"""Every strategy end to end through the real `fedlt` CLI (Flower + Ray, real Fashion-MNIST-LT) with its default
options, on the tiniest run: one round, three clients, 500 images in the largest class. Each must log every
metric the evaluation code produces for it -- the same keys for every method, plus one block per extra predictor
-- and record its personalization stage.

To keep the suite fast, all strategies run as ONE Hydra multirun (one driver process, one Ray actor per run),
and the parametrized test checks each strategy's run directory."""

import json

import pytest

from strategies import STRATEGIES
from tests.conftest import fmnist_available, read_jsonl, run_fedlt

NAMES = [s for s in STRATEGIES if s != "fedavg"]  # fedavg: tests/test_cli.py
TINY = ("experiment=smoke", "num_clients=3", "num_rounds=1", "eval.every=1", "model.width=8", "dataset.n_max=500",
        "backend.num_cpus=1")
PERSONAL_PREDICTORS = {"fedrod": ("personal", "generic_head"), "fedbabu": ("finetuned", "global"),
                       "fedetf": ("finetuned", "global"), "creff": ("creff", "fedavg"), "ccvr": ("ccvr", "fedavg"),
                       "fedloge": ("gla_fr", "phi_plus_psi", "sse_c"), "fedproto": ("proto", "model")}
GENERIC_PREDICTORS = {"creff": ("creff", "fedavg"), "ccvr": ("ccvr", "fedavg"),
                      "fedloge": ("psi_realigned", "sse_c", "psi")}
AFTER = {"fedper", "fedrep", "fedbabu", "ditto", "fedrod", "fedetf", "local", "fedloge", "fedbn", "fedproto"}
NO_GLOBAL_MODEL = {"local", "fedbn", "fedproto"}  # generic accuracy is logged as not applicable (null)
SPREAD = ("accuracy", "accuracy_weighted", "accuracy_std", "accuracy_min", "accuracy_p10", "balanced_accuracy")


@pytest.fixture(scope="module")
def sweep(request, tmp_path_factory):
    """One multirun over the strategies whose tests were selected (e.g. with -k)."""
    if not fmnist_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    selected = [item.callspec.params["strategy"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    root = tmp_path_factory.mktemp("strategies")
    res = run_fedlt("-m", "strategy=" + ",".join(selected), *TINY, f"hydra.sweep.dir={root}",
                    "hydra.sweep.subdir=${strategy.name}", timeout=1700)
    return root, res


@pytest.mark.e2e
@pytest.mark.timeout(1800)  # the first test also waits for the whole sweep (~15 s per strategy on 2 free cores)
@pytest.mark.parametrize("strategy", NAMES)
def test_strategy_runs_end_to_end_and_logs_every_metric(sweep, strategy):
    root, res = sweep
    run_dir = root / strategy
    assert (run_dir / "results.json").is_file(), f"exit {res.returncode}: {res.stderr[-3000:]}"
    assert f"run_dir: {run_dir.resolve()}" in res.stdout
    (row,) = read_jsonl(run_dir / "metrics.jsonl")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["strategy"] == strategy and results["failures"] == []
    assert results["personalized/stage"] == ("after" if strategy in AFTER else "before")
    assert row["train/clients"] == 1 and row["eval/clients"] == 3 and row["train/loss"] > 0

    keys = [f"personalized/{k}" for k in SPREAD]
    keys += [f"personalized/{v}/{k}" for v in ("masked", "unmasked") for k in SPREAD]
    for pred in PERSONAL_PREDICTORS.get(strategy, ()):
        keys += [f"personalized/{pred}/{v}/{k}" for v in ("masked", "unmasked") for k in SPREAD]
    generic = ("accuracy", "balanced_accuracy", "worst_class_accuracy")
    if strategy in NO_GLOBAL_MODEL:  # no global model: generic accuracy is logged as not applicable
        assert row["generic/accuracy"] is None and results["generic/accuracy"] is None
    else:
        keys += [f"generic/{k}" for k in generic]
        keys += [f"generic/{p}/{k}" for p in GENERIC_PREDICTORS.get(strategy, ()) for k in generic]
    for key in keys:
        assert key in row, key
        assert 0.0 <= row[key] <= 1.0 or key.endswith("_std"), (key, row[key])
        assert results[key] == row[key]
    # something was learned: some predictor beats chance (10 classes) after one round
    assert max(v for k, v in row.items() if k.endswith("/accuracy") and v is not None) > 0.15
