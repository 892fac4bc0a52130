"""fedlt-repro's comparison with the authors' logged curves, on synthetic metrics.jsonl files (no training)."""

from __future__ import annotations

import csv
import json

import pytest

from fedlt import repro
from fedlt.eval.reference_curves import CURVES, METRIC_KEYS


def write_run(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def runs(tmp_path):
    out = tmp_path / "out"
    # FedLoGe: generic/accuracy is psi' (GA-FR), the logged number is the SSE-C model's
    write_run(out / "runs" / "fedloge", [
        {"round": r, "generic/accuracy": 0.5, "generic/sse_c/accuracy": 0.01 * r} for r in (5, 10, 15)])
    write_run(out / "runs" / "fedavg", [{"round": r, "generic/accuracy": 0.02 * r} for r in (5, 10, 15, 20)])
    return out


def test_the_table_compares_the_sse_c_accuracy_with_the_authors_curve_at_their_rounds(runs):
    res = repro.compare({m: runs / "runs" / m for m in repro.METHODS}, rounds=20)
    assert [r["round"] for r in res["rows"]] == [5, 10, 15, 20]  # reference rounds <= R only
    r5 = res["rows"][0]
    assert r5["fedloge_authors"] == pytest.approx(0.1774) and r5["fedavg_authors"] == pytest.approx(0.2337)
    assert r5["fedloge_fedlt"] == pytest.approx(0.05)  # generic/sse_c/accuracy, not psi' (0.5)
    assert r5["fedloge_diff"] == pytest.approx(0.05 - 0.1774, abs=1e-4)
    assert r5["fedloge_fedlt_psi_realigned"] == pytest.approx(0.5)
    assert res["rows"][3]["fedloge_fedlt"] is None and res["rows"][3]["fedavg_fedlt"] == pytest.approx(0.4)
    assert res["rounds_evaluated"] == {"fedloge": [5, 10, 15], "fedavg": [5, 10, 15, 20]}
    text = repro.format_table(res)
    assert "17.7" in text and "23.4" in text and "-12.7" in text and "NOT the official" not in text


def test_the_authors_numbers_are_those_of_the_issue_and_the_keys_are_fedlts():
    rounds = (5, 10, 15, 20, 30, 60, 100)  # the issue's numbers are the log's, rounded to 0.1 %
    assert [100 * CURVES["fedloge"][r] for r in rounds] == pytest.approx([17.7, 21.0, 24.6, 30.3, 30.0, 46.5, 56.0],
                                                                         abs=0.0501)
    assert [100 * CURVES["fedavg"][r] for r in rounds] == pytest.approx([23.4, 25.2, 30.6, 31.8, 37.2, 52.9, 61.0],
                                                                        abs=0.0501)
    assert METRIC_KEYS["fedloge"][0] == "generic/sse_c/accuracy"


def test_table_only_writes_json_and_csv(runs, capsys):
    with pytest.raises(SystemExit) as e:
        repro.main(["--table-only", "--rounds", "10", "--out", str(runs), "model=cnn"])
    assert e.value.code == 0
    res = json.loads((runs / "curves.json").read_text())
    assert res["official_setting"] is False and [r["round"] for r in res["rows"]] == [5, 10]
    rows = list(csv.DictReader(open(runs / "curves.csv")))
    assert rows[1]["round"] == "10" and float(rows[1]["fedavg_fedlt"]) == pytest.approx(0.2)
    assert "NOT the official setting" in capsys.readouterr().out


def test_placement_and_data_location_keep_the_official_setting_and_method_overrides_split():
    assert repro.official(["backend.num_gpus_per_client=0.25", "dataset.path=/x.zip", "+backend.init_args.a=1"])
    assert not repro.official(["num_clients=4"]) and not repro.official(["fedloge:strategy.gamma=1"])
    ov = ["fedloge:strategy.refine_steps=10", "seed=1"]
    assert repro.for_method("fedloge", ov) == ["strategy.refine_steps=10", "seed=1"]
    assert repro.for_method("fedavg", ov) == ["seed=1"]
    args = repro.run_args("fedavg", 7, repro.Path("/r"), ov)
    assert "experiment=fedloge_cifar10_a0.5_if100_p0.2" in args and "num_rounds=7" in args and "eval.every=5" in args


def test_bad_arguments_exit_2(tmp_path):
    for argv in (["--methods", "fedprox"], ["oops"], ["--rounds", "0"]):
        with pytest.raises(SystemExit) as e:
            repro.main([*argv, "--out", str(tmp_path)])
        assert e.value.code == 2
