"""The same ServerApp/ClientApp under Flower's Deployment Engine: one SuperLink and two SuperNodes on loopback
(real processes, free ports, killed by PID with everything they spawned), driven by `flwr run . <connection>`."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, needs_fmnist, terminate

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.3)


def kill_trees(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL, each started process and every descendant (SuperExec, serverapp, clientapps)."""
    from fedlt.bench import process_tree

    pids = [pid for p in procs for pid in process_tree(p.pid)]
    terminate(pids, lambda: all(p.poll() is not None for p in procs), wait_s=8)
    for p in procs:
        p.wait(timeout=10)


@pytest.mark.e2e
@needs_fmnist
def test_flwr_run_on_a_superlink_with_two_supernodes(tmp_path):
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    port = free_port()
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    run_dir = tmp_path / "run"
    run_config = tmp_path / "run_config.toml"
    run_config.write_text('fedlt-overrides = "experiment=smoke num_clients=2 num_rounds=1 '
                          f'model.width=8"\nrun-dir = "{run_dir}"\n')
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("superlink", "node0", "node1")}
    procs = []
    try:
        link = subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                 str(port)], env=env, stdout=logs["superlink"], stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)
        procs.append(link)
        wait_for_port(port, link)
        for i in range(2):
            procs.append(subprocess.Popen(
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port",
                 str(free_port()), "--node-config", f"partition-id={i} num-partitions=2"],
                env=env, stdout=logs[f"node{i}"], stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True))
        res = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream", "--run-config",
                              str(run_config)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        deadline = time.monotonic() + 60  # --stream returns when the run's logs end
        while not (run_dir / "results.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (run_dir / "results.json").exists(), res.stdout[-3000:]
        results = json.loads((run_dir / "results.json").read_text())
        assert results["rounds_completed"] == 1
        assert results["generic/accuracy"] > 0.1 and results["personalized/accuracy"] > 0.1
        assert results["detail"]["personalized"]["client_ids"] == [0, 1]  # both SuperNodes evaluated
        assert json.loads((run_dir / "partition.json").read_text())["num_clients"] == 2
    finally:
        kill_trees(procs)
        for f in logs.values():
            f.close()
    assert (ROOT / "pyproject.toml").read_bytes() == pyproject  # `flwr run` had nothing to migrate or rewrite
