"""Two real smoke runs (FedAvg and FedProx on Fashion-MNIST-LT through Flower + Ray): every metric key is
written, TensorBoard holds histograms / hparams / figures, and ``fedlt-report`` compares finished and
interrupted runs."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedlt.eval.groups import GROUPS, SHOT_RULES
from fedlt.eval.report import load_run, report
from tests.conftest import needs_fmnist, read_jsonl, run_fedlt

REPORT = str(Path(sys.executable).with_name("fedlt-report"))
METRICS = ("accuracy", "balanced_accuracy", "worst_class_accuracy", "macro_f1", "gmean", "auroc", "auprc", "ece",
           "confusion_spectral_norm")
PNG = b"\x89PNG"

pytestmark = [pytest.mark.e2e, needs_fmnist]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = []
    for name, extra in (("fedavg_run", []), ("fedprox_run", ["strategy=fedprox"])):
        res = run_fedlt("experiment=smoke", *extra, run_dir=base / name)
        assert res.returncode == 0, res.stderr[-3000:]
        out.append(base / name)
    return out


def test_every_metric_key_is_written(runs):
    results = json.loads((runs[0] / "results.json").read_text())
    for m in METRICS:
        assert f"generic/{m}" in results and f"personalized/{m}" in results, m
        assert f"personalized/masked/{m}" in results and f"personalized/unmasked/{m}" in results, m
    for rule in SHOT_RULES:
        for g in GROUPS:
            assert f"generic/{rule}/{g}_accuracy" in results
            assert f"personalized/{rule}/{g}_accuracy" in results
    for name in ("forward_50", "forward_10", "uniform", "backward_10", "backward_50"):
        assert f"generic/test_agnostic/{name}/accuracy" in results
    assert results["generic/test_agnostic/uniform/accuracy"] == results["generic/accuracy"]
    assert results["personalized/stage"] == "before"
    for k in ("accuracy_weighted", "accuracy_std", "accuracy_min", "accuracy_p10"):
        assert f"personalized/{k}" in results
    # per-client values for every predictor and variant, for all 6 clients
    pers = results["detail"]["personalized"]
    assert pers["client_ids"] == list(range(6))
    for variant in ("masked", "unmasked"):
        assert len(pers[f"model/{variant}/per_client_accuracy"]) == 6
        assert len(pers[f"model/{variant}/per_client"]["auroc"]) == 6
    assert len(results["detail"]["generic"]["model/per_class_accuracy"]) == 10
    # the values are in range and agree with metrics.jsonl
    last = read_jsonl(runs[0] / "metrics.jsonl")[-1]
    assert last["generic/accuracy"] == results["generic/accuracy"]
    for m in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "auprc", "ece"):
        assert 0.0 <= results[f"generic/{m}"] <= 1.0
    assert results["generic/auroc"] > 0.6  # the model learnt something: chance is 0.5


def test_tensorboard_has_histograms_hparams_and_figures(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs[1] / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"generic/auroc", "generic/test_agnostic/backward_50/accuracy",
            "personalized/cumulative_75_95/tail_accuracy"} <= set(tags["scalars"])
    assert "personalized/model/masked/per_client_accuracy" in tags["histograms"]
    assert {"figures/per_class_accuracy", "figures/per_client_accuracy", "figures/partition",
            "figures/accuracy_over_rounds"} <= set(tags["images"])
    hp = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hp)
    from tensorboard.plugins.hparams import metadata

    start = metadata.parse_session_start_info_plugin_data(hp["_hparams_/session_start_info"])
    assert start.hparams["strategy"].string_value == "fedprox"
    assert start.hparams["num_clients"].number_value == 6


def test_report_compares_two_runs(runs, tmp_path):
    out = tmp_path / "report"
    res = subprocess.run([REPORT, *map(str, runs), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (out / "report.md").read_text()
    assert "fedavg_run" in md and "fedprox_run" in md
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in rows] == ["fedavg", "fedprox"]
    assert all(r["status"] == "finished" and r["rounds"] == "3/3" for r in rows)
    for r, run in zip(rows, runs, strict=True):
        assert float(r["generic/accuracy"]) == json.loads((run / "results.json").read_text())["generic/accuracy"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"accuracy_over_rounds.png", "per_class_accuracy.png", "per_client_accuracy.png"} <= set(pngs)
    assert len([p for p in pngs if p.startswith("partition_")]) == 2
    assert all((out / p).read_bytes()[:4] == PNG for p in pngs)


def test_report_on_an_interrupted_run(runs, tmp_path):
    run = tmp_path / "interrupted"
    shutil.copytree(runs[1], run)
    (run / "results.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write
    loaded = load_run(run)
    assert not loaded.finished and [r["round"] for r in loaded.rows] == [2]
    assert loaded.per_client_accuracy() and loaded.per_class_accuracy()  # from eval_detail.json
    written = report([str(run), str(runs[0])], tmp_path / "out")
    with open(written["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert (rows[0]["run"], rows[0]["status"], rows[0]["rounds"]) == ("interrupted", "interrupted", "2/3")
    assert float(rows[0]["generic/accuracy"]) == json.loads(lines[0])["generic/accuracy"]
    assert rows[1]["status"] == "finished"
    assert all(p.read_bytes()[:4] == PNG for p in written["figures"])
