"""``fedlt-report`` without a federation: hand-written run folders (fast)."""

import csv
import json
import os
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


def report_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([REPORT, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def one_paragraph_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode == 2, res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.startswith("fedlt-report: error: ") and res.stderr.count("\n") == 1, res.stderr
    for f in fragments:
        assert f in res.stderr, (f, res.stderr)


def test_a_missing_path_says_it_does_not_exist(tmp_path):
    one_paragraph_error(report_cli(tmp_path / "runs" / "nope"), f"{tmp_path / 'runs' / 'nope'} is not",
                        "it does not exist")
    (tmp_path / "results.json").write_text("{}")
    one_paragraph_error(report_cli(tmp_path / "results.json"), "is a file, not a run directory")


def test_runs_are_found_at_any_depth_below_a_folder(tmp_path):
    """The default layout (configs/config.yaml hydra.run.dir / hydra.sweep.dir): runs/DAY/TIME_strategy_dataset
    and runs/multirun/DAY/TIME/N_strategy_dataset."""
    runs = tmp_path / "runs"
    a = fake_run(runs / "2025-01-01" / "10-00-00_fedavg_toy", [1])
    b = fake_run(runs / "2025-01-02" / "09-00-00_fedavg_toy", [1, 2])
    c = fake_run(runs / "multirun" / "2025-01-02" / "11-00-00" / "0_fedavg_toy", [1])
    (a / "tb").mkdir()
    (a / "checkpoints").mkdir()
    assert expand_runs([str(runs)]) == [a, b, c]
    res = report_cli(runs, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "out" / "report.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == [a.name, b.name, c.name]
    one_paragraph_error(report_cli(tmp_path / "out"), "no folder below it is one")


def test_damaged_metrics_lines_and_results_are_reported_with_their_line(tmp_path):
    run = fake_run(tmp_path / "a", [1, 2, 3], half_line=True)
    lines = (run / "metrics.jsonl").read_text().split("\n")
    lines[1] = lines[1][:-9] + "#garbage"  # round 2, damaged in the middle of the file
    lines.insert(2, '["not", "a", "row"]')
    (run / "metrics.jsonl").write_text("\n".join(lines))
    (run / "results.json").write_bytes(b"\x00\x01 garbage")
    res = report_cli(run, "--out", tmp_path / "out")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    metrics = run / "metrics.jsonl"
    for fragment in (f"{metrics} line 2 is not valid JSON", f"{metrics} line 3 is not a metrics row",
                     f"{metrics} line 5 is cut short", f"{run / 'results.json'} is not valid JSON"):
        assert f"fedlt-report: warning: {fragment}" in res.stderr, (fragment, res.stderr)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Problems found while reading the runs" in md and f"{metrics} line 2 is not valid JSON" in md
    loaded = load_run(run)
    assert [r["round"] for r in loaded.rows] == [1, 3] and not loaded.finished


def test_a_metrics_file_written_by_two_runs_is_pointed_out(tmp_path):
    run = fake_run(tmp_path / "a", [2, 3, 2, 3])  # what a second run into the same folder used to append
    loaded = load_run(run)
    assert loaded.problems == [f"{run / 'metrics.jsonl'} line 3 goes back to round 2 after round 3: two runs may "
                               f"have written into this folder"]


def test_a_broken_config_yaml_is_one_paragraph(tmp_path):
    run = fake_run(tmp_path / "a", [1])
    (run / "config.yaml").write_text("num_rounds: 4\nstrategy: {name: fedavg\n  seed: [1\n")
    one_paragraph_error(report_cli(run, "--out", tmp_path / "out"), f"{run / 'config.yaml'} is not valid YAML",
                        "line ")
    (run / "config.yaml").write_text("- just\n- a list\n")
    one_paragraph_error(report_cli(run, "--out", tmp_path / "out"), "not the mapping of options")
    assert not (tmp_path / "out").exists()  # nothing is written before every run has been read


def test_an_unwritable_out_is_one_paragraph(tmp_path):
    run = fake_run(tmp_path / "a", [1])
    (tmp_path / "file").write_text("x")
    one_paragraph_error(report_cli(run, "--out", tmp_path / "file"), f"cannot write the report to {tmp_path / 'file'}",
                        "it is a file", "--out DIR")
    one_paragraph_error(report_cli(run, "--out", tmp_path / "file" / "sub"), "cannot write the report to",
                        "--out DIR")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        one_paragraph_error(report_cli(run, "--out", locked), "cannot write the report to", "Permission denied")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_outputs_have_the_usual_file_modes_and_matplotlib_stays_quiet(tmp_path):
    run = fake_run(tmp_path / "a", [1, 2])
    fresh_mpl = tmp_path / "mpl"  # an empty matplotlib cache: it builds its font list as on a fresh machine
    res = report_cli(run, "--out", tmp_path / "out", env={"MPLCONFIGDIR": str(fresh_mpl)})
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr  # no font-cache chatter, no warnings for an intact run
    files = sorted((tmp_path / "out").iterdir())
    assert {p.suffix for p in files} == {".png", ".md", ".csv"}
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask(), p


def test_a_fresh_matplotlib_does_not_log_through_fedlt_logging(tmp_path):
    """A run logs at INFO (Hydra's job logging): matplotlib's "generated new fontManager" must not show."""
    script = ("import logging, sys, json; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
              "from fedlt.data.figure import write_partition_figure\n"
              "write_partition_figure(json.loads(sys.argv[1]), sys.argv[2])\n")
    summary = {"client_class_counts": [[3, 0], [1, 2]], "global_class_counts": [4, 2], "classes": ["cat", "dog"],
               "partition": {"name": "iid"}, "dataset": "toy", "imbalance_factor": 2.0, "profile": "exp",
               "train_size": 6, "shot_groups": {"cumulative_75_95": {"head": [0], "mid": [1], "tail": []}}}
    res = subprocess.run([sys.executable, "-c", script, json.dumps(summary), str(tmp_path / "partition.png")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert res.returncode == 0, res.stderr
    assert "fontManager" not in res.stdout + res.stderr and "font cache" not in res.stdout + res.stderr
    assert (tmp_path / "mpl").is_dir()  # the cache really was built in this run
    assert (tmp_path / "partition.png").stat().st_mode & 0o777 == 0o666 & ~umask()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
