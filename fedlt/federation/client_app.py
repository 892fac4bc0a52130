"""The Flower ClientApp: turns messages into calls of the algorithm's client side.

Per process (one Ray actor serves many clients) a :class:`ClientRuntime` is built once: the run config, the
algorithm's client object, one model with its pristine initial weights, and the memory-mapped dataset. Per
message: reset the model to its initial weights, load frozen -> global -> personal state, call the algorithm,
send back only the shared arrays; personal state goes back to the server in the reply (simulation, see
``fedlt.federation.client_state``) or stays in ``context.state``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
import sys
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlt.data.federated import ClientData, DataPlan, client_data
from fedlt.eval.predict import absent_class_mask, apply_mask, local_eval_record, predict_logits
from fedlt.federation.algorithm import ClientAlgorithm, ClientContext
from fedlt.federation.client_state import PERSONAL, STATE, server_held
from fedlt.federation.strategy import has_prefix
from fedlt.seeding import EVAL, INIT, TRAIN, derive_seed, torch_generator

FROZEN = "fedlt.frozen"


@dataclass
class ClientRuntime:
    cfg: dict
    plan: DataPlan
    algorithm: ClientAlgorithm
    model: torch.nn.Module
    init_state: dict
    device: str


_RUNTIMES: dict[str, ClientRuntime] = {}
_RUNTIME_OF_CFG: dict[int, ClientRuntime] = {}  # id(cfg) -> runtime (rt.cfg keeps cfg alive, so ids are stable)


def configure_torch(backend: dict) -> None:
    threads = int(backend.get("torch_threads") or 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if backend.get("flush_denormal", True):
        torch.set_flush_denormal(True)  # SSE-C-style small-norm heads produce denormals: 25-30 % on CPU
    if backend.get("deterministic", True) and device_for(backend).startswith("cuda"):
        deterministic_cuda()


def deterministic_cuda() -> None:
    """Deterministic cuDNN/cuBLAS kernels (README "Reliability"): measured on an H100, a ResNet-8 client update
    differs by up to 0.14 in a parameter between two identical runs with the default kernels, by 0 with these.
    Ops with no deterministic CUDA kernel (e.g. adaptive_avg_pool2d's backward) keep theirs (warn_only)."""
    import warnings

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts in this process
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")


def device_for(backend: dict) -> str:
    want = str(backend.get("device", "auto"))
    if want == "auto":
        return "cuda" if torch.cuda.is_available() and float(backend.get("num_gpus_per_client", 0)) > 0 else "cpu"
    return want


def runtime(cfg: dict, plan: DataPlan) -> ClientRuntime:
    if cfg["backend"].get("flush_denormal", True):
        # per message: the flag lives in the calling thread's FPU state, and Ray may run an actor's calls on
        # another thread than the one that built the runtime
        torch.set_flush_denormal(True)
    rt = _RUNTIME_OF_CFG.get(id(cfg))
    if rt is not None and rt.cfg is cfg and rt.plan == plan:
        return rt
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
    _RUNTIME_OF_CFG[id(rt.cfg)] = rt
    return rt


_VIEWS: OrderedDict[tuple[DataPlan, int], ClientData] = OrderedDict()
_VIEW_BYTES = 0


def client_view(plan: DataPlan, cid: int, budget_mb: float = 512) -> ClientData:
    """``client_data(plan, cid)`` kept in a per-process LRU of at most ``budget_mb`` (backend.client_data_cache_mb):
    slicing the memory-mapped arrays and normalising the local test set cost more than a small client's whole
    evaluation. Cached views are shared between messages: algorithms must not modify ``ctx.data`` in place."""
    key = (plan, cid)
    data = _VIEWS.get(key)
    if data is not None:
        _VIEWS.move_to_end(key)
        return data
    global _VIEW_BYTES
    data = client_data(plan, cid)
    if budget_mb > 0:
        _VIEWS[key] = data
        _VIEW_BYTES += _nbytes(data)
        while _VIEW_BYTES > budget_mb * 2**20 and len(_VIEWS) > 1:
            _VIEW_BYTES -= _nbytes(_VIEWS.popitem(last=False)[1])
    return data


def _nbytes(d: ClientData) -> int:
    return sum(t.element_size() * t.numel() for t in (d.train_x, d.train_y, d.test_x, d.test_y))


def _load(rt: ClientRuntime, msg: Message, context: Context) -> dict[str, torch.Tensor]:
    """Reset the model, then load frozen, global and personal state; return the extra algorithm state.
    Personal/extra state comes with the message when the server holds it (simulation, see
    fedlt.federation.client_state), else from ``context.state``."""
    model = rt.model
    model.load_state_dict(rt.init_state)
    if "frozen" in msg.content:
        context.state[FROZEN] = msg.content["frozen"]
    holder = msg.content if server_held(msg) else context.state
    sources = [context.state[FROZEN]] if FROZEN in context.state else []
    sources.append(msg.content["arrays"])
    if PERSONAL in holder:
        sources.append(holder[PERSONAL])
    for rec in sources:
        model.load_state_dict(rec.to_torch_state_dict(), strict=False)
    return holder[STATE].to_torch_state_dict() if STATE in holder else {}


def _context(rt: ClientRuntime, msg: Message, context: Context, purpose: int) -> ClientContext:
    cid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    state = dict(_load(rt, msg, context))
    torch.manual_seed(derive_seed(int(rt.cfg["seed"]), purpose, rnd, cid))  # for anything not using the generator
    data = client_view(rt.plan, cid, float(rt.cfg["backend"].get("client_data_cache_mb", 512)))
    return ClientContext(model=rt.model, data=data, cfg=rt.cfg, round=rnd,
                         generator=torch_generator(int(rt.cfg["seed"]), purpose, rnd, cid), state=state,
                         device=rt.device)


FAULT_MODES = ("raise", "oom", "exit", "nan")
FAULT_PHASES = ("train", "evaluate", "any")


def fault_modes(fi: dict) -> list:
    """``fault_injection.mode`` as a list (Hydra reads a bare ``nan`` on the command line as a float)."""
    modes = fi.get("mode", "raise")
    modes = list(modes) if isinstance(modes, (list, tuple)) else [modes]
    return ["nan" if isinstance(m, float) and m != m else m for m in modes]


def injected_fault(cfg: dict, cid: int, rnd: int, phase: str) -> str | None:
    """The fault ``fault_injection`` injects into client ``cid`` in round ``rnd`` ("train" or "evaluate"), or
    None: a pure function of (seed, round, client, phase), so it does not depend on scheduling. ``mode`` may be
    a list: each fault then draws one of them (``nan`` only for training)."""
    fi = cfg.get("fault_injection") or {}
    p = float(fi.get("probability", 0.0))
    if p <= 0 or fi.get("phase", "train") not in (phase, "any"):
        return None
    from fedlt.seeding import FAULT, numpy_rng

    keys = (FAULT, rnd, cid) if phase == "train" else (FAULT, rnd, cid, 1)
    rng = numpy_rng(int(cfg["seed"]), *keys)
    if rng.random() >= p:
        return None
    modes = fault_modes(fi)
    if phase != "train":
        modes = [m for m in modes if m != "nan"] or ["raise"]
    return str(modes[int(rng.integers(len(modes)))]) if len(modes) > 1 else str(modes[0])


def _maybe_inject_fault(rt: ClientRuntime, cid: int, rnd: int, phase: str = "train") -> str | None:
    """Act out :func:`injected_fault`. ``raise``: the client raises; ``oom``: a real allocator failure (an
    impossible allocation; nothing is allocated); ``exit``: the actor process dies mid-round (``os._exit``), as
    when the OOM killer strikes; ``nan``: returned to the caller, which poisons the update with NaN."""
    mode = injected_fault(rt.cfg, cid, rnd, phase)
    if mode is None:
        return None
    what = f"injected fault (fault_injection.mode={mode}) in client {cid}, round {rnd}, {phase}"
    if mode == "raise":
        raise RuntimeError(what)
    if mode == "oom":
        torch.empty(1 << 62, dtype=torch.uint8, device=rt.device)  # raises: can't allocate memory
    if mode == "exit":
        print(what, file=sys.stderr, flush=True)
        os._exit(70)
    return mode


class FedltClientApp(ClientApp):
    """A ClientApp that pickles by reference. Flower's Ray backend ships the app with every message; pickled
    by value that is ~8 KB of closures re-serialised per message, by reference it is the config and a token,
    and each actor process rebuilds the app once (``client_app_for``)."""

    def __init__(self, token: str, cfg: dict, plan: DataPlan):
        super().__init__()
        self.fedlt_args = (token, cfg, plan)

    def __reduce__(self):
        return (client_app_for, self.fedlt_args)


_APPS: dict[str, ClientApp] = {}


def client_app_for(token: str, cfg: dict, plan: DataPlan) -> ClientApp:
    app = _APPS.get(token)
    if app is None:
        app = _APPS[token] = make_client_app(cfg, plan)
    return app


def make_client_app(cfg: dict, plan: DataPlan) -> ClientApp:
    token = hashlib.sha256(json.dumps([cfg, list(vars(plan).values())], sort_keys=True, default=str).encode())
    app = FedltClientApp(token.hexdigest(), cfg, plan)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"client-id": cid, "pid": os.getpid()})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rt = runtime(cfg, plan)
        ctx = _context(rt, msg, context, TRAIN)
        fault = _maybe_inject_fault(rt, ctx.data.client_id, ctx.round, "train")
        metrics = rt.algorithm.train(ctx)
        algo = rt.algorithm
        sd = rt.model.state_dict()
        shared = {k: v.detach().cpu().clone() for k, v in sd.items()
                  if not has_prefix(k, algo.personal_prefixes) and not has_prefix(k, algo.frozen_prefixes)}
        shared.update({k: v.detach().cpu().clone() for k, v in ctx.uploads.items()})
        if fault == "nan":
            for v in shared.values():
                if v.is_floating_point():
                    v.fill_(math.nan)
        personal = {k: v.detach().cpu().clone() for k, v in sd.items() if has_prefix(k, algo.personal_prefixes)}
        record = {k: float(v) for k, v in metrics.items()}
        record.update({"num-examples": ctx.data.num_train, "client-id": ctx.data.client_id})
        content = RecordDict({"arrays": ArrayRecord(shared), "metrics": MetricRecord(record)})
        keep = content if server_held(msg) else context.state  # see fedlt.federation.client_state
        if personal:
            keep[PERSONAL] = ArrayRecord(personal)
        if ctx.state:
            keep[STATE] = ArrayRecord({k: v.detach().cpu().clone() for k, v in ctx.state.items()})
        return Message(content, reply_to=msg)

    @app.train("cohort")
    def train_cohort(msg: Message, context: Context) -> Message:
        """backend.client_batching: several clients trained together (fedlt.federation.batched)."""
        from fedlt.federation.batched import handle_cohort

        return handle_cohort(runtime(cfg, plan), msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        rt = runtime(cfg, plan)
        ctx = _context(rt, msg, context, EVAL)
        _maybe_inject_fault(rt, ctx.data.client_id, ctx.round, "evaluate")
        data = ctx.data
        k = rt.plan.num_classes
        mask = absent_class_mask(data.test_counts)
        record: dict = {"num-examples": int(data.test_y.numel()), "client-id": data.client_id,
                        "total": data.test_counts.tolist(), "train-total": data.train_counts.tolist()}
        for name, fn in rt.algorithm.predictors(ctx).items():
            logits = predict_logits(fn, data.test_x, int(cfg["eval"]["batch_size"]), rt.device)
            for variant, lg in (("unmasked", logits), ("masked", apply_mask(logits, mask))):
                record.update(local_eval_record(lg, data.test_y, k, f"{name}/{variant}"))
        return Message(RecordDict({"metrics": MetricRecord(record)}), reply_to=msg)

    return app
