"""The Flower ClientApp: turns messages into calls of the algorithm's client side.

Per process (one Ray actor serves many clients) a :class:`ClientRuntime` is built once: the run config, the
algorithm's client object, one model with its pristine initial weights, and the memory-mapped dataset. Per
message: reset the model to its initial weights, load frozen -> global -> personal state, call the algorithm,
send back only the shared arrays, keep personal state in ``context.state``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlt.data.federated import DataPlan, client_data
from fedlt.eval.predict import absent_class_mask, apply_mask, class_counts, predict_logits
from fedlt.federation.algorithm import ClientAlgorithm, ClientContext
from fedlt.federation.strategy import has_prefix
from fedlt.seeding import EVAL, INIT, TRAIN, derive_seed, torch_generator

PERSONAL, STATE, FROZEN = "fedlt.personal", "fedlt.state", "fedlt.frozen"


@dataclass
class ClientRuntime:
    cfg: dict
    plan: DataPlan
    algorithm: ClientAlgorithm
    model: torch.nn.Module
    init_state: dict
    device: str


_RUNTIMES: dict[str, ClientRuntime] = {}


def configure_torch(backend: dict) -> None:
    threads = int(backend.get("torch_threads") or 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if backend.get("flush_denormal", True):
        torch.set_flush_denormal(True)  # SSE-C-style small-norm heads produce denormals: 25-30 % on CPU


def device_for(backend: dict) -> str:
    want = str(backend.get("device", "auto"))
    if want == "auto":
        return "cuda" if torch.cuda.is_available() and float(backend.get("num_gpus_per_client", 0)) > 0 else "cpu"
    return want


def runtime(cfg: dict, plan: DataPlan) -> ClientRuntime:
    key = hashlib.sha256(json.dumps([cfg, plan.split_path], sort_keys=True, default=str).encode()).hexdigest()
    rt = _RUNTIMES.get(key)
    if rt is None:
        from fedlt.federation.model import build_run_model
        from strategies import get_strategy

        configure_torch(cfg["backend"])
        device = device_for(cfg["backend"])
        algo_cls = get_strategy(cfg["strategy"]["name"]).client_cls
        torch.manual_seed(derive_seed(int(cfg["seed"]), INIT))
        model = build_run_model(cfg, plan, algo_cls).to(device)
        rt = ClientRuntime(cfg, plan, algo_cls(cfg), model,
                           {k: v.detach().clone() for k, v in model.state_dict().items()}, device)
        _RUNTIMES[key] = rt
    return rt


def _load(rt: ClientRuntime, msg: Message, context: Context) -> dict[str, torch.Tensor]:
    """Reset the model, then load frozen, global and personal state; return the extra algorithm state."""
    model = rt.model
    model.load_state_dict(rt.init_state)
    if "frozen" in msg.content:
        context.state[FROZEN] = msg.content["frozen"]
    sources = [context.state[FROZEN]] if FROZEN in context.state else []
    sources.append(msg.content["arrays"])
    if PERSONAL in context.state:
        sources.append(context.state[PERSONAL])
    for rec in sources:
        model.load_state_dict(rec.to_torch_state_dict(), strict=False)
    return context.state[STATE].to_torch_state_dict() if STATE in context.state else {}


def _context(rt: ClientRuntime, msg: Message, context: Context, purpose: int) -> ClientContext:
    cid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    state = dict(_load(rt, msg, context))
    torch.manual_seed(derive_seed(int(rt.cfg["seed"]), purpose, rnd, cid))  # for anything not using the generator
    return ClientContext(model=rt.model, data=client_data(rt.plan, cid), cfg=rt.cfg, round=rnd,
                         generator=torch_generator(int(rt.cfg["seed"]), purpose, rnd, cid), state=state,
                         device=rt.device)


def _maybe_inject_fault(rt: ClientRuntime, cid: int, rnd: int) -> None:
    """``fault_injection.probability``: a seeded per-(client, round) failure, to test that runs survive it."""
    p = float((rt.cfg.get("fault_injection") or {}).get("probability", 0.0))
    if p > 0:
        from fedlt.seeding import FAULT, numpy_rng

        if numpy_rng(int(rt.cfg["seed"]), FAULT, rnd, cid).random() < p:
            raise RuntimeError(f"injected fault (fault_injection.probability={p}) in client {cid}, round {rnd}")


def make_client_app(cfg: dict, plan: DataPlan) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"client-id": cid, "pid": os.getpid()})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rt = runtime(cfg, plan)
        ctx = _context(rt, msg, context, TRAIN)
        _maybe_inject_fault(rt, ctx.data.client_id, ctx.round)
        metrics = rt.algorithm.train(ctx)
        algo = rt.algorithm
        sd = rt.model.state_dict()
        shared = {k: v.detach().cpu().clone() for k, v in sd.items()
                  if not has_prefix(k, algo.personal_prefixes) and not has_prefix(k, algo.frozen_prefixes)}
        shared.update({k: v.detach().cpu().clone() for k, v in ctx.uploads.items()})
        personal = {k: v.detach().cpu().clone() for k, v in sd.items() if has_prefix(k, algo.personal_prefixes)}
        if personal:
            context.state[PERSONAL] = ArrayRecord(personal)
        if ctx.state:
            context.state[STATE] = ArrayRecord({k: v.detach().cpu().clone() for k, v in ctx.state.items()})
        record = {k: float(v) for k, v in metrics.items()}
        record.update({"num-examples": ctx.data.num_train, "client-id": ctx.data.client_id})
        return Message(RecordDict({"arrays": ArrayRecord(shared), "metrics": MetricRecord(record)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        rt = runtime(cfg, plan)
        ctx = _context(rt, msg, context, EVAL)
        data = ctx.data
        k = rt.plan.num_classes
        mask = absent_class_mask(data.test_counts)
        record: dict = {"num-examples": int(data.test_y.numel()), "client-id": data.client_id,
                        "total": data.test_counts.tolist()}
        for name, fn in rt.algorithm.predictors(ctx).items():
            logits = predict_logits(fn, data.test_x, int(cfg["eval"]["batch_size"]), rt.device)
            for variant, lg in (("unmasked", logits), ("masked", apply_mask(logits, mask))):
                counts = class_counts(lg, data.test_y, k)
                record[f"{name}/{variant}/correct"] = counts["correct"]
                record[f"{name}/{variant}/predicted"] = counts["predicted"]
        return Message(RecordDict({"metrics": MetricRecord(record)}), reply_to=msg)

    return app
