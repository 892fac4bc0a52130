"""Starting Ray ourselves, before Flower does, so that every way the backend can fail is a clear error within
seconds instead of a hang.

Why: ``flwr.simulation.run_simulation`` starts the ServerApp thread first and calls ``ray.init`` afterwards; when
Ray fails, the ServerApp thread keeps waiting for replies and the process never exits (seen with Flower 1.42:
``run_simulation`` raises, but the non-daemon ServerApp thread stays in ``send_and_receive``), and ``ray.init`` with
an address nobody answers retries for minutes. Here: the address is probed with a plain TCP connect first,
``ray.init`` runs under a watchdog (``backend.startup_timeout_s``), and the cluster is checked to fit at least one
client actor. Flower then finds Ray initialised and uses it as it is (it only sets the actors' PYTHONPATH when it
starts Ray itself, so that is done here too).

Client actors are created with ``max_restarts`` (``backend.actor_max_restarts``): Flower 1.42 puts an actor
whose process died back into its pool, and every later message sent to it fails; a restartable actor comes back
(a fresh process), so only the message in flight when it died fails, and that failure is logged for its client.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import sys
import threading
from contextlib import contextmanager

from fedlt.core import malloc

_HOST_PORT = re.compile(r"^(?:ray://)?(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


class BackendError(RuntimeError):
    """Ray could not be started or reached, or cannot host a client (one paragraph, exit 1)."""


def address_problem(address) -> str | None:
    """Why ``backend.address`` is malformed (None when it is fine): null, auto, local, HOST:PORT or
    ray://HOST:PORT."""
    if address is None or address in ("auto", "local"):
        return None
    if not isinstance(address, str):
        return "expected null, auto, local, HOST:PORT or ray://HOST:PORT"
    m = _HOST_PORT.match(address.strip())
    if m is None:
        return "expected null, auto, local, HOST:PORT or ray://HOST:PORT (e.g. 10.0.0.5:6379)"
    if not 1 <= int(m.group(2)) <= 65535:
        return "the port must be between 1 and 65535"
    return None


def probe(address: str, timeout: float) -> None:
    """A TCP connect to HOST:PORT: a dead address fails here in at most ``timeout`` seconds (``ray.init``
    itself keeps retrying for minutes)."""
    m = _HOST_PORT.match(address.strip())
    if m is None:
        return
    host, port = m.group(1).strip("[]"), int(m.group(2))
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise BackendError(
            f"no Ray cluster answers at backend.address={address!r} ({e.strerror or e}); start one there "
            f"(`ray start --head --port={port}`) or set backend.address=null to start a private Ray instance."
        ) from None


@contextmanager
def watchdog(seconds: float, what: str):
    """Exit the process (code 1, one line on stderr) if the block has not finished after ``seconds``: a hung
    backend call cannot be interrupted from Python. Child processes Ray started die with the driver (Ray starts
    them with kill-on-parent-death)."""

    def fire() -> None:
        print(f"fedlt: error: {what} did not finish within {seconds:g} s (backend.startup_timeout_s); "
              f"giving up.", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def client_resources(cfg: dict) -> dict:
    b = cfg["backend"]
    return {"num_cpus": float(b["num_cpus_per_client"]), "num_gpus": float(b["num_gpus_per_client"]),
            # passed by Flower to ClientAppActor.options(): a dead actor is restarted, and a message that was
            # sent to it while it died or restarted is run again on the restarted actor (see module doc)
            "max_restarts": int(b.get("actor_max_restarts", 10)),
            "max_task_retries": int(b.get("actor_task_retries", 1))}


def check_reachable(cfg: dict, init_args: dict) -> None:
    """Fail fast (before data preparation) when ``backend.address`` names a cluster nobody answers for."""
    address = init_args.get("address")
    if isinstance(address, str) and address not in ("auto", "local"):
        probe(address, timeout=min(5.0, float(cfg["backend"].get("startup_timeout_s") or 120)))


def local_only_args(init_args: dict) -> dict:
    """A private Ray instance for one simulation accepts only this run's processes: Ray's token authentication
    is switched on with a random token made for this run (``RAY_AUTH_TOKEN`` in this process's environment,
    inherited by the Ray processes it starts; other users cannot read it), so no other process -- on the network
    or on this machine -- can submit work to it. (Ray 2.55 binds its gRPC servers to every interface and maps a
    loopback node address back to the machine's address, so binding cannot be narrowed from here; README
    "Running on a Ray cluster" says how to firewall, and how a cluster is secured where it is started.) A token
    or mode the user set already is respected. Returns extra ``ray.init`` arguments (none)."""
    if os.environ.get("RAY_AUTH_MODE", "token") == "token":
        os.environ["RAY_AUTH_MODE"] = "token"
        if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        if "ray" in sys.modules:  # Ray reads the mode and token when it is imported: make it read them again
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
    return {}


def start_ray(cfg: dict, init_args: dict) -> None:
    """Start or attach to Ray, or raise BackendError within ``backend.startup_timeout_s``."""
    import ray

    b = cfg["backend"]
    limit = float(b.get("startup_timeout_s") or 120)
    address = init_args.get("address")
    check_reachable(cfg, init_args)
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    local_args = {} if address else local_only_args(init_args)
    malloc_env = malloc.export(b)  # the daemons and local actors inherit it; a cluster's actors get it below
    try:
        with watchdog(limit, f"starting Ray (backend.address={address!r})"):
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath, **malloc_env}}, **local_args, **init_args)
    except BackendError:
        raise
    except Exception as e:  # noqa: BLE001 -- every failure to start is reported the same way
        shutdown_ray()
        from fedlt.core.failures import clip

        raise BackendError(f"Ray failed to start (backend.address={address!r}): {type(e).__name__}: "
                           f"{clip(str(e).strip(), 400, rest='not shown')}") from None
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    res = client_resources(cfg)
    total = ray.cluster_resources()
    no_gpu = res["num_gpus"] > 0 and not total.get("GPU")  # Flower would then queue actors forever
    if no_gpu or pool_size_from_resources(res) < 1:
        shutdown_ray()
        raise BackendError(
            f"no Ray node can host a client actor: each needs backend.num_cpus_per_client={res['num_cpus']:g} CPUs "
            f"and backend.num_gpus_per_client={res['num_gpus']:g} GPUs, the cluster has "
            f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; lower the per-client resources."
        )


