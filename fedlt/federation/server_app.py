"""The Flower ServerApp: builds the algorithm's strategy and the global model, discovers the clients, runs
the rounds, evaluates (generic on the server, personalized by federated evaluation over ALL clients), logs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedlt.data.federated import DataPlan, global_test
from fedlt.eval.generic import GenericEvaluation
from fedlt.federation.checkpoint import Checkpointer, RunState, rng_state, seed_round, set_rng_state
from fedlt.federation.client_app import configure_torch
from fedlt.federation.client_state import ClientStateStore
from fedlt.federation.failures import check_actors_alive, is_backend_failure
from fedlt.federation.model import build_run_model
from fedlt.federation.strategy import FedLTStrategy
from fedlt.runlog import RunLogger, json_safe
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
    last_round: int = 0  # the last completed round (a stopped run ends before num_rounds)


def is_eval_round(rnd: int, cfg: dict) -> bool:
    every = int(cfg["eval"]["every"])
    return rnd == int(cfg["num_rounds"]) or (every > 0 and rnd % every == 0)


def run_rounds(strategy: FedLTStrategy, grid: Grid, cfg: dict, plan: DataPlan, logger: RunLogger,
               outcome: RunOutcome, checkpointer: Checkpointer | None = None) -> None:
    """The round loop (see fedlt.federation.strategy for why it is ours and not ``Strategy.start``). With a
    checkpointer: starts after its ``resume_from`` state, saves every ``checkpoint.every`` rounds, and stops
    after the current round when a stop (SIGINT/SIGTERM) was requested."""
    ckpt = checkpointer or Checkpointer(cfg, None)
    timeout = float(cfg["backend"]["round_timeout_s"])
    seed = int(cfg["seed"])
    torch.manual_seed(derive_seed(seed, INIT))
    model = build_run_model(cfg, plan, strategy.client_cls)
    arrays = strategy.initial_arrays(model)
    clients = ClientStateStore()
    start, elapsed_before = 0, 0.0
    if (state := ckpt.resume_from) is not None:
        start, elapsed_before = state.round, state.elapsed_s
        arrays = ArrayRecord(state.arrays)
        clients.load_state_dict(state.clients)
        strategy.load_server_state(state.server_state)
        outcome.rows, outcome.failures, outcome.detail = list(state.rows), list(state.failures), dict(state.detail)
        set_rng_state(state.rng)
    test_x, test_y = global_test(plan)
    generic_eval = GenericEvaluation.for_run(cfg, plan, test_y)
    startup_timeout = float(cfg["backend"].get("startup_timeout_s") or timeout)
    strategy.discover_clients(grid, startup_timeout)
    client_of_node = {node: cid for cid, node in strategy.node_of_client.items()}
    min_clients = int(cfg["backend"].get("min_clients_per_round", 1))
    t_run = time.monotonic()
    outcome.last_round = start
    for rnd in range(start + 1, int(cfg["num_rounds"]) + 1):
        if ckpt.stop_requested():  # before the first round: nothing new to save
            break
        seed_round(seed, rnd)
        t0 = time.monotonic()
        sent = clients.attach(strategy.configure_train(rnd, arrays, ConfigRecord(), grid), client_of_node)
        replies = list(grid.send_and_receive(sent, timeout=timeout))
        ok, failures = strategy.split_replies(replies)
        failures += missing_replies(sent, replies, client_of_node, timeout)
        clients.collect(ok, strategy.client_of)
        for f in failures:
            f["round"], f["phase"] = rnd, "train"
            log.warning("round %d: client %s failed in train: %s", rnd, f["client"], f["reason"])
        outcome.failures.extend(failures)
        if not ok and any(is_backend_failure(f) for f in failures):
            check_actors_alive(grid, list(client_of_node), startup_timeout)  # raises BackendFailure if all dead
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
            sent = clients.attach(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid), client_of_node)
            ev = list(grid.send_and_receive(sent, timeout=timeout))
            ev_ok, ev_fail = strategy.split_replies(ev)
            ev_fail += missing_replies(sent, ev, client_of_node, timeout)
            for f in ev_fail:
                f["round"], f["phase"] = rnd, "evaluate"
                log.warning("round %d: client %s failed in evaluate: %s", rnd, f["client"], f["reason"])
            outcome.failures.extend(ev_fail)
            pers, pers_detail = strategy.personalized_metrics(ev_ok, bool(cfg["eval"]["mask_absent_classes"]))
            row.update(pers)
            row["eval/clients"] = len(ev_ok)
            last_row = outcome.rows[-1]["round"] if outcome.rows else 0
            since_last_row = [f for f in outcome.failures if f["round"] > last_row]
            if since_last_row:
                row["failures"] = since_last_row
            row["time/round_s"] = time.monotonic() - t0
            row["time/elapsed_s"] = elapsed_before + time.monotonic() - t_run
            outcome.detail = {"generic": gen_detail, "personalized": pers_detail, "round": rnd}
            row = json_safe(row)  # NaN (e.g. an empty shot group) -> None, as in metrics.jsonl
            logger.eval_round(row, outcome.detail)
            outcome.rows.append(row)
        stopping = ckpt.stop_requested()
        if ckpt.due(rnd) or stopping:
            ckpt.save(RunState(round=rnd, arrays=arrays.to_torch_state_dict(), clients=clients.state_dict(),
                               server_state=strategy.server_state(), rows=outcome.rows, failures=outcome.failures,
                               detail=outcome.detail, elapsed_s=elapsed_before + time.monotonic() - t_run,
                               rng=rng_state()))
        outcome.last_round = rnd
        if stopping:
            break
    outcome.final_arrays = arrays
    outcome.finished = outcome.last_round == int(cfg["num_rounds"])


def missing_replies(sent: list[Message], replies: list[Message], client_of_node: dict[int, int],
                    timeout: float) -> list[dict]:
    """Clients that were sent a message but did not answer within the round timeout."""
    answered = {r.metadata.src_node_id for r in replies}
    return [{"client": client_of_node.get(m.metadata.dst_node_id, -1),
             "reason": f"no reply within backend.round_timeout_s={timeout:g} s"}
            for m in sent if m.metadata.dst_node_id not in answered]


def make_server_app(cfg: dict, plan: DataPlan, logger_factory, outcome: RunOutcome,
                    checkpointer: Checkpointer | None = None) -> ServerApp:
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
            run_rounds(strategy, grid, cfg, plan, logger, outcome, checkpointer)
        except BaseException as e:  # surfaced by the driver; the simulation must not hang on it
            outcome.error = e
            raise
        finally:
            logger.close()

    return app
