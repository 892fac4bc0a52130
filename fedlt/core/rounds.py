"""The round loop: sample, send, collect, aggregate, evaluate, log, checkpoint -- the same for every algorithm
and every transport. It talks to clients through a Flower ``Grid`` (Ray simulation, Flower's Deployment Engine,
or :class:`fedlt.core.inprocess.InProcessGrid`) with Flower ``Message`` objects, and to the algorithm through the
hooks of :class:`fedlt.api.server.ServerAlgorithm`.

One round: the strategy samples clients by client id (seeded, independent of node ids); each gets the global
arrays (plus the frozen arrays the first time, plus its own server-held state, :mod:`fedlt.core.client_state`);
replies with errors or non-finite arrays are rejected and logged; the rest are aggregated in client-id order (a
fixed summation order makes the average bitwise reproducible). On evaluation rounds the global model is scored
on the balanced test set here, and EVERY client scores its personalized predictors on its local test set;
algorithms whose clients override ``eval_uploads`` (CCVR) first get one more evaluate exchange in which every
client sends statistics of that global model (``ServerAlgorithm.after_eval_uploads``), before anything is scored.
With ``privacy.secagg`` the train exchange is SecAgg+ (:class:`fedlt.privacy.secagg.SecAggServer`: setup, share
keys, train with masked uploads, unmask) and the strategy aggregates one reply holding the unmasked mean.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlt.api.server import NUM_EXAMPLES, ServerAlgorithm
from fedlt.core.checkpoint import Checkpointer, RunState, rng_state, seed_round, set_rng_state
from fedlt.core.client_state import ClientStateStore
from fedlt.core.client_step import COHORT, DECOUPLED_GENERIC, EVAL_UPLOADS, RECEIVED
from fedlt.core.cohort import CLIENT_REPLIES, client_replies, cohorts, needs_client_replies
from fedlt.core.failures import (NON_FINITE, TIMEOUT, check_actors_alive, error_failure, failure, is_backend_failure,
                                 round_failure)
from fedlt.core.model import build_run_model
from fedlt.core.shared_eval import SharedEvaluation
from fedlt.data.federated import DataPlan, global_test, open_plan, server_data
from fedlt.eval.generic import GenericEvaluation
from fedlt.privacy import CENTRAL
from fedlt.privacy import enabled as privacy_enabled
from fedlt.privacy import secagg_enabled
from fedlt.runlog import RunLogger, json_safe
from fedlt.seeding import INIT, derive_seed
from fedlt.train import decoupled

log = logging.getLogger("fedlt")


@dataclass
class RunOutcome:
    """Filled in by the round loop (in the ServerApp's thread); read by the driver afterwards."""

    rows: list[dict] = field(default_factory=list)
    final_arrays: ArrayRecord | None = None
    detail: dict = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    strategy: ServerAlgorithm | None = None
    privacy: dict = field(default_factory=dict)  # fedlt.privacy.server.RunPrivacy.summary() (results.json)
    error: BaseException | None = None
    finished: bool = False
    last_round: int = 0  # the last completed round (a stopped run ends before num_rounds)


def is_eval_round(rnd: int, cfg: dict) -> bool:
    every = int(cfg["eval"]["every"])
    return rnd == int(cfg["num_rounds"]) or (every > 0 and rnd % every == 0)


def client_of(reply: Message) -> int:
    return int(next(iter(reply.content.metric_records.values()))["client-id"])


class Dispatch:
    """Client ids <-> node ids, and the messages of one round: frozen arrays go to a client once, every client's
    server-held state travels with its messages, and with client batching a train message stands for a group."""

    def __init__(self, strategy: ServerAlgorithm, cfg: dict, actors: int = 1, hold_client_state: bool = True):
        self.strategy, self.cfg, self.actors = strategy, cfg, actors
        self.hold_client_state = hold_client_state  # False: clients keep their state in their own context
        self.privacy = None  # a fedlt.privacy.server.RunPrivacy under client-level DP: it samples the clients
        self.node_of_client: dict[int, int] = {}
        self.client_of_node: dict[int, int] = {}
        self.has_frozen: set[int] = set()
        self.client_states = ClientStateStore()
        self.ever_sampled: set[int] = set()  # clients sent a train message so far (personalized/never_sampled)

    def discover(self, grid: Grid, timeout: float) -> None:
        """Ask every node once for its client id (partition-id), so sampling can be by client id."""
        n = int(self.cfg["num_clients"])
        deadline = time.monotonic() + timeout
        while len(node_ids := list(grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(node_ids)} of {n} client nodes connected within {timeout:.0f} s")
            time.sleep(0.2)
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"query": "client-id"})}), dst_node_id=nid,
                        message_type=MessageType.QUERY) for nid in node_ids]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error():
                raise RuntimeError(f"client node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
            self.node_of_client[client_of(reply)] = reply.metadata.src_node_id
        missing = sorted(set(range(n)) - set(self.node_of_client))
        if missing:
            raise RuntimeError(f"no node answered for clients {missing[:10]}")
        self.client_of_node = {node: cid for cid, node in self.node_of_client.items()}

    def message(self, client: int, arrays: ArrayRecord, config: dict, kind: str,
                received: dict | None = None) -> Message:
        content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
        extra = {**self.strategy.round_arrays(int(config["server-round"])), **(received or {})}
        if extra:
            content[RECEIVED] = ArrayRecord({k: v.detach().cpu() for k, v in extra.items()})
        frozen = self.strategy.frozen
        if frozen and client not in self.has_frozen:
            content["frozen"] = ArrayRecord(frozen)
            self.has_frozen.add(client)
        msg = Message(content=content, dst_node_id=self.node_of_client[client], message_type=kind)
        return self.client_states.attach(msg, client) if self.hold_client_state else msg

    def train_messages(self, rnd: int, arrays: ArrayRecord) -> list[Message]:
        config = {"server-round": rnd, **self.strategy.train_config(rnd)}
        if self.privacy is not None:  # sampling as the accountant assumes; the round's clipping norm
            config.update(self.privacy.train_config())
            clients = self.privacy.sample(rnd, self.strategy.sample_clients)
        else:
            clients = self.strategy.sample_clients(rnd)
        self.ever_sampled.update(clients)
        if not self.cfg["backend"].get("client_batching"):
            return [self.message(c, arrays, config, MessageType.TRAIN) for c in clients]
        out = []
        if needs_client_replies(type(self.strategy)):  # its own aggregate: every client's own reply
            config[CLIENT_REPLIES] = True
        extra = self.strategy.round_arrays(rnd)  # every client's ctx.received, as in message()
        for group in cohorts(clients, self.cfg, self.actors):
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({**config, "cohort": list(group)})})
            if extra:
                content[RECEIVED] = ArrayRecord({k: v.detach().cpu() for k, v in extra.items()})
            if self.strategy.frozen:
                content["frozen"] = ArrayRecord(self.strategy.frozen)
            msg = Message(content=content, dst_node_id=self.node_of_client[group[0]],
                          message_type=f"{MessageType.TRAIN}.{COHORT}")
            out.append(self.client_states.attach_cohort(msg, group) if self.hold_client_state else msg)
        return out

    def evaluate_messages(self, rnd: int, arrays: ArrayRecord, received: dict | None = None,
                          uploads: bool = False, decoupled_generic: bool = False) -> list[Message]:
        """One evaluate message per client; ``received``: extra arrays for the clients' ``ctx.received``
        (``after_eval_uploads``); ``uploads``: the eval-uploads pass (clients reply with ``eval_uploads``);
        ``decoupled_generic``: clients also reply with their generic cRT/LWS heads (``eval.decoupled``)."""
        config = {"server-round": rnd, **({EVAL_UPLOADS: True} if uploads else {}),
                  **({DECOUPLED_GENERIC: True} if decoupled_generic else {})}
        return [self.message(c, arrays, config, MessageType.EVALUATE, received)
                for c in sorted(self.node_of_client)]

    def split_replies(self, sent: list[Message], replies: Iterable[Message], timeout: float, rnd: int = 0,
                      phase: str = "train") -> tuple[list[Message], list[dict]]:
        """Keep replies without errors and with finite arrays, sorted by client id; return the rest, and the
        clients that did not answer within the timeout, as failure records (:func:`fedlt.core.failures.failure`:
        one logged sentence each, naming client, round ``rnd``, ``phase`` and the error)."""
        ok, failures, answered = [], [], set()
        for r in replies:
            answered.add(r.metadata.src_node_id)
            cid = self.client_of_node.get(r.metadata.src_node_id, -1)
            if r.has_error():
                failures.append(error_failure(cid, rnd, phase, str(r.error.reason)))
                continue
            bad = [k for rec in r.content.array_records.values() for k, a in rec.items()
                   if np.issubdtype(a.numpy().dtype, np.floating) and not np.isfinite(a.numpy()).all()]
            if bad:
                more = f" and {len(bad) - 3} more arrays" if len(bad) > 3 else ""
                failures.append(failure(cid, rnd, phase, NON_FINITE, f"non-finite update (NaN or inf values in "
                                        f"{', '.join(bad[:3])}{more}); it was rejected"))
                continue
            ok.append(r)
        failures += [failure(self.client_of_node.get(m.metadata.dst_node_id, -1), rnd, phase, TIMEOUT,
                             f"no reply within backend.round_timeout_s={timeout:g} s; the round went on without it")
                     for m in sent if m.metadata.dst_node_id not in answered]
        ok.sort(key=client_of)
        return ok, failures


