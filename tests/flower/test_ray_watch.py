"""The watch over the run's raylet and GCS server (fedlt.flower.ray_backend.RayProcessWatch) and the paragraph
a user reads when one dies (fedlt.flower.simulation.backend_died_message), without Ray: stand-in processes named
like Ray's. The real thing (a SIGKILLed raylet mid-run): tests/test_reliability_e2e.py."""

import os
import signal
import subprocess
import threading
import time

import pytest

from fedlt.core.rounds import RunOutcome
from fedlt.flower.ray_backend import RayProcessWatch, how_it_ended
from fedlt.flower.simulation import backend_died_message


def stand_in(argv0: str, script: str = "sleep 60", timeout: float = 30) -> subprocess.Popen:
    """A child process whose command line starts with ``argv0`` (e.g. ``.../raylet/raylet``), returned once its
    ``exec`` has happened (on a busy machine bash may not have run it yet when Popen returns)."""
    p = subprocess.Popen(["bash", "-c", f"exec -a {argv0} {script}"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                if f.read().startswith(argv0.encode()):
                    return p
        except OSError:
            pass
        time.sleep(0.01)
    p.kill()
    raise AssertionError(f"the stand-in {argv0} did not start")


def zombie(p: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{p.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.01)
    raise AssertionError("the child did not end")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux /proc")
def test_how_a_dead_child_ended_is_read_before_it_is_reaped():
    killed = stand_in("/x/raylet/raylet")
    killed.send_signal(signal.SIGKILL)
    zombie(killed)
    assert how_it_ended(killed.pid).startswith("killed with SIGKILL, e.g. by the kernel's out-of-memory killer")
    exited = subprocess.Popen(["bash", "-c", "exit 3"])
    zombie(exited)
    assert how_it_ended(exited.pid) == "exit code 3"
    for p in (killed, exited):
        p.wait()
        assert how_it_ended(p.pid) == ""  # reaped: nothing left to read


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux /proc")
def test_the_watch_reports_a_dying_raylet_once_and_a_stopped_watch_nothing():
    raylet, gcs = stand_in("/x/ray/core/src/ray/raylet/raylet"), stand_in("/x/ray/core/src/ray/gcs/gcs_server")
    deaths, called = [], threading.Event()
    try:
        watch = RayProcessWatch(lambda *a: (deaths.append(a), called.set()), interval_s=0.02).start()
        assert watch.pids == {"raylet": raylet.pid, "GCS server": gcs.pid}
        raylet.send_signal(signal.SIGKILL)
        assert called.wait(10)
        time.sleep(0.1)
        assert deaths == [("raylet", raylet.pid, deaths[0][2])] and deaths[0][2].startswith("killed with SIGKILL")
        watch.stop()

        quiet = RayProcessWatch(lambda *a: deaths.append(a), interval_s=0.02).start()
        assert quiet.pids == {"GCS server": gcs.pid}
        quiet.stop()  # what the run does before Ray's own shutdown stops both on purpose
        assert not quiet._thread.is_alive()  # stopped for good: it cannot report the death below, however late
        gcs.send_signal(signal.SIGKILL)
        zombie(gcs)
        time.sleep(0.1)
        assert len(deaths) == 1
    finally:
        for p in (raylet, gcs):
            p.kill()
            p.wait()


def test_the_paragraph_names_the_process_the_round_and_what_resume_continues_from(tmp_path):
    cfg = {"num_rounds": 20, "checkpoint": {"every": 5}}
    outcome = RunOutcome(last_round=7)
    (tmp_path / "checkpoints").mkdir()
    for r in (3, 5):
        (tmp_path / "checkpoints" / f"round-{r:06d}.pt").write_bytes(b"")
    text = backend_died_message(cfg, tmp_path, outcome, "raylet", 4242, "killed with SIGKILL, e.g. by ...")
    assert text.startswith("Ray's raylet process (pid 4242) died during round 8 of 20 (killed with SIGKILL, e.g. "
                           "by ...); Ray cannot run the clients without it, so the run stopped. ")
    assert f"The run folder {tmp_path} keeps the checkpoint of round 5; continue the run with `fedlt resume=" \
           f"{tmp_path}`" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    text = backend_died_message({**cfg, "checkpoint": {"every": 0}}, empty, RunOutcome(), "GCS server", 1, "")
    assert "died during round 1 of 20; " in text
    assert f"Checkpoints are off (checkpoint.every=0), so `fedlt resume={empty}` starts the run over" in text
