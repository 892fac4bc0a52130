"""The Flower simulation on Ray: start Ray (``fedlt.flower.ray_backend``), run fedlt's ServerApp/ClientApp pair
with ``flwr.simulation.run_simulation`` over prepared data, shut Ray down. The run's life cycle around it (the
run folder, data preparation, resume, results) is ``fedlt.experiment``'s."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fedlt.core.checkpoint import Checkpointer, RunState
from fedlt.core.rounds import RunOutcome
from fedlt.data.federated import DataPlan
from fedlt.runlog import RunLogger

log = logging.getLogger("fedlt")


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED" not in record.getMessage() and "deprecated" not in record.getMessage()


def quiet_flower(level: str = "WARNING") -> None:
    """No duplicated Flower lines under Hydra (flwr's own console handler plus propagation to Hydra's root handler),
    no alembic "setup plugin" INFO lines, no run_simulation deprecation warnings."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    flwr_logger.setLevel(level)
    for h in flwr_logger.handlers:
        h.addFilter(_DropDeprecation())
    logging.getLogger("alembic").setLevel(logging.WARNING)


def backend_config(cfg: dict) -> dict:
    from fedlt.flower.ray_backend import client_resources

    b = cfg["backend"]
    init_args = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": bool(b["log_to_driver"])}
    if b.get("address"):
        init_args["address"] = b["address"]  # attach: Ray refuses num_cpus/num_gpus together with an address
    else:
        if b.get("num_cpus"):
            init_args["num_cpus"] = int(b["num_cpus"])
        if b.get("num_gpus") is not None:
            init_args["num_gpus"] = float(b["num_gpus"])
    init_args.update(dict(b.get("init_args") or {}))
    return {"client_resources": client_resources(cfg), "init_args": init_args}


def simulate(cfg: dict, plan: DataPlan, run_dir: Path, state: RunState | None, stop: threading.Event,
             after_ray_start=None) -> RunOutcome:
    """Run the rounds after ``state`` (None: from the start) on Ray; return the outcome. ``after_ray_start`` is
    called once Ray is up (``ray.init`` replaces the SIGTERM handler: the caller re-installs its own)."""
    quiet_flower(cfg.get("log_level", "WARNING"))  # before Flower's simulation modules log at import
    from flwr.simulation import run_simulation

    from fedlt.flower.client_app import make_client_app
    from fedlt.flower.engine import tune_flower
    from fedlt.flower.ray_backend import RayProcessWatch, shutdown_ray, start_ray
    from fedlt.flower.server_app import make_server_app

    start_ray(cfg, backend_config(cfg)["init_args"])  # BackendError within seconds instead of a hang
    outcome = RunOutcome(last_round=state.round if state is not None else 0)
    # the raylet and GCS of a Ray this process started (none when attached to a cluster: nothing to watch)
    watch = RayProcessWatch(lambda name, pid, how: backend_died(cfg, run_dir, outcome, name, pid, how)).start()
    try:
        if after_ray_start is not None:
            after_ray_start()
        start_round = state.round if state is not None else 0
        ckpt = Checkpointer(cfg, run_dir, resume_from=state, stop=stop)
        server = make_server_app(cfg, plan,
                                 lambda: RunLogger(run_dir, int(cfg["num_rounds"]), start_round=start_round),
                                 outcome, ckpt, on_end=watch.stop)  # Flower stops Ray after the loop
        client = make_client_app(cfg, plan)
        tune_flower()
        try:
            run_simulation(server_app=server, client_app=client, num_supernodes=int(cfg["num_clients"]),
                           backend_name="ray", backend_config=backend_config(cfg), verbose_logging=False)
        except BaseException as e:
            if outcome.error is None:
                outcome.error = e
    finally:
        watch.stop()  # the shutdown stops the raylet and GCS on purpose
        shutdown_ray()
    return outcome


def backend_died_message(cfg: dict, run_dir: Path | None, outcome: RunOutcome, name: str, pid: int,
                         how: str) -> str:
    """What the person at the terminal reads when the raylet or GCS of this run's Ray died mid-run: which
    process, in which round, how it ended (when known), and what the run folder keeps for ``fedlt resume``."""
    from fedlt.core.checkpoint import list_checkpoints

    total, done = int(cfg["num_rounds"]), int(outcome.last_round)
    when = f"after round {done} of {total}" if done >= total else f"during round {done + 1} of {total}"
    found = list_checkpoints(run_dir) if run_dir is not None else []
    every = int((cfg.get("checkpoint") or {}).get("every", 0))
    if found:
        kept = (f"The run folder {run_dir} keeps the checkpoint of round {found[-1][0]}; continue the run with "
                f"`fedlt resume={run_dir}` (rounds after {found[-1][0]} are run again).")
    else:
        why = (f"No checkpoint had been written yet (checkpoint.every={every})" if every > 0
               else "Checkpoints are off (checkpoint.every=0)")
        kept = f"{why}, so `fedlt resume={run_dir}` starts the run over in that folder."
    return (f"Ray's {name} process (pid {pid}) died {when}{f' ({how})' if how else ''}; Ray cannot run the "
            f"clients without it, so the run stopped. {kept} If memory ran out, run fewer client actors at once "
            f"(backend.num_cpus, backend.num_cpus_per_client) or smaller clients.")


def backend_died(cfg: dict, run_dir: Path | None, outcome: RunOutcome, name: str, pid: int, how: str) -> None:
    """:class:`fedlt.flower.ray_backend.RayProcessWatch`'s callback: one paragraph on stderr, the remaining Ray
    processes of this run stopped, exit 1 -- before Ray's own core ends the process without a word. The run
    folder stays resumable: checkpoints are written atomically, and a resume cuts metrics.jsonl and TensorBoard
    back to the checkpoint."""
    import os
    import sys

    from fedlt.flower.ray_backend import kill_ray_processes, ray_descendants

    try:
        message = backend_died_message(cfg, run_dir, outcome, name, pid, how)
    except Exception as e:  # noqa: BLE001 -- the exit below must happen whatever goes wrong here
        message = f"Ray's {name} process (pid {pid}) died, so the run stopped ({type(e).__name__}: {e})."
    print(f"fedlt: error: {message}", file=sys.stderr, flush=True)
    try:
        sys.stdout.flush()
        kill_ray_processes(ray_descendants())
    finally:
        os._exit(1)
