"""``fedlt-report`` without a federation: hand-written run folders (fast)."""

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedlt.eval.report import expand_runs, group_runs, load_run, report, unique_labels

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


# ------------------------------------------------------------------------------------------ seeds: mean ± std (n)
def finished_run(path: Path, strategy: str, seed: int, generic: float, pers: float, tail: float | None = None,
                 **config) -> Path:
    """A finished run (results.json) with known final accuracies; ``config`` entries are merged over the
    defaults (nested dicts one level deep). backend.num_cpus, cache_dir and log_level change with the seed: they
    do not change what a run computes, so they must not keep repetitions apart."""
    cfg = {"seed": seed, "num_rounds": 3, "num_clients": 3, "strategy": {"name": strategy},
           "dataset": {"name": "toy", "imbalance_factor": 10}, "partition": {"name": "dirichlet", "alpha": 0.5},
           "optimizer": {"lr": 0.05}, "eval": {"mask_absent_classes": True},
           "backend": {"num_cpus": seed % 3 + 1, "client_batching": False}, "cache_dir": f"/tmp/cache{seed}",
           "log_level": ["INFO", "WARNING"][seed % 2], "checkpoint": {"every": seed % 4}}
    for k, v in config.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"round": r, "generic/accuracy": generic * r / 3, "personalized/accuracy": pers * r / 3,
             "time/elapsed_s": 10.0 * r} for r in (1, 2, 3)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"generic/accuracy": generic, "personalized/accuracy": pers, "rounds_completed": 3,
               "time/wall_s": 30.0, "generic/test_agnostic/uniform/accuracy": generic,
               "detail": {"generic": {"model/per_class_accuracy": [0.9, generic, 0.1]},
                          "personalized": {"model/masked/per_client_accuracy": [pers - 0.1, pers, pers + 0.1]}}}
    if tail is not None:
        results["generic/cumulative_75_95/tail_accuracy"] = tail
    (path / "results.json").write_text(json.dumps(results))
    return path


# 2 methods x 3 seeds: (seed, generic, personalized, generic tail); fedprox's seed-2 run lacks the tail value
SWEEP = {"fedavg": [(3407, 0.50, 0.70, 0.10), (1, 0.52, 0.74, 0.20), (2, 0.54, 0.72, 0.30)],
         "fedprox": [(3407, 0.40, 0.60, 0.05), (1, 0.46, 0.66, 0.15), (2, 0.43, 0.69, None)]}


def sweep(base: Path) -> list[Path]:
    return [finished_run(base / f"{i}_{strategy}_seed{seed}", strategy, seed, g, p, t)
            for i, (strategy, seed, g, p, t) in enumerate((s, *v) for s, vs in SWEEP.items() for v in vs)]


