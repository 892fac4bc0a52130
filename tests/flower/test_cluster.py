"""backend=ray_cluster: a run attaches to a Ray cluster that is already running (a real multi-process Ray head
started by the test on 127.0.0.1 and stopped by PID), and resources Ray would refuse are refused up front."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedlt.config import ConfigError
from tests.conftest import needs_fmnist, run_fedlt, terminate

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    out.append(int(entry))
            except OSError:
                pass
    return out


def stop_cluster(head: subprocess.Popen, temp_dir: Path) -> None:
    """Stop exactly the processes of this cluster: the `ray start --block` process, every process whose
    command line names the cluster's own temp dir (GCS, raylet, agents), and their descendants (workers)."""
    from fedlt.bench import process_tree

    pids = set()
    for root in [head.pid, *processes_mentioning(str(temp_dir))]:
        pids.update(process_tree(root))
    pids.discard(os.getpid())
    terminate(pids, lambda: not any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids), wait_s=10)
    head.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.e2e
@needs_fmnist
def test_run_attaches_to_a_running_ray_cluster(tmp_path):
    port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))  # short: Ray's unix sockets live below it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, "ray start exited"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(0.5)
        run_dir = tmp_path / "run"
        res = run_fedlt("experiment=smoke", "num_clients=4", "num_rounds=2", "eval.every=0", "model.width=8",
                        "backend=ray_cluster", f"backend.address=127.0.0.1:{port}", run_dir=run_dir, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        results = json.loads((run_dir / "results.json").read_text())
        assert results["rounds_completed"] == 2 and results["generic/accuracy"] > 0.1
        # the run's driver registered with THIS cluster (its core-driver log is in the cluster's session)
        drivers = list(temp_dir.glob("session_*/logs/python-core-driver-*.log"))
        assert drivers, "no driver attached to the test cluster"
        assert head.poll() is None  # attaching and detaching left the cluster running
    finally:
        stop_cluster(head, temp_dir)
    assert not processes_mentioning(str(temp_dir))
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_cluster_resources_are_refused_with_an_address():
    from fedlt.bench import compose

    with pytest.raises(ConfigError, match=r"backend\.num_cpus=2 together with backend\.address='10\.0\.0\.1:6379'"):
        compose(["strategy=fedavg", "backend=ray_cluster", "backend.address=10.0.0.1:6379", "backend.num_cpus=2"])
    cfg = compose(["strategy=fedavg", "backend=ray_cluster", "backend.num_gpus_per_client=0.25"])
    assert cfg["backend"]["address"] == "auto" and cfg["backend"]["num_gpus_per_client"] == 0.25
