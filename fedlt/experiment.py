"""A run's life cycle, shared by the entry points (``fedlt``, ``fedlt-bench``, ``flwr run``): prepare the data and
the run folder's partition files, continue from a checkpoint, run the federation (Flower + Ray simulation), and
write results.json."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from fedlt.core import checkpoint, malloc, personalize
from fedlt.core.interrupt import StopRequest
from fedlt.core.rounds import RunOutcome
from fedlt.data.federated import prepare, profile_counts, server_set_summary, summary
from fedlt.data.longtail import longtail_counts
from fedlt.data.sources import load_source
from fedlt.runlog import write_json_atomic
from fedlt.validate import validate_prepared, validate_server_data, validate_split
from strategies import get_strategy

log = logging.getLogger("fedlt")


class RunFailed(RuntimeError):
    """The federation stopped with an error (the cause is attached)."""


class Interrupted(RuntimeError):
    """A stop was requested (SIGINT/SIGTERM): the run saved a checkpoint after ``last_round`` and stopped."""

    def __init__(self, exit_code: int, last_round: int):
        super().__init__(exit_code, last_round)
        self.exit_code, self.last_round = exit_code, last_round


def prepare_run(cfg: dict, run_dir: Path | None):
    """Everything before Ray: data (may raise DataError / PartitionError), the data-dependent checks, and (with a
    run folder) partition.json and partition.png. The client count is checked against the long-tailed training
    set before partitioning (a split into 100,000 clients takes long)."""
    d = cfg["dataset"]
    source = load_source(d, cfg.get("data_root"), cfg["cache_dir"])
    n_max = int(d.get("n_max") or np.bincount(np.asarray(source.train_y)).max())
    validate_prepared(cfg, int(longtail_counts(source.num_classes, n_max, float(d["imbalance_factor"]),
                                               d["profile"]).sum()))
    validate_server_data(cfg, profile_counts(source, d))  # server_data.per_class fits every class
    plan, split, source = prepare(cfg)
    validate_prepared(cfg, int(split.global_counts.sum()), plan.num_classes)
    validate_split(cfg, split.client_train, split.client_test)
    if run_dir is not None:
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
    malloc.apply_here(cfg["backend"])  # first: before any thread of this process makes its own arena
    stop = StopRequest()
    on_signal = bool((cfg.get("checkpoint") or {}).get("on_signal", True))
    if on_signal:
        stop.install()
    try:
        return _run(cfg, Path(run_dir), resume, stop, on_signal)
    finally:
        stop.restore()


def status(message: str) -> None:
    """A progress line for the person at the terminal (stderr; the results go to stdout and the run folder)."""
    print(f"fedlt: {message}", file=sys.stderr, flush=True)


def _run(cfg: dict, run_dir: Path, resume: bool, stop: StopRequest, on_signal: bool) -> dict:
    from fedlt.flower.ray_backend import check_reachable
    from fedlt.flower.simulation import backend_config, simulate

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
    check_reachable(cfg, backend_config(cfg)["init_args"])  # a dead backend.address fails before data loading
    status(f"{'continuing' if resume else 'running'} strategy={cfg['strategy']['name']} on "
           f"dataset={cfg['dataset']['name']}: {cfg['num_clients']} clients, {cfg['num_rounds']} rounds; preparing "
           f"data (the first time a dataset is used it is decoded once and cached)")
    plan, split, source = prepare_run(cfg, None if resume else run_dir)
    extra = {"server_data": server_set_summary(split, source)} if len(split.server_indices) else {}
    if state is not None and state.round == int(cfg["num_rounds"]):  # killed after the last checkpoint
        checkpoint.reset_run_dir(run_dir, state, cfg)
        outcome = RunOutcome(rows=state.rows, detail=state.detail, failures=state.failures, finished=True,
                             last_round=state.round, privacy=(state.privacy or {}).get("summary", {}))
        return write_results(cfg, run_dir, outcome, t0, time.monotonic(), extra)
    if stop.event.is_set():
        raise Interrupted(stop.exit_code, state.round if state else 0)
    def ray_is_up() -> None:
        """The run folder changes only now, once everything that can refuse the run has accepted it."""
        if on_signal:
            stop.install()  # ray.init replaced the SIGTERM handler
        if resume:
            checkpoint.reset_run_dir(run_dir, state, cfg)

    status("starting Ray and the client actors")
    t_sim = time.monotonic()
    outcome = simulate(cfg, plan, run_dir, state, stop.event, ray_is_up)
    if outcome.error is not None and not outcome.finished:
        raise RunFailed(outcome.error)
    if not outcome.finished:
        raise Interrupted(stop.exit_code, outcome.last_round)
    return write_results(cfg, run_dir, outcome, t0, t_sim, extra)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_results(cfg: dict, run_dir: Path, outcome: RunOutcome, t0: float, t_sim: float,
                  extra: dict | None = None) -> dict:
    results = final_results(cfg, outcome, time.monotonic() - t0, time.monotonic() - t_sim, extra)
    write_json_atomic(run_dir / "results.json", results)
    return results


def final_results(cfg: dict, outcome: RunOutcome, wall_s: float, sim_s: float, extra: dict | None = None) -> dict:
    """results.json; ``extra``: run facts beside the metrics (e.g. ``server_data``: the server-held set's size)."""
    last = outcome.rows[-1] if outcome.rows else {}
    stage = get_strategy(cfg["strategy"]["name"]).client_cls.personalization_stage(cfg)
    return {
        **last,
        "rounds_completed": int(last.get("round", 0)),
        "time/wall_s": wall_s,
        "time/simulation_s": sim_s,
        "personalized/stage": stage,
        "personalized/budget": personalize.budget(get_strategy(cfg["strategy"]["name"]).client_cls, cfg),
        "personalized/mask_absent_classes": bool(cfg["eval"]["mask_absent_classes"]),
        "strategy": cfg["strategy"]["name"],
        "dataset": cfg["dataset"]["name"],
        "seed": int(cfg["seed"]),
        "detail": outcome.detail,
        "failures": outcome.failures,
        "pid": os.getpid(),
        **({"privacy": outcome.privacy} if outcome.privacy else {}),  # fedlt.privacy: mode, sampling, accountant
        **(extra or {}),
    }
