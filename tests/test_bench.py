"""fedlt-bench: the bare loop really does the Flower path's work (identical metrics), the JSON line carries what
the README quotes, the defaults adapt to the checkout, and memory is measured over the whole process tree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlt.bench import compare_rows, default_overrides, process_tree, tree_memory_mb
from tests.conftest import ROOT, needs_fmnist

BENCH = str(Path(sys.executable).with_name("fedlt-bench"))
TINY = ["strategy=fedavg", "dataset=fmnist_lt", "dataset.n_max=1000", "num_clients=4", "participation=0.5", "num_rounds=3",
        "eval.every=2", "local_epochs=1", "model.width=8", "model.feature_dim=32"]


def run_bench(*args: str, timeout: float = 300) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [BENCH] if Path(BENCH).exists() else [sys.executable, "-m", "fedlt.bench"]
    res = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    return json.loads(lines[-1])


@pytest.mark.e2e
@needs_fmnist
def test_bench_compares_the_flower_path_with_a_bare_loop_doing_the_same_work():
    out = run_bench(*TINY)
    # same split, same clients, same SGD steps, same evaluation: the same numbers, bit for bit
    assert out["results_match"] is True and out["max_metric_diff"] == 0.0
    assert 0 < out["generic_accuracy"] < 1
    for key in ("steady_round_ratio", "end_to_end_ratio", "first_round_s", "peak_rss_mb", "cpu_ratio"):
        assert out[key] > 0, key
    assert len(out["flower_round_s"]) == len(out["bare_round_s"]) == 3
    assert out["clients"] == 4 and out["sampled_per_round"] == 2 and out["device"] == "cpu"
    assert out["peak_rss_mb"] > out["bare_peak_rss_mb"]  # Ray's daemons and actors are counted
    # each path ran in a fresh process, measured on its own tree: the plain loop's figure is its own process only
    assert 0 < out["plain_peak_pss_mb"] <= out["plain_peak_rss_mb"] < out["peak_rss_mb"]
    assert out["flower_vs_plain_peak_pss"] == pytest.approx(out["peak_pss_mb"] / out["plain_peak_pss_mb"], rel=0.01)
    assert out["machine"]["cpus"] >= 1


@needs_fmnist
def test_updates_mode_reports_sequential_and_batched_throughput_on_cpu():
    from fedlt.bench import compose
    from fedlt.bench import updates_benchmark

    cfg = compose([o for o in TINY if not o.startswith(("num_clients", "dataset.n_max"))]
                  + ["num_clients=6", "dataset.n_max=600", "backend.device=cpu"])
    out = updates_benchmark(cfg, repeats=1)
    assert out["device"] == "cpu" and out["clients_per_update_batch"] == 3
    assert out["sequential_updates_per_s"] > 0 and out["batched_updates_per_s"] > 0
    assert 0 <= out["max_abs_weight_diff"] < 1  # float rounding only (tight equivalence: tests/core/test_cohort.py)
    # the lanes' critical path: sum of the clients' steps over the longest client's, between 1 and the cohort size
    assert out["steps_per_client_max"] >= out["steps_per_client_mean"] > 0
    assert out["critical_path_bound"] == pytest.approx(
        3 * out["steps_per_client_mean"] / out["steps_per_client_max"], abs=0.1)
    assert 1 <= out["critical_path_bound"] <= 3


def test_defaults_fill_only_what_the_user_did_not_set():
    got = default_overrides(["strategy=fedprox", "num_clients=8"])
    assert "strategy=fedprox" in got and "num_clients=8" in got
    assert not any(o.startswith("strategy=fedloge") for o in got)
    assert sum(o.startswith("num_clients=") for o in got) == 1
    bare = default_overrides([])
    have = {o.split("=")[0]: o.split("=")[1] for o in bare}
    configs = ROOT / "configs"
    if (configs / "strategy" / "fedloge.yaml").exists() and (configs / "dataset" / "cifar10_lt.yaml").exists():
        assert have["strategy"] == "fedloge" and have["dataset"] == "cifar10_lt"
    else:  # the FedLoGe/CIFAR workload is not in this checkout: FedAvg on Fashion-MNIST-LT
        assert have["strategy"] == "fedavg" and have["dataset"] == "fmnist_lt"


def test_compare_rows_detects_any_metric_difference():
    rows = [{"round": 2, "generic/accuracy": 0.5, "personalized/accuracy": 0.7}]
    assert compare_rows(rows, [dict(rows[0])]) == (True, 0.0)
    ok, diff = compare_rows(rows, [{**rows[0], "personalized/accuracy": 0.70001}])
    assert not ok and diff == pytest.approx(1e-5)
    assert compare_rows(rows, [{**rows[0], "round": 3}])[0] is False


def test_process_tree_memory_includes_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(80 * 2**20); time.sleep(30)"])
    try:
        import time

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rss_child, _ = tree_memory_mb(child.pid)
            if rss_child > 80:
                break
            time.sleep(0.2)
        assert child.pid in process_tree()
        rss_all, pss_all = tree_memory_mb()
        assert rss_child > 80 and rss_all > rss_child and pss_all > 0
    finally:
        child.kill()
        child.wait()
