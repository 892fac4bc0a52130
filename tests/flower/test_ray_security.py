"""A local run's Ray cannot be used by anyone else: token authentication is on with a token made for the run,
so a client without that token is refused (the exposure found in review: a
process elsewhere connected to a run's unauthenticated Ray mid-run and executed a task as root)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ATTACKER = """
import os, sys
os.environ.pop("RAY_AUTH_TOKEN", None); os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    print("ATTACK-RAN", ray.get(ray.remote(lambda: os.getpid()).remote()))
except Exception as e:
    print("REFUSED", type(e).__name__, str(e)[:200])
"""


def test_a_local_run_refuses_clients_without_its_token(monkeypatch):
    import ray

    from fedlt.flower.ray_backend import shutdown_ray, start_ray

    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    cfg = {"backend": {"startup_timeout_s": 120, "num_cpus_per_client": 1, "num_gpus_per_client": 0.0}}
    start_ray(cfg, {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False, "num_cpus": 1})
    try:
        address = ray.get_runtime_context().gcs_address
        assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) >= 32
        assert ray.get(ray.remote(lambda: 1).remote()) == 1  # the run itself works
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        out = subprocess.run([sys.executable, "-c", ATTACKER, address], capture_output=True, text=True,
                             timeout=120, env=env)
        assert "ATTACK-RAN" not in out.stdout, out.stdout + out.stderr[-2000:]
        assert "REFUSED" in out.stdout, out.stdout + out.stderr[-2000:]
    finally:
        shutdown_ray()
