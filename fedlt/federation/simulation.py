"""Run a validated config end to end: prepare data on the driver, write the run directory, run the Flower
ServerApp/ClientApp pair with ``flwr.simulation.run_simulation`` on the Ray backend, write the results."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from fedlt.config import validate_data_size, validate_strategy_data
from fedlt.data.federated import prepare, summary
from fedlt.runlog import RunLogger, write_json_atomic

log = logging.getLogger("fedlt")


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED" not in record.getMessage() and "deprecated" not in record.getMessage()


def quiet_flower(level: str = "WARNING") -> None:
    """No duplicated Flower lines under Hydra, no alembic/deprecation noise (flower-notes.md pitfalls 7, 9)."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    flwr_logger.setLevel(level)
    for h in flwr_logger.handlers:
        h.addFilter(_DropDeprecation())
    logging.getLogger("alembic").setLevel(logging.WARNING)


def backend_config(cfg: dict) -> dict:
    from fedlt.federation.ray_backend import client_resources

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


def prepare_run(cfg: dict, run_dir: Path):
    """Everything before Ray: data (may raise DataError / PartitionError), partition.json, partition.png. The client count is
    checked against the long-tailed training set before partitioning (a split into 100,000 clients takes long)."""
    import numpy as np

    from fedlt.data.longtail import longtail_counts
    from fedlt.data.sources import load_source

    d = cfg["dataset"]
    source = load_source(d, cfg.get("data_root"), cfg["cache_dir"])
    n_max = int(d.get("n_max") or np.bincount(np.asarray(source.train_y)).max())
    validate_data_size(cfg, int(longtail_counts(source.num_classes, n_max, float(d["imbalance_factor"]),
                                                d["profile"]).sum()))
    plan, split, source = prepare(cfg)
    validate_data_size(cfg, int(split.global_counts.sum()))
    validate_strategy_data(cfg, plan.num_classes)
    split_summary = summary(split, source, cfg)
    write_json_atomic(run_dir / "partition.json", split_summary)
    try:
        from fedlt.data.figure import write_partition_figure

        write_partition_figure(split_summary, run_dir / "partition.png")
    except Exception as e:  # noqa: BLE001 -- a missing figure must not stop a run
        log.warning("partition.png not written: %s", e)
    return plan, split, source


def run(cfg: dict, run_dir: Path, resume: bool = False) -> dict:
    """Run the experiment (or continue it from its newest checkpoint with ``resume``); return the results dict
    (also written to results.json). Raises RunFailed, Interrupted, BackendError, CheckpointError and the data
    errors."""
    from fedlt.federation.interrupt import StopRequest

    stop = StopRequest()
    on_signal = bool((cfg.get("checkpoint") or {}).get("on_signal", True))
    if on_signal:
        stop.install()
    try:
        return _run(cfg, Path(run_dir), resume, stop, on_signal)
    finally:
        stop.restore()


def _run(cfg: dict, run_dir: Path, resume: bool, stop, on_signal: bool) -> dict:
    from fedlt.federation import checkpoint
    from fedlt.federation.ray_backend import check_reachable, shutdown_ray, start_ray

    t0 = time.monotonic()
    state = None
    if resume:
        done = _read_json(run_dir / "results.json")
        if done is not None and done.get("rounds_completed") == int(cfg["num_rounds"]):
            log.warning("the run in %s is already complete (%d rounds); nothing to do", run_dir, cfg["num_rounds"])
            return done
        state = checkpoint.latest(run_dir, cfg)
        if state is not None and state.round > int(cfg["num_rounds"]):
            raise checkpoint.CheckpointError(
                f"invalid value num_rounds={cfg['num_rounds']}: the newest checkpoint of {run_dir} is after round "
                f"{state.round}; a resumed run can keep or raise num_rounds, not lower it below that.")
        checkpoint.reset_run_dir(run_dir, state, cfg)
    check_reachable(cfg, backend_config(cfg)["init_args"])  # a dead backend.address fails before data loading
    plan, split, source = prepare_run(cfg, run_dir)
    from fedlt.federation.engine import tune_flower
    from fedlt.federation.server_app import RunOutcome, make_server_app

    if state is not None and state.round == int(cfg["num_rounds"]):  # killed after the last checkpoint
        outcome = RunOutcome(rows=state.rows, detail=state.detail, failures=state.failures, finished=True,
                             last_round=state.round)
        return _write_results(cfg, run_dir, outcome, t0, time.monotonic())
    if stop.event.is_set():
        raise Interrupted(stop.exit_code, state.round if state else 0)

    import flwr  # noqa: F401  (imported late: keeps `fedlt --help` and config errors fast)

    quiet_flower(cfg.get("log_level", "WARNING"))
    from flwr.simulation import run_simulation

    from fedlt.federation.client_app import make_client_app

    start_ray(cfg, backend_config(cfg)["init_args"])  # BackendError within seconds instead of a hang
    if on_signal:
        stop.install()  # ray.init replaced the SIGTERM handler
    start_round = state.round if state is not None else 0
    outcome = RunOutcome()
    ckpt = checkpoint.Checkpointer(cfg, run_dir, resume_from=state, stop=stop.event)
    server = make_server_app(cfg, plan, lambda: RunLogger(run_dir, int(cfg["num_rounds"]), start_round=start_round),
                             outcome, ckpt)
    client = make_client_app(cfg, plan)
    tune_flower()
    t_sim = time.monotonic()
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=int(cfg["num_clients"]),
                       backend_name="ray", backend_config=backend_config(cfg), verbose_logging=False)
    except BaseException as e:
        if outcome.error is None:
            outcome.error = e
    finally:
        shutdown_ray()
    if outcome.error is not None and not outcome.finished:
        raise RunFailed(outcome.error)
    if not outcome.finished:
        raise Interrupted(stop.exit_code, outcome.last_round)
    return _write_results(cfg, run_dir, outcome, t0, t_sim)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_results(cfg: dict, run_dir: Path, outcome, t0: float, t_sim: float) -> dict:
    results = final_results(cfg, outcome, time.monotonic() - t0, time.monotonic() - t_sim)
    write_json_atomic(run_dir / "results.json", results)
    return results


class RunFailed(RuntimeError):
    """The federation stopped with an error (the cause is attached)."""


class Interrupted(RuntimeError):
    """A stop was requested (SIGINT/SIGTERM): the run saved a checkpoint after ``last_round`` and stopped."""

    def __init__(self, exit_code: int, last_round: int):
        super().__init__(exit_code, last_round)
        self.exit_code, self.last_round = exit_code, last_round


def final_results(cfg: dict, outcome, wall_s: float, sim_s: float) -> dict:
    last = outcome.rows[-1] if outcome.rows else {}
    from strategies import get_strategy

    stage = get_strategy(cfg["strategy"]["name"]).client_cls.personalization_stage(cfg)
    return {
        **last,
        "rounds_completed": int(last.get("round", 0)),
        "time/wall_s": wall_s,
        "time/simulation_s": sim_s,
        "personalized/stage": stage,
        "personalized/mask_absent_classes": bool(cfg["eval"]["mask_absent_classes"]),
        "strategy": cfg["strategy"]["name"],
        "dataset": cfg["dataset"]["name"],
        "seed": int(cfg["seed"]),
        "detail": outcome.detail,
        "failures": outcome.failures,
        "pid": os.getpid(),
    }
