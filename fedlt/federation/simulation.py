"""Run a validated config end to end: prepare data on the driver, write the run directory, run the Flower
ServerApp/ClientApp pair with ``flwr.simulation.run_simulation`` on the Ray backend, write the results."""

from __future__ import annotations

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
    return {"client_resources": {"num_cpus": float(b["num_cpus_per_client"]),
                                 "num_gpus": float(b["num_gpus_per_client"])},
            "init_args": init_args}


def prepare_run(cfg: dict, run_dir: Path):
    """Everything before Ray: data (may raise DataError / PartitionError), partition.json, partition.png."""
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


def run(cfg: dict, run_dir: Path) -> dict:
    """Run the experiment; return the results dict (also written to results.json)."""
    t0 = time.monotonic()
    plan, split, source = prepare_run(cfg, run_dir)

    import flwr  # noqa: F401  (imported late: keeps `fedlt --help` and config errors fast)

    quiet_flower(cfg.get("log_level", "WARNING"))
    from flwr.simulation import run_simulation

    from fedlt.federation.client_app import make_client_app
    from fedlt.federation.server_app import RunOutcome, make_server_app

    outcome = RunOutcome()
    server = make_server_app(cfg, plan, lambda: RunLogger(run_dir, int(cfg["num_rounds"])), outcome)
    client = make_client_app(cfg, plan)
    t_sim = time.monotonic()
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=int(cfg["num_clients"]),
                       backend_name="ray", backend_config=backend_config(cfg), verbose_logging=False)
    except BaseException as e:
        if outcome.error is None:
            outcome.error = e
    finally:
        _shutdown_ray()
    if outcome.error is not None and not outcome.finished:
        raise RunFailed(outcome.error)
    results = final_results(cfg, outcome, time.monotonic() - t0, time.monotonic() - t_sim)
    write_json_atomic(run_dir / "results.json", results)
    return results


class RunFailed(RuntimeError):
    """The federation stopped with an error (the cause is attached)."""


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 -- best effort at exit
        pass


def final_results(cfg: dict, outcome, wall_s: float, sim_s: float) -> dict:
    last = outcome.rows[-1] if outcome.rows else {}
    strategy = outcome.strategy
    stage = strategy.client_cls.personalization_stage(cfg) if strategy is not None else "none"
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
