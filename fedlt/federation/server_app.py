"""The Flower ServerApp: builds the algorithm's strategy and the global model, discovers the clients, runs
the rounds, evaluates (generic on the server, personalized by federated evaluation over ALL clients), logs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlt.data.federated import DataPlan, global_test
from fedlt.eval.generic import GenericEvaluation
from fedlt.federation.client_app import configure_torch
from fedlt.federation.model import build_run_model
from fedlt.federation.strategy import FedLTStrategy
from fedlt.runlog import RunLogger
from fedlt.seeding import INIT, derive_seed

log = logging.getLogger("fedlt")


@dataclass
class RunOutcome:
    """Filled in by the ServerApp thread; read by the driver after the simulation returns."""

    rows: list[dict] = field(default_factory=list)
    final_arrays: ArrayRecord | None = None
    detail: dict = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    strategy: FedLTStrategy | None = None
    error: BaseException | None = None
    finished: bool = False


def is_eval_round(rnd: int, cfg: dict) -> bool:
    every = int(cfg["eval"]["every"])
    return rnd == int(cfg["num_rounds"]) or (every > 0 and rnd % every == 0)


def run_rounds(strategy: FedLTStrategy, grid: Grid, cfg: dict, plan: DataPlan, logger: RunLogger,
               outcome: RunOutcome) -> None:
    """The round loop (see fedlt.federation.strategy for why it is ours and not ``Strategy.start``)."""
    timeout = float(cfg["backend"]["round_timeout_s"])
    torch.manual_seed(derive_seed(int(cfg["seed"]), INIT))
    model = build_run_model(cfg, plan, strategy.client_cls)
    arrays = strategy.initial_arrays(model)
    test_x, test_y = global_test(plan)
    generic_eval = GenericEvaluation.for_run(cfg, plan, test_y)
    strategy.discover_clients(grid, timeout)
    min_clients = int(cfg["backend"].get("min_clients_per_round", 1))
    t_run = time.monotonic()
    for rnd in range(1, int(cfg["num_rounds"]) + 1):
        t0 = time.monotonic()
        replies = list(grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid),
                                             timeout=timeout))
        ok, failures = strategy.split_replies(replies)
        for f in failures:
            f["round"], f["phase"] = rnd, "train"
            log.warning("round %d: client %s failed: %s", rnd, f["client"], f["reason"])
        outcome.failures.extend(failures)
        row: dict = {"round": rnd}
        if len(ok) >= min_clients:
            agg, _ = strategy.aggregate_train(rnd, ok)
            arrays = strategy.after_aggregate(rnd, strategy.merge(arrays, agg), ok)
        else:
            log.warning("round %d: %d usable updates < backend.min_clients_per_round=%d; global model unchanged",
                        rnd, len(ok), min_clients)
        metrics = [next(iter(r.content.metric_records.values())) for r in ok]
        n = sum(float(m["num-examples"]) for m in metrics)
        if metrics:
            row["train/loss"] = sum(float(m["train/loss"]) * float(m["num-examples"]) for m in metrics) / n
        row["train/clients"] = sum(int(m.get("num-clients", 1)) for m in metrics)  # a cohort reply counts its clients
        row["train/failures"] = len(failures)
        t_train = time.monotonic() - t0
        logger.train_round(rnd, {k: v for k, v in row.items() if k != "round"} | {"time/train_s": t_train})
        if is_eval_round(rnd, cfg):
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            if strategy.frozen:
                model.load_state_dict(strategy.frozen, strict=False)
            gen, gen_detail = strategy.generic_metrics(model, test_x, test_y, plan.num_classes,
                                                       int(cfg["eval"]["batch_size"]), generic_eval)
            row.update(gen)
            ev = list(grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid),
                                            timeout=timeout))
            ev_ok = [r for r in ev if not r.has_error()]
            ev_fail = [{"client": -1, "reason": str(r.error.reason)[-500:], "round": rnd, "phase": "evaluate"}
                       for r in ev if r.has_error()]
            outcome.failures.extend(ev_fail)
            pers, pers_detail = strategy.personalized_metrics(ev_ok, bool(cfg["eval"]["mask_absent_classes"]))
            row.update(pers)
            row["eval/clients"] = len(ev_ok)
            if failures or ev_fail:
                row["failures"] = failures + ev_fail
            row["time/round_s"] = time.monotonic() - t0
            row["time/elapsed_s"] = time.monotonic() - t_run
            outcome.detail = {"generic": gen_detail, "personalized": pers_detail, "round": rnd}
            logger.eval_round(row, outcome.detail)
            outcome.rows.append(row)
    outcome.final_arrays = arrays
    outcome.finished = True


def make_server_app(cfg: dict, plan: DataPlan, logger_factory, outcome: RunOutcome) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from strategies import get_strategy

        configure_torch({**cfg["backend"], "torch_threads": cfg["backend"].get("server_threads") or 1})
        strategy_cls = get_strategy(cfg["strategy"]["name"])
        if cfg["backend"].get("client_batching"):
            from fedlt.federation.batched import make_cohort_strategy

            strategy_cls = make_cohort_strategy(strategy_cls)
        strategy = strategy_cls(cfg)
        outcome.strategy = strategy
        logger = logger_factory()
        try:
            run_rounds(strategy, grid, cfg, plan, logger, outcome)
        except BaseException as e:  # surfaced by the driver; the simulation must not hang on it
            outcome.error = e
            raise
        finally:
            logger.close()

    return app