def run_rounds(strategy: ServerAlgorithm, grid: Grid, cfg: dict, plan: DataPlan, logger: RunLogger,
               outcome: RunOutcome, checkpointer: Checkpointer | None = None, actors: int = 1) -> None:
    """Run rounds until ``num_rounds`` (or a stop request). With a checkpointer: start after its
    ``resume_from`` state, save every ``checkpoint.every`` rounds, stop after the current round when a stop
    (SIGINT/SIGTERM) was requested. ``actors``: how many clients can train at once (client batching's groups)."""
    ckpt = checkpointer or Checkpointer(cfg, None)
    timeout = float(cfg["backend"]["round_timeout_s"])
    seed = int(cfg["seed"])
    torch.manual_seed(derive_seed(seed, INIT))
    model = build_run_model(cfg, plan, strategy.client_cls)
    strategy.server_data = server_data(plan)  # server_data.per_class: the server-held balanced set (or None)
    arrays = strategy.initial_arrays(model)
    dispatch = Dispatch(strategy, cfg, actors)
    start, elapsed_before = 0, 0.0
    if (state := ckpt.resume_from) is not None:
        start, elapsed_before = state.round, state.elapsed_s
        arrays = ArrayRecord(state.arrays)
        dispatch.client_states.load_state_dict(state.clients)
        strategy.load_server_state(state.server_state)
        outcome.rows, outcome.failures, outcome.detail = list(state.rows), list(state.failures), dict(state.detail)
        set_rng_state(state.rng)
    privacy = None
    if privacy_enabled(cfg):  # fedlt.privacy.server: the core's only privacy object; strategies never see it
        from fedlt.privacy.server import RunPrivacy

        privacy = RunPrivacy(cfg, state.privacy if state is not None else None,
                             buffers={k for k, _ in model.named_buffers()},
                             train_sizes=[len(t) for t in open_plan(plan)[1].client_train])  # dp_sgd's q_k
        dispatch.privacy = privacy
    secure = None
    if secagg_enabled(cfg):  # privacy.secagg: SecAgg+ replaces the plain train exchange (fedlt.privacy.secagg)
        from fedlt.privacy.secagg import SecAggServer

        secure = SecAggServer(cfg, max(len(t) for t in open_plan(plan)[1].client_train))
    central = privacy is not None and privacy.mode == CENTRAL
    for r in range(1, start + 1):  # sampling is a pure function of (seed, round)
        dispatch.ever_sampled.update(strategy.sample_clients(r) if privacy is None
                                     else privacy.clients(r, strategy.sample_clients))
    test_x, test_y = global_test(plan)
    generic_eval = GenericEvaluation.for_run(cfg, plan, test_y)
    # eval.personalized_path: every client's heads on ONE pass over the test split (None = evaluate messages)
    shared = SharedEvaluation.for_run(cfg, plan, strategy.client_cls, model, dispatch.hold_client_state)
    decoupled_generic = False  # eval.decoupled: generic (federated) cRT/LWS from the clients' evaluate replies
    if decoupled.options(cfg) is not None:
        why = decoupled.generic_problem(cfg, model, strategy.client_cls.is_personal, test_x)
        if why:
            log.warning("eval.decoupled: this run logs no generic crt/lws predictors: %s", why)
        decoupled_generic = not why
    startup_timeout = float(cfg["backend"].get("startup_timeout_s") or timeout)
    dispatch.discover(grid, startup_timeout)
    min_clients = int(cfg["backend"].get("min_clients_per_round", 1))
    t_run = time.monotonic()
    outcome.last_round = start

    def exchange(rnd: int, phase: str, sent: list[Message]) -> list[Message]:
        replies = grid.send_and_receive(sent, timeout=timeout) if sent else []  # Poisson sampling may pick none
        ok, failures = dispatch.split_replies(sent, replies, timeout, rnd, phase)  # each failure logged there
        outcome.failures.extend(failures)
        if phase == "train" and not ok and any(is_backend_failure(f) for f in failures):
            check_actors_alive(grid, list(dispatch.client_of_node), startup_timeout)  # raises if all are dead
        return ok

    for rnd in range(start + 1, int(cfg["num_rounds"]) + 1):
        if ckpt.stop_requested():  # before the first round: nothing new to save
            break
        if privacy is not None and not privacy.affordable(rnd):  # e.g. resuming a run that spent its budget
            privacy.budget_stop = True
            break
        seed_round(seed, rnd)
        t0 = time.monotonic()
        failures_before = len(outcome.failures)
        sent_arrays = arrays
        row: dict = {"round": rnd}
        secure_sum = None
        if secure is None:
            ok = exchange(rnd, "train", dispatch.train_messages(rnd, arrays))
        else:  # setup, share keys, train (masked uploads), unmask: the server gets only the sum of the updates
            secure_sum = secure.run(rnd, arrays, dispatch.train_messages(rnd, arrays), dispatch.client_of_node,
                                    lambda phase, msgs: exchange(rnd, phase, msgs))
            dispatch.has_frozen -= secure_sum.not_sent  # they never received their train message
            if secure_sum.failure:
                outcome.failures.append(round_failure(rnd, "secagg", secure_sum.failure))
            ok = secure_sum.replies  # metrics and client state only; [] when the round failed
            row.update(secure_sum.metrics)
        dispatch.client_states.collect(ok, client_of)
        ok = client_replies(ok)  # client batching for a server with its own aggregate: one reply per client
        released = ok if secure_sum is None else [secure_sum.mean_reply(sent_arrays)] if ok and not central else []
        if privacy is not None:
            privacy.check_replies(ok, cfg["strategy"]["name"])
        if central:  # the strategy sees one reply: sent + noised mean of clipped updates (every round)
            released = (privacy.noised_replies(rnd, sent_arrays, ok) if secure_sum is None or not ok else
                        privacy.release(rnd, sent_arrays, secure_sum.total, secure_sum.unclipped - len(ok) / 2))
        if (len(released) if secure_sum is None or central else len(ok)) >= min_clients:
            arrays = strategy.after_aggregate(
                rnd, strategy.merge(arrays, strategy.aggregate(rnd, sent_arrays, released)), released)
            if privacy is not None:
                arrays = privacy.postprocess(arrays)
        else:
            log.warning("round %d: %d usable updates < backend.min_clients_per_round=%d; global model unchanged",
                        rnd, len(ok), min_clients)
        metrics = [next(iter(r.content.metric_records.values())) for r in ok]
        if metrics:
            n = sum(float(m[NUM_EXAMPLES]) for m in metrics)
            row["train/loss"] = sum(float(m["train/loss"]) * float(m[NUM_EXAMPLES]) for m in metrics) / n
        row["train/clients"] = sum(int(m.get("num-clients", 1)) for m in metrics)  # a cohort reply counts its clients
        for key in ("train/steps", "train/samples"):  # the work done: local SGD steps and sample passes
            if metrics and all(key in m for m in metrics):
                row[key] = sum(float(m[key]) for m in metrics)
        row["train/failures"] = len(outcome.failures) - failures_before
        budget_stop = False
        if privacy is not None:
            privacy.account(rnd)
            row.update(privacy.metrics())
            budget_stop = rnd < int(cfg["num_rounds"]) and not privacy.affordable(rnd + 1)
            if budget_stop:
                privacy.budget_stop = True
                log.warning("round %d: privacy budget target_epsilon=%s reached (epsilon %.4g; the next round would "
                            "exceed it): evaluating, saving a checkpoint and ending the run", rnd,
                            cfg["privacy"]["target_epsilon"], privacy.epsilon())
        logger.train_round(rnd, {k: v for k, v in row.items() if k != "round"} | {"time/train_s": time.monotonic() - t0})
        if is_eval_round(rnd, cfg) or budget_stop:
            received = {}
            if strategy.client_cls.uses_eval_uploads():  # statistics of this global model from every client first
                up_ok = exchange(rnd, "eval_uploads", dispatch.evaluate_messages(rnd, arrays, uploads=True))
                if privacy is not None:
                    privacy.check_replies(up_ok, cfg["strategy"]["name"])
                received = strategy.after_eval_uploads(rnd, arrays, up_ok)
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            if strategy.frozen:
                model.load_state_dict(strategy.frozen, strict=False)
            with shared.features(model, test_x) if shared is not None else nullcontext():
                gen, gen_detail = strategy.generic_metrics(model, test_x, test_y, plan.num_classes,
                                                           int(cfg["eval"]["batch_size"]), generic_eval)
                row.update(gen)
                with torch.no_grad():
                    row.update(strategy.diagnostics(model, test_x))
                if shared is not None:  # the same records as the clients' evaluate replies, no message sent
                    ev_ok = shared.replies(rnd, model, dispatch.node_of_client, dispatch.client_states,
                                           {**strategy.round_arrays(rnd), **received})
                else:
                    ev_ok = exchange(rnd, "evaluate", dispatch.evaluate_messages(
                        rnd, arrays, received, decoupled_generic=decoupled_generic))
            if decoupled_generic:  # the clients' heads averaged, scored beside the generic predictors above
                model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
                if strategy.frozen:
                    model.load_state_dict(strategy.frozen, strict=False)
                dec, dec_detail = strategy.decoupled_metrics(model, ev_ok, test_x, test_y,
                                                             int(cfg["eval"]["batch_size"]), generic_eval)
                row.update(dec)
                gen_detail.update(dec_detail)
            pers, pers_detail = strategy.personalized_metrics(ev_ok, bool(cfg["eval"]["mask_absent_classes"]))
            row.update(pers)
            row["eval/clients"] = len(ev_ok)
            row["personalized/never_sampled"] = int(cfg["num_clients"]) - len(dispatch.ever_sampled)
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
        if ckpt.due(rnd) or stopping or budget_stop:
            ckpt.save(RunState(round=rnd, arrays=arrays.to_torch_state_dict(),
                               clients=dispatch.client_states.state_dict(), server_state=strategy.server_state(),
                               rows=outcome.rows, failures=outcome.failures, detail=outcome.detail,
                               elapsed_s=elapsed_before + time.monotonic() - t_run, rng=rng_state(),
                               privacy=privacy.state_dict() if privacy is not None else {}))
        outcome.last_round = rnd
        if stopping or budget_stop:
            break
    outcome.final_arrays = arrays
    outcome.finished = outcome.last_round == int(cfg["num_rounds"])
    if privacy is not None:
        outcome.privacy = privacy.summary()
        outcome.finished = outcome.finished or privacy.budget_stop  # a spent budget ends the run as planned
    if secure is not None:
        outcome.privacy = {**(outcome.privacy or {"mode": cfg["privacy"]["name"]}),
                           "secure_aggregation": secure.summary()}
