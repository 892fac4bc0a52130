"""``fedlt-report`` without a federation: hand-written run folders (fast)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

from fedlt.eval.report import expand_runs, load_run, report, unique_labels

REPORT = str(Path(sys.executable).with_name("fedlt-report"))


def fake_run(path: Path, rounds: list[int], num_rounds: int = 4, half_line: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        f"num_rounds: {num_rounds}\nnum_clients: 2\nseed: 1\nstrategy:\n  name: fedavg\n"
        "dataset:\n  name: toy\n  imbalance_factor: 10\neval:\n  mask_absent_classes: true\n")
    (path / "partition.json").write_text(json.dumps({"global_class_counts": [30, 10, 3],
                                                      "client_class_counts": [[20, 0, 1], [10, 10, 2]]}))
    lines = [json.dumps({"round": r, "generic/accuracy": 0.1 * r, "personalized/accuracy": 0.2 * r,
                         "time/elapsed_s": 5.0 * r}) for r in rounds]
    text = "\n".join(lines) + "\n"
    if half_line:
        text += '{"round": 99, "generic/acc'
    (path / "metrics.jsonl").write_text(text)
    (path / "eval_detail.json").write_text(json.dumps({
        "generic": {"model/per_class_accuracy": [0.9, 0.5, None]},
        "personalized": {"model/unmasked/per_client_accuracy": [0.1, 0.2],
                         "model/masked/per_client_accuracy": [0.7, 0.8]}}))
    return path


def test_interrupted_run_with_a_half_written_line(tmp_path):
    run = load_run(fake_run(tmp_path / "a", [1, 2], half_line=True))
    assert [r["round"] for r in run.rows] == [1, 2] and not run.finished
    assert run.per_client_accuracy() == [0.7, 0.8]  # the masked variant: mask_absent_classes is true
    written = report([str(tmp_path / "a")], tmp_path / "out")
    with open(written["csv"]) as f:
        (row,) = list(csv.DictReader(f))
    assert (row["status"], row["rounds"], row["wall_s"], row["generic/accuracy"]) == ("interrupted", "2/4", "10.0",
                                                                                      "0.2")
    assert "| a | fedavg | toy | 10 |" in written["markdown"].read_text()


def test_a_folder_of_runs_stands_for_its_runs_and_labels_are_unique(tmp_path):
    fake_run(tmp_path / "sweep" / "0" / "run", [1])
    fake_run(tmp_path / "sweep" / "1" / "run", [1])
    fake_run(tmp_path / "multi" / "x", [1])
    paths = expand_runs([str(tmp_path / "sweep" / "0" / "run"), str(tmp_path / "sweep" / "1" / "run"),
                         str(tmp_path / "multi")])
    assert unique_labels(paths) == ["0/run", "1/run", "x"]


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    res = subprocess.run([REPORT, str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "is not a fedlt run directory" in res.stderr and "Traceback" not in res.stderr