def descendants(pid: int | None = None) -> list[int]:
    """Every live descendant process of ``pid`` (default: this process), from /proc (Linux; [] elsewhere)."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _is_ray(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
    except OSError:
        return False
    return cmd.startswith(b"ray::") or b"/ray/" in cmd or b"raylet" in cmd or b"gcs_server" in cmd


def ray_descendants() -> list[int]:
    return [p for p in descendants() if _is_ray(p)]


def shutdown_ray(grace_s: float = 3.0) -> None:
    """``ray.shutdown()``, then make sure no process Ray started is left: its actor workers outlive the raylet
    for up to a minute after a normal shutdown, so whatever Ray process among this process's descendants is
    still alive after ``grace_s`` gets SIGKILL."""
    import signal
    import time

    procs = ray_descendants()
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 -- best effort at exit
        pass
    procs += [p for p in ray_descendants() if p not in procs]
    deadline = time.monotonic() + grace_s
    while procs and time.monotonic() < deadline:
        procs = [p for p in procs if _alive(p)]
        time.sleep(0.1)
    for p in procs:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ")
    except OSError:
        return b""


def how_it_ended(pid: int) -> str:
    """How a dead child process ended, read from its zombie's /proc entry (``exit_code``, field 52 of
    /proc/PID/stat, Linux >= 3.5); "" once it was reaped or where that is not available."""
    import signal

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        status = int(fields[49])  # fields[0] is field 3 (state)
    except (OSError, IndexError, ValueError):
        return ""
    sig = status & 0x7F
    if not sig:
        return f"exit code {(status >> 8) & 0xFF}"
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    oom = ", e.g. by the kernel's out-of-memory killer or by a user" if sig == signal.SIGKILL else ""
    return f"killed with {name}{oom}"


class RayProcessWatch:
    """Watches the raylet and the GCS server of the private Ray instance this process started. When one of
    them dies mid-run, the client actors and the object store are gone, and Ray's C++ core terminates this
    driver a few seconds later (``connection.cc: The connection to the plasma store is failed. Terminate the
    process``: exit 1, no Python exception, nothing fedlt could catch, no message saying why). The watch polls
    both processes every ``interval_s`` and calls ``on_death(name, pid, how)`` at once (from its thread), so
    the caller can say what happened before Ray ends the process. Attached clusters (``backend.address``) are
    not watched: their raylet is not this process's child."""

    WATCHED = (("raylet", b"/raylet/raylet"), ("GCS server", b"/gcs/gcs_server"))

    def __init__(self, on_death, interval_s: float = 0.1):
        self.on_death, self.interval_s = on_death, interval_s
        self.pids: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RayProcessWatch:
        for pid in descendants():
            cmd = _cmdline(pid)
            for name, marker in self.WATCHED:
                if marker in cmd.split(b" ", 1)[0] and name not in self.pids:
                    self.pids[name] = pid
        if self.pids:
            self._thread = threading.Thread(target=self._run, name="fedlt-ray-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Before a normal shutdown (which stops both processes on purpose)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for name, pid in self.pids.items():
                if not _alive(pid) and not self._stop.is_set():
                    self.on_death(name, pid, how_it_ended(pid))
                    return


def kill_ray_processes(pids: list[int]) -> None:
    """SIGKILL these Ray processes (this run's own, from :func:`ray_descendants`) that are still alive."""
    import signal

    for p in pids:
        if _alive(p) and _is_ray(p):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def actor_count(cfg: dict) -> int:
    """How many client actors Ray can run at once (Flower's own formula), 1 when unknown (client batching makes
    one group per actor)."""
    try:
        import ray

        if not ray.is_initialized():
            return 1
        b = cfg["backend"]
        total = 0
        for node in ray.nodes():
            res = node.get("Resources") or {}
            n = int(res.get("CPU", 0) / float(b["num_cpus_per_client"]))
            if float(b["num_gpus_per_client"]) > 0:
                n = min(n, int(res.get("GPU", 0) / float(b["num_gpus_per_client"])))
            total += n
        return max(total, 1)
    except Exception:  # noqa: BLE001 -- a heuristic for the group size only
        return 1