def md_row(md: str, first_cell: str) -> list[str]:
    """The cells of the first Markdown table row whose first cell is ``first_cell``."""
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def md_table(md: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the first Markdown table whose first column is ``first_header``."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in lines[start:end]]
    return cells[0], cells[2:]


def test_seeds_of_one_configuration_are_grouped_with_mean_std_and_n(tmp_path):
    runs = sweep(tmp_path / "multirun")
    single = finished_run(tmp_path / "multirun" / "9_fedavg_lr", "fedavg", 1, 0.60, 0.80, 0.25,
                          optimizer={"lr": 0.1})
    res = report_cli(tmp_path / "multirun", "--out", tmp_path / "out")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "(2 of 3 configurations repeated over seeds: mean ± std)" in res.stdout
    md = (tmp_path / "out" / "report.md").read_text()
    header, rows = md_table(md, "group")
    col = {h: i for i, h in enumerate(header)}
    assert header[:3] == ["group", "n", "seeds"]
    by_label = {r[0]: r for r in rows}
    # labelled by what tells the groups apart (here also the lr of the run on its own)
    assert list(by_label) == ["fedavg · lr=0.05 · 3 seeds", "fedprox · lr=0.05 · 3 seeds",
                              "fedavg · lr=0.1 · seed 1"]
    fedavg, fedprox, alone = by_label.values()
    # fedavg: generic 0.50/0.52/0.54 -> 0.52 ± 0.02; personalized 0.70/0.74/0.72 -> 0.72 ± 0.02; tail 0.2 ± 0.1
    assert (fedavg[col["n"]], fedavg[col["seeds"]]) == ("3", "3407, 1, 2")
    assert fedavg[col["generic acc"]] == "0.5200 ± 0.0200"
    assert fedavg[col["pers. acc"]] == "0.7200 ± 0.0200"
    assert fedavg[col["generic tail"]] == "0.2000 ± 0.1000"
    # fedprox: generic 0.40/0.46/0.43 -> 0.43 ± 0.03; personalized 0.60/0.66/0.69 -> 0.65 ± sqrt(0.0021) = 0.0458;
    # the tail value exists in two runs only: 0.05/0.15 -> 0.10 ± 0.0707, marked (n=2)
    assert fedprox[col["generic acc"]] == "0.4300 ± 0.0300"
    assert fedprox[col["pers. acc"]] == "0.6500 ± 0.0458"
    assert fedprox[col["generic tail"]] == "0.1000 ± 0.0707 (n=2)"
    assert fedprox[col["generic bal. acc"]] == "–"  # no run has it
    assert fedprox[col["status"]] == "finished" and fedprox[col["rounds"]] == "3/3"
    # a group of one: n = 1 and the value as a run's, no ±
    assert (alone[col["n"]], alone[col["seeds"]], alone[col["generic acc"]]) == ("1", "1", "0.6000")
    assert "±" not in " ".join(alone)
    # the per-run detail stays: every run with its own values, group by group
    header, per_run = md_table(md.split("## Per run", 1)[1], "run")
    assert header[:2] == ["run", "seed"]
    assert [r[0] for r in per_run] == [p.name for p in runs] + [single.name]
    assert [r[header.index("generic acc")] for r in per_run[:3]] == ["0.5000", "0.5200", "0.5400"]
    # the other tables are grouped too
    assert md_row(md.split("## Test-agnostic", 1)[1], "fedprox · lr=0.05 · 3 seeds")[1] == "0.4300 ± 0.0300"
    # report_groups.csv: mean, std (n - 1) and n of every scalar; report.csv keeps a row per run
    with open(tmp_path / "out" / "report_groups.csv") as f:
        groups = {r["group"]: r for r in csv.DictReader(f)}
    g = groups["fedprox · lr=0.05 · 3 seeds"]
    assert (g["n"], g["seeds"], g["runs"].split()) == ("3", "3407 1 2", [p.name for p in runs[3:]])
    assert float(g["generic/accuracy mean"]) == pytest.approx(0.43)
    assert float(g["generic/accuracy std"]) == pytest.approx(0.03)
    assert float(g["personalized/accuracy std"]) == pytest.approx(statistics.stdev([0.60, 0.66, 0.69]))
    assert g["generic/cumulative_75_95/tail_accuracy n"] == "2"
    one = groups["fedavg · lr=0.1 · seed 1"]
    assert (one["n"], one["generic/accuracy mean"], one["generic/accuracy std"]) == ("1", "0.6", "")
    with open(tmp_path / "out" / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 7


def test_runs_that_differ_in_anything_but_seed_are_not_grouped(tmp_path):
    base = tmp_path / "runs"
    a = finished_run(base / "a", "fedavg", 1, 0.5, 0.7)
    variants = [
        finished_run(base / "b", "fedavg", 2, 0.6, 0.7, optimizer={"lr": 0.1}),  # a hyperparameter
        finished_run(base / "c", "fedavg", 3, 0.6, 0.7, num_rounds=4),  # resumable with another value, but
        # it changes what the run computes
        finished_run(base / "d", "fedavg", 4, 0.6, 0.7, backend={"client_batching": True}),  # not placement
        finished_run(base / "e", "fedprox", 5, 0.6, 0.7),  # another method
    ]
    interrupted = finished_run(base / "f", "fedavg", 6, 0.6, 0.7)  # same config, stopped after round 2:
    (interrupted / "results.json").unlink()  # its values come from another round
    (interrupted / "metrics.jsonl").write_text(json.dumps({"round": 2, "generic/accuracy": 0.3}) + "\n")
    no_config = fake_run(base / "g", [3])
    (no_config / "config.yaml").unlink()
    other_no_config = fake_run(base / "h", [3])
    (other_no_config / "config.yaml").unlink()
    runs = [load_run(p) for p in (a, *variants, interrupted, no_config, other_no_config)]
    assert [g.n for g in group_runs(runs)] == [1] * len(runs)
    written = report([str(base)], tmp_path / "out")
    md = written["markdown"].read_text()
    assert "±" not in md and "## Per run" not in md and "| group |" not in md
    # ... while a repetition that only ran elsewhere (other CPUs, cache, log level, checkpoints) is grouped
    again = finished_run(base / "z", "fedavg", 9, 0.7, 0.7)
    assert [g.n for g in group_runs([load_run(a), load_run(again)])] == [2]


def test_a_single_run_prints_as_before(tmp_path):
    run = finished_run(tmp_path / "s1", "fedavg", 1, 0.5, 0.7, 0.2)
    written = report([str(run)], tmp_path / "out")
    md = written["markdown"].read_text()
    assert "±" not in md and "## Per run" not in md and "| group |" not in md and "seeds" not in md
    header, rows = md_table(md, "run")
    assert header == ["run", "strategy", "dataset", "IF", "partition", "clients", "status", "rounds", "wall_s",
                      "generic acc", "generic bal. acc", "generic macro-F1", "generic worst-class", "generic head",
                      "generic mid", "generic tail", "generic ECE", "pers. acc", "pers. acc (weighted)", "pers. std",
                      "pers. p10", "pers. head", "pers. mid", "pers. tail"]
    assert rows == [["s1", "fedavg", "toy", "10", "dirichlet α=0.5", "3", "finished", "3/3", "30.0000",
                     "0.5000", "–", "–", "–", "–", "–", "0.2000", "–",  # generic: acc ... tail, ECE
                     "0.7000", "–", "–", "–", "–", "–", "–"]]  # personalized
    assert md_row(md.split("## Shot groups", 1)[1], "s1")[1] == "– / – / 0.2000"
    header, rows = md_table(md.split("## Test-agnostic", 1)[1], "run")
    assert (header, rows) == (["run", "uniform"], [["s1", "0.5000"]])


def test_two_copies_of_one_run_are_pointed_out(tmp_path):
    a = finished_run(tmp_path / "runs" / "a", "fedavg", 1, 0.5, 0.7)
    shutil.copytree(a, tmp_path / "runs" / "a_copy")
    res = report_cli(tmp_path / "runs", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "fedlt-report: warning: a, a_copy have the same configuration and seed 1" in res.stderr
    assert "understates the seed-to-seed spread" in (tmp_path / "out" / "report.md").read_text()


def test_personalized_as_trained_and_after_the_shared_fine_tuning_side_by_side(tmp_path):
    """Methods without their own personalization step show the unchanged model and the shared `finetuned`
    predictor (mean ± std over seeds); a method with its own step shows that step's result and no FT value."""
    base = tmp_path / "runs"
    shared = {"step": "shared fine-tuning (predictor `finetuned`)", "epochs": 1, "lr": 0.01, "momentum": 0.9,
              "parts": "all", "loss": "ce"}
    for seed, ft in ((1, 0.80), (2, 0.84)):
        run = finished_run(base / f"fedavg_{seed}", "fedavg", seed, 0.5, 0.70)
        res = json.loads((run / "results.json").read_text())
        res.update({"personalized/budget": shared, "personalized/stage": "before",
                    "personalized/mask_absent_classes": True, "personalized/finetuned/masked/accuracy": ft})
        (run / "results.json").write_text(json.dumps(res))
    own = finished_run(base / "fedbabu_1", "fedbabu", 1, 0.4, 0.90)
    res = json.loads((own / "results.json").read_text())
    res.update({"personalized/budget": {"step": "the method's own", "strategy_options": {}},
                "personalized/stage": "after", "personalized/finetuned/masked/accuracy": 0.90})
    (own / "results.json").write_text(json.dumps(res))
    assert report_cli(base, "--out", tmp_path / "out").returncode == 0
    md = (tmp_path / "out" / "report.md").read_text().split("## Personalized: as trained", 1)[1]
    header, rows = md_table(md, "group")
    assert header[1:] == ["pers. stage", "personalization", "pers. acc (as trained)", "pers. acc (shared FT)",
                          "pers. tail (as trained)", "pers. tail (shared FT)"]
    by = {r[0].split(" · ")[0]: r for r in rows}
    assert by["fedavg"][2:5] == ["shared FT: 1 ep, lr 0.01, all, ce", "0.7000 ± 0.0000", "0.8200 ± 0.0283"]
    assert by["fedbabu"][1:5] == ["after", "own step", "0.9000", "–"]
