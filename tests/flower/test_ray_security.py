"""A local run's Ray cannot be used by anyone else: token authentication is on with a token made for the run,
so a client without that token is refused (the exposure found in review: a process elsewhere connected to a
run's unauthenticated Ray mid-run and executed a task as root). The run side is a separate process, as a real
run is (Ray started inside the test process would outlive the test in Ray's global state)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

RUN = """
import os, subprocess, sys
import ray
from fedlt.flower.ray_backend import shutdown_ray, start_ray
cfg = {"backend": {"startup_timeout_s": 120, "num_cpus_per_client": 1, "num_gpus_per_client": 0.0,
                   "malloc_arena_max": 2}}
start_ray(cfg, {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False, "num_cpus": 1})
try:
    print("MODE", os.environ["RAY_AUTH_MODE"], len(os.environ["RAY_AUTH_TOKEN"]))
    print("OWN", ray.get(ray.remote(lambda: 1).remote()))
    print("ARENAS", ray.get(ray.remote(lambda: os.environ.get("MALLOC_ARENA_MAX")).remote()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", sys.argv[1], ray.get_runtime_context().gcs_address],
                         capture_output=True, text=True, timeout=120, env=env)
    print(out.stdout)
finally:
    shutdown_ray()
"""

ATTACKER = """
import os, sys
os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    print("ATTACK-RAN", ray.get(ray.remote(lambda: os.getpid()).remote()))
except Exception as e:
    print("REFUSED", type(e).__name__, str(e)[:200])
"""


def test_a_local_run_refuses_clients_without_its_token():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", RUN, ATTACKER], capture_output=True, text=True, timeout=300,
                         env=env, cwd=ROOT)
    log = out.stdout + out.stderr[-2000:]
    assert out.returncode == 0, log
    assert "MODE token 64" in out.stdout and "OWN 1" in out.stdout, log  # the run itself works, with a token
    assert "ATTACK-RAN" not in out.stdout, log
    assert "REFUSED" in out.stdout, log
    # backend.malloc_arena_max reaches the processes Ray starts (fedlt.core.malloc)
    assert "ARENAS 2" in out.stdout, log
