"""``fedlt-report``'s privacy cost (fedlt/eval/privacy_report.py): DP runs matched to the same runs without DP.

Hand-written run folders shaped like real ones (results.json with the final metrics, ``privacy`` summary and
``detail``; eval_detail.json; partition.json; config.yaml; metrics.jsonl), so every number is known; one e2e test
on two real smoke runs (dp_central and none, same seed)."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedlt.eval.privacy_report import (COST_CSV, DROP_PNG, NO_MATCH, PER_CLASS_CSV, UTILITY_PNG, match_settings,
                                       per_class, write_privacy_report)
from fedlt.eval.report import load_run, main, report
from tests.conftest import needs_fmnist, run_fedlt

REPORT = str(Path(sys.executable).with_name("fedlt-report"))
PNG = b"\x89PNG"
COUNTS = [300, 100, 30, 10]  # cumulative_75_95: head 0, 1; mid 2; tail 3
NAMES = ["cat", "dog", "owl", "yak"]
GROUPS = {"head": [0, 1], "mid": [2], "tail": [3]}


def make_run(path: Path, seed: int, per_class: list[float], pers: float, privacy: str = "none",
             strategy: str = "fedavg", eps: float = 4.0, z: float = 1.3, target=None, auc=None) -> Path:
    """A finished run folder as fedlt writes it: the files of a real run, with the keys the report reads in the
    places and shapes a real run has them (checked against real smoke runs; test_real_runs_dp_and_none)."""
    path.mkdir(parents=True)
    p = {"name": privacy}
    if privacy != "none":
        p.update(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, target_epsilon=target, on_budget="calibrate",
                 sampling="poisson", accountant="rdp", adaptive_clipping=False)
    config = {"dataset": {"name": "toy_lt", "imbalance_factor": 30}, "partition": {"name": "dirichlet", "alpha": 0.5},
              "strategy": {"name": strategy}, "privacy": p, "seed": seed, "num_clients": 4, "num_rounds": 3,
              "data_root": f"/data/{seed}",  # does not change what a run computes: ignored when matching
              "eval": {"mask_absent_classes": False}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "partition.json").write_text(json.dumps({
        "dataset": "toy_lt", "classes": NAMES, "num_classes": 4, "num_clients": 4, "seed": seed,
        "global_class_counts": COUNTS, "client_class_counts": [[150, 50, 15, 5], [150, 50, 15, 5]]}))
    row = {"round": 3, "train/loss": 1.0, "train/clients": 2,
           "generic/accuracy": statistics.fmean(per_class), "personalized/accuracy": pers,
           **{f"generic/cumulative_75_95/{g}_accuracy": statistics.fmean(per_class[c] for c in cls)
              for g, cls in GROUPS.items()}}
    summary = None
    if privacy != "none":
        row.update({"privacy/epsilon": eps, "privacy/delta": 1e-5, "privacy/clip_norm": 1.0,
                    "privacy/noise_multiplier": z})
        summary = {"mode": privacy, "epsilon": eps, "delta": 1e-5, "accountant": "rdp", "rounds_accounted": 3,
                   "clip_norm": 1.0, "sampling": "poisson", "noise_multiplier": z,
                   "noise_calibrated": target is not None, "target_epsilon": target, "on_budget": "calibrate",
                   "stopped_on_budget": False}
    detail = {"generic": {"model/per_class_accuracy": per_class, "model/per_class_predicted": [10, 10, 10, 10],
                          "groups": {"cumulative_75_95": GROUPS}, "train_counts": COUNTS},
              "personalized": {"client_ids": [0, 1, 2, 3], "num_examples": [10.0, 10.0, 10.0, 10.0],
                               "model/unmasked/per_client_accuracy": [pers] * 4,
                               "model/masked/per_client_accuracy": [pers] * 4},
              "round": 3}
    (path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (path / "eval_detail.json").write_text(json.dumps(detail))
    results = {**row, "rounds_completed": 3, "time/wall_s": 10.0, "personalized/stage": "before",
               "strategy": strategy, "dataset": "toy_lt", "seed": seed, "detail": detail, "failures": [],
               **({"privacy": summary} if summary else {})}
    (path / "results.json").write_text(json.dumps(results))
    if auc is not None:  # fedlt-attack's attack.json (the part the report reads)
        (path / "attack.json").write_text(json.dumps({"privacy": privacy, "global": {
            "loss": {"auc": auc, "advantage": 0.1}, "confidence": {"auc": 0.5}}, "personal": None}))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


BASE = {1: [0.9, 0.8, 0.6, 0.5], 2: [0.8, 0.8, 0.5, 0.3]}
DP = {1: [0.9, 0.6, 0.2, 0.0], 2: [0.7, 0.7, 0.3, 0.2]}


def sweep(root: Path) -> Path:
    """fedavg without DP (seeds 1, 2) and with dp_central at two targets (seeds 1, 2); fedprox seed 1 without DP."""
    for seed in (1, 2):
        make_run(root / "none" / f"s{seed}", seed, BASE[seed], pers=0.8 + 0.01 * seed, auc=0.6 + 0.01 * seed)
        make_run(root / "dp4" / f"s{seed}", seed, DP[seed], pers=0.5 + 0.02 * seed, privacy="dp_central",
                 eps=4.0, target=4.0, auc=0.51)
        make_run(root / "dp16" / f"s{seed}", seed, [a - 0.05 for a in BASE[seed]], pers=0.7, privacy="dp_central",
                 eps=16.0, z=0.6, target=16.0)
    make_run(root / "prox" / "s1", 1, [0.0, 0.0, 0.0, 0.0], pers=0.0, strategy="fedprox")
    return root


def privacy_only(root: Path, out: Path) -> dict:
    """The privacy part of the report alone (the whole report also draws every run's figures: slower)."""
    from fedlt.eval.report import expand_runs

    out.mkdir()
    return write_privacy_report([load_run(p) for p in expand_runs([str(root)])], out)


def test_drop_is_no_dp_minus_dp_paired_by_seed(tmp_path):
    written = privacy_only(sweep(tmp_path / "runs"), tmp_path / "out")
    rows = {r["target_epsilon"]: r for r in read_csv(tmp_path / "out" / COST_CSV)}
    assert set(rows) == {"4.0", "16.0"}
    r = rows["4.0"]
    assert (r["privacy"], r["strategy"], r["n"], r["seeds"], r["noise_multiplier"], r["epsilon mean"]) == (
        "dp_central", "fedavg", "2", "1 2", "1.3", "4.0")
    for name, cls in (("generic", [0, 1, 2, 3]), ("tail", [3]), ("head", [0, 1])):
        dp = [statistics.fmean(DP[s][c] for c in cls) for s in (1, 2)]
        base = [statistics.fmean(BASE[s][c] for c in cls) for s in (1, 2)]
        drops = [b - d for b, d in zip(base, dp, strict=True)]
        assert float(r[f"{name} mean"]) == pytest.approx(statistics.fmean(dp))
        assert float(r[f"{name} no_dp mean"]) == pytest.approx(statistics.fmean(base))
        assert float(r[f"{name} drop mean"]) == pytest.approx(statistics.fmean(drops))
        assert float(r[f"{name} drop std"]) == pytest.approx(statistics.stdev(drops))
        assert r[f"{name} drop n"] == "2"
    assert float(r["personalized drop mean"]) == pytest.approx(statistics.fmean([0.81 - 0.52, 0.82 - 0.54]))
    assert float(r["tail drop mean"]) == pytest.approx(0.3)  # (0.5 - 0.0 + 0.3 - 0.2) / 2
    assert float(r["mia_auc mean"]) == pytest.approx(0.51) and float(r["mia_auc no_dp mean"]) == pytest.approx(0.615)
    assert rows["16.0"]["mia_auc n"] == "0"  # no attack.json: no AUC
    assert float(rows["16.0"]["generic drop mean"]) == pytest.approx(0.05)
    assert written["note"] is None
    assert "| no DP | 2 | 1, 2 |" in written["table"]


def test_a_dp_run_is_matched_to_the_no_dp_run_of_its_own_seed_and_strategy(tmp_path):
    from fedlt.eval.report import expand_runs

    root = sweep(tmp_path / "runs")
    runs = [load_run(p) for p in expand_runs([str(root)])]
    settings = match_settings(runs)
    assert len(settings) == 2
    for s in settings:
        assert [r.path.parent.name for r in s.runs] == [s.runs[0].path.parent.name] * 2
        assert [(r.path.name, b.path.relative_to(root).as_posix()) for r, b in s.pairs] == [
            ("s1", "none/s1"), ("s2", "none/s2")]  # never fedprox's s1, never the other seed
    assert [s.label for s in settings] == ["dp_central · target_epsilon=4", "dp_central · target_epsilon=16"]


def test_per_class_table(tmp_path):
    privacy_only(sweep(tmp_path / "runs"), tmp_path / "out")
    rows = [r for r in read_csv(tmp_path / "out" / PER_CLASS_CSV) if r["setting"].endswith("target_epsilon=4")]
    assert [(r["class"], r["name"], r["train_count"], r["group"]) for r in rows] == [
        ("0", "cat", "300", "head"), ("1", "dog", "100", "head"), ("2", "owl", "30", "mid"), ("3", "yak", "10", "tail")]
    for r in rows:
        c = int(r["class"])
        assert float(r["no_dp_accuracy"]) == pytest.approx((BASE[1][c] + BASE[2][c]) / 2)
        assert float(r["dp_accuracy"]) == pytest.approx((DP[1][c] + DP[2][c]) / 2)
        assert float(r["drop"]) == pytest.approx((BASE[1][c] - DP[1][c] + BASE[2][c] - DP[2][c]) / 2)
        assert float(r["epsilon"]) == 4.0 and r["drop n"] == "2"
    assert float(rows[3]["drop"]) == pytest.approx(0.3) and float(rows[0]["drop"]) == pytest.approx(0.05)


def test_figures_are_written_and_the_table_is_printed(tmp_path, capsys):
    root = sweep(tmp_path / "runs")
    main([str(root), "--out", str(tmp_path / "out")])
    for name in (DROP_PNG, UTILITY_PNG):
        assert (tmp_path / "out" / name).read_bytes()[:4] == PNG
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Privacy cost" in md and "| no DP | 2 | 1, 2 |" in md
    assert md.index("## Privacy cost") < md.index("## Figures")
    assert f"![privacy_drop_vs_count]({DROP_PNG})" in md and f"![privacy_utility]({UTILITY_PNG})" in md
    out = capsys.readouterr().out
    assert COST_CSV in out and "| setting | n | seeds | z | C | ε (δ) | generic | drop |" in out
    assert "| dp_central · target_epsilon=4 | 2 | 1, 2 | 1.3 | 1 | 4 (1e-05) |" in out


def test_figure_series_follow_the_settings(tmp_path):
    from fedlt.eval.privacy_report import drop_vs_count, privacy_utility
    from fedlt.eval.report import expand_runs

    settings = match_settings([load_run(p) for p in expand_runs([str(sweep(tmp_path / "runs"))])])
    ax = drop_vs_count(settings).axes[0]
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert labels[0].startswith("ε = 4 · dp_central") and labels[1].startswith("ε = 16 · dp_central")
    axes = privacy_utility(settings).axes
    assert [a.get_xscale() for a in axes] == ["log"] * 3
    generic = axes[0]
    (line,) = [ln for ln in generic.get_lines() if ln.get_linestyle() == "-"]  # the DP series, sorted by epsilon
    assert list(line.get_xdata()) == [4.0, 16.0]
    dp4 = statistics.fmean(statistics.fmean(DP[s]) for s in (1, 2))
    assert line.get_ydata()[0] == pytest.approx(dp4)
    levels = [ln.get_ydata()[0] for ln in generic.get_lines() if ln.get_linestyle() == "--"]
    assert levels == pytest.approx([statistics.fmean(statistics.fmean(BASE[s]) for s in (1, 2))])


def test_without_a_matching_no_dp_run_it_says_so_and_lists_epsilon(tmp_path, capsys):
    make_run(tmp_path / "runs" / "dp", 1, DP[1], pers=0.5, privacy="dp_central", eps=4.0)
    make_run(tmp_path / "runs" / "none_other_seed", 7, BASE[1], pers=0.8)
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert NO_MATCH in out and "| 4 (1e-05) |" in out
    (row,) = read_csv(tmp_path / "out" / COST_CSV)
    assert row["epsilon mean"] == "4.0" and float(row["generic mean"]) == pytest.approx(0.425)
    assert row["generic drop mean"] == "" and row["generic drop n"] == "0"
    assert not (tmp_path / "out" / DROP_PNG).exists() and (tmp_path / "out" / UTILITY_PNG).exists()
    assert NO_MATCH in (tmp_path / "out" / "report.md").read_text()


def test_no_dp_run_no_privacy_files(tmp_path):
    make_run(tmp_path / "runs" / "a", 1, BASE[1], pers=0.8)
    written = report([str(tmp_path / "runs")], tmp_path / "out")
    assert written["privacy"] is None and not (tmp_path / "out" / COST_CSV).exists()
    assert "Privacy cost" not in written["markdown"].read_text()


def test_per_class_rows_need_per_class_accuracy(tmp_path):
    make_run(tmp_path / "dp", 1, DP[1], pers=0.5, privacy="dp_central")
    run = load_run(tmp_path / "dp")
    run.detail = {}
    (setting,) = match_settings([run])
    assert per_class(setting) is None


@pytest.mark.e2e
@needs_fmnist
def test_real_runs_dp_and_none(tmp_path):
    for name, extra in (("dp", ["privacy=dp_central"]), ("none", [])):
        res = run_fedlt("experiment=smoke", "num_rounds=1", *extra, run_dir=tmp_path / "runs" / name)
        assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([REPORT, str(tmp_path / "runs"), "--out", str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = read_csv(tmp_path / "out" / COST_CSV)
    assert row["runs"] == "dp" and row["no_dp_runs"] == "none" and float(row["epsilon mean"]) > 0
    results = {n: json.loads((tmp_path / "runs" / n / "results.json").read_text()) for n in ("dp", "none")}
    assert float(row["tail drop mean"]) == pytest.approx(results["none"]["generic/cumulative_75_95/tail_accuracy"]
                                                         - results["dp"]["generic/cumulative_75_95/tail_accuracy"])
    per = read_csv(tmp_path / "out" / PER_CLASS_CSV)
    assert len(per) == 10 and [int(r["train_count"]) for r in per] == results["dp"]["detail"]["generic"]["train_counts"]
    assert (tmp_path / "out" / DROP_PNG).read_bytes()[:4] == PNG


def test_a_damaged_attack_json_is_reported_and_left_out(tmp_path):
    make_run(tmp_path / "runs" / "dp", 1, DP[1], pers=0.5, privacy="dp_central", auc=0.5)
    make_run(tmp_path / "runs" / "none", 1, BASE[1], pers=0.8)
    (tmp_path / "runs" / "dp" / "attack.json").write_text('{"global": ')
    written = privacy_only(tmp_path / "runs", tmp_path / "out")
    (row,) = read_csv(tmp_path / "out" / COST_CSV)
    assert row["mia_auc n"] == "0" and row["generic drop n"] == "1"
    (msg,) = written["problems"]
    assert "attack.json is not valid JSON" in msg and f"- {msg}" in written["markdown"]
