"""Shared test helpers: run the real `fedlt` console script in a subprocess (as a user would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _absl_handler_on_the_real_stderr() -> None:
    """absl's logging handler (imported with TensorBoard by any in-process run) keeps the ``sys.stderr`` it saw
    when it was created -- inside a test, pytest's capture file -- and *closes* that stream when logging's
    handlers are shut down, which Hydra's logging set-up does in every in-process `fedlt` call: pytest's own
    capture file would be closed under it. Point it at the process's real stderr, which absl never closes."""
    try:
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover
        return
    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


_absl_handler_on_the_real_stderr()
FEDLT = str(Path(sys.executable).with_name("fedlt"))
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SHARED_DATA = Path(os.environ.get("FEDLT_DATA_ROOT") or ROOT.parent / "shared" / "data")


def fmnist_available() -> bool:
    return (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists() or bool(os.environ.get("FEDLT_DATA_ROOT"))


needs_fmnist = pytest.mark.skipif(not fmnist_available(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def run_fedlt(*overrides: str, run_dir: Path | None = None, timeout: float = 300, env: dict | None = None,
              cmd: str = FEDLT) -> subprocess.CompletedProcess:
    args = [cmd, *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def terminate(pids, gone, wait_s: float) -> None:
    """SIGTERM, then SIGKILL, exactly these processes (never `ray stop`/pkill: other runs share the machine),
    waiting up to ``wait_s`` after each signal until ``gone()``."""
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not gone():
            time.sleep(0.2)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def flower_task_identity():
    """Messages built by hand (outside a ServerApp) need Flower's per-process task identity; the unit tests of
    tests/api, tests/core, tests/flower and tests/strategies use it automatically (their conftest.py)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old
