"""The one client step: what a client does with one message, whoever delivers it.

Every path runs this code: the Flower ClientApp on Ray actors (``fedlt.flower.client_app`` only registers
:func:`handle` for Flower's message types), client batching (``train.cohort`` messages, :mod:`fedlt.core.cohort`),
and the in-process grid (:mod:`fedlt.core.inprocess`) that the tests and ``fedlt-bench``'s reference run use.

Per process (one Ray actor serves many clients) a :class:`ClientRuntime` is built once: the run config, the
algorithm's client object, one model with its pristine initial weights, and the memory-mapped dataset. Per
message: reset the model to its initial weights, load frozen -> global -> personal state, call the algorithm,
send back only the shared arrays (:meth:`ClientAlgorithm.is_shared`); personal state goes back to the server in
the reply (simulation, see :mod:`fedlt.core.client_state`) or stays in ``context.state``. With ``privacy.secagg``
the train reply carries only the masked, quantized update instead, and ``train.secagg`` messages run the other
SecAgg+ stages (:mod:`fedlt.privacy.secagg`; the client's secrets stay in ``context.state``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedlt.api.client import PHASE, ClientAlgorithm, ClientContext
from fedlt.core import personalize
from fedlt.core.client_state import PERSONAL, STATE, cohort_key, server_held
from fedlt.core.cohort import CLIENT_REPLIES, average_states, client_record_names, train_cohort
from fedlt.core.faults import act_out_fault
from fedlt.core.model import build_run_model
from fedlt.data.federated import ClientData, DataPlan, client_data
from fedlt.eval.posthoc import with_prior_correction
from fedlt.eval.predict import client_eval_record, predict_logits
from fedlt.privacy import CENTRAL, DPSGD
from fedlt.privacy import enabled as privacy_enabled
from fedlt.privacy import mode as privacy_mode
from fedlt.privacy import secagg
from fedlt.privacy.clipping import UNCLIPPED, WITHHELD, protect_update
from fedlt.seeding import EVAL, INIT, TRAIN, derive_seed, torch_generator
from fedlt.train.decoupled import decoupled_predictors, generic_uploads
from fedlt.train.samplers import sampler_spec

FROZEN = "fedlt.frozen"  # context.state record holding the frozen arrays a client received once
COHORT = "cohort"  # message type suffix of client batching: "train.cohort"
RECEIVED = "fedlt.received"  # message record of ServerAlgorithm.round_arrays (the client's ctx.received)
EVAL_UPLOADS = "eval-uploads"  # evaluate-message config flag: reply with ClientAlgorithm.eval_uploads, score nothing
DECOUPLED_GENERIC = "decoupled-generic"  # evaluate-message config flag: also reply with the generic cRT/LWS heads


# ------------------------------------------------------------------------------------ torch settings
def device_for(backend: dict) -> str:
    want = str(backend.get("device", "auto"))
    if want == "auto":
        return "cuda" if torch.cuda.is_available() and float(backend.get("num_gpus_per_client", 0)) > 0 else "cpu"
    return want


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


# ------------------------------------------------------------------------------------------ runtime
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


def runtime(cfg: dict, plan: DataPlan, client_cls: type[ClientAlgorithm]) -> ClientRuntime:
    """This process's runtime for (cfg, plan), built on first use."""
    if cfg["backend"].get("flush_denormal", True):
        # per message: the flag lives in the calling thread's FPU state, and Ray may run an actor's calls on
        # another thread than the one that built the runtime
        torch.set_flush_denormal(True)
    rt = _RUNTIME_OF_CFG.get(id(cfg))
    if rt is not None and rt.cfg is cfg and rt.plan == plan and type(rt.algorithm) is client_cls:
        return rt
    key = hashlib.sha256(json.dumps([cfg, plan.split_path, client_cls.__qualname__], sort_keys=True,
                                    default=str).encode()).hexdigest()
    rt = _RUNTIMES.get(key)
    if rt is None:
        configure_torch(cfg["backend"])
        device = device_for(cfg["backend"])
        torch.manual_seed(derive_seed(int(cfg["seed"]), INIT))
        model = build_run_model(cfg, plan, client_cls).to(device)
        rt = ClientRuntime(cfg, plan, client_cls(cfg), model,
                           {k: v.detach().clone() for k, v in model.state_dict().items()}, device)
        _RUNTIMES[key] = rt
    _RUNTIME_OF_CFG[id(rt.cfg)] = rt
    return rt


_VIEWS: OrderedDict[tuple[DataPlan, int], ClientData] = OrderedDict()
_VIEW_BYTES = 0


def client_view(plan: DataPlan, cid: int, budget_mb: float = 64) -> ClientData:
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


def view_of(rt: ClientRuntime, cid: int) -> ClientData:
    return client_view(rt.plan, cid, float(rt.cfg["backend"].get("client_data_cache_mb", 64)))


# ------------------------------------------------------------------------------------ the client step
def start_state(rt: ClientRuntime, msg: Message, context: Context) -> list[ArrayRecord]:
    """The records a client's model is loaded from, in order: frozen (received once, then kept in
    ``context.state``), then the global arrays. Personal state is the caller's (it is per client)."""
    if "frozen" in msg.content:
        context.state[FROZEN] = msg.content["frozen"]
    sources = [context.state[FROZEN]] if FROZEN in context.state else []
    sources.append(msg.content["arrays"])
    return sources


def with_sampler(data: ClientData, cfg: dict, rnd: int) -> ClientData:
    """The client's data with the run's ``sampler=`` attached (how every local batch is drawn; a shallow copy
    of the cached view, whose tensors algorithms must not modify)."""
    sampler = sampler_spec(cfg, rnd)
    return data if sampler is None else dataclasses.replace(data, sampler=sampler)


def predictors_of(algo: ClientAlgorithm, ctx: ClientContext) -> dict:
    """The personalized predictors a client is scored with: the algorithm's own (the first is primary), the
    prior-corrected primary (``eval.posthoc``), the shared fine-tuning (``personalization.*``) for methods
    without a personalization step of their own, and the heads re-trained on the client's frozen features
    (``eval.decoupled``: crt, lws, fsmote) -- the same additions for every method."""
    predictors = with_prior_correction(algo.predictors(ctx), ctx.data.train_counts, ctx.cfg)
    if personalize.applies(type(algo), ctx.cfg):
        predictors["finetuned"] = personalize.finetuned(algo, ctx)
    predictors.update(decoupled_predictors(ctx.model, ctx.data, ctx.cfg, ctx.round, ctx.device))  # eval.decoupled
    return predictors


def load_client(rt: ClientRuntime, msg: Message, context: Context, purpose: int) -> ClientContext:
    """Reset the model, load frozen -> global -> personal state, seed, and return the algorithm's context.
    Personal/extra state comes with the message when the server holds it (simulation), else from
    ``context.state``."""
    cid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    model = rt.model
    model.load_state_dict(rt.init_state)
    holder = msg.content if server_held(msg) else context.state
    sources = start_state(rt, msg, context)
    if PERSONAL in holder:
        sources.append(holder[PERSONAL])
    for rec in sources:
        model.load_state_dict(rec.to_torch_state_dict(), strict=False)
    state = dict(holder[STATE].to_torch_state_dict()) if STATE in holder else {}
    seed = int(rt.cfg["seed"])
    torch.manual_seed(derive_seed(seed, purpose, rnd, cid))  # for anything not using the generator
    received = msg.content[RECEIVED].to_torch_state_dict() if RECEIVED in msg.content else {}
    return ClientContext(model=model, data=with_sampler(view_of(rt, cid), rt.cfg, rnd), cfg=rt.cfg, round=rnd,
                         generator=torch_generator(seed, purpose, rnd, cid), state=state, device=rt.device,
                         received=received)


def train(rt: ClientRuntime, msg: Message, context: Context) -> Message:
    """One client's local update: the reply carries its shared arrays (plus the algorithm's ``uploads``) and
    metrics; its personal arrays and extra state go back to the server (server-held) or stay in the context."""
    ctx = load_client(rt, msg, context, TRAIN)
    fault = act_out_fault(rt.cfg, ctx.data.client_id, ctx.round, "train", rt.device)
    if privacy_mode(rt.cfg) == DPSGD:  # sample-level DP: every local step is a counted DP-SGD step
        from fedlt.privacy.dp_sgd import session

        with session(rt.cfg, ctx.data.client_id, ctx.data.num_train):
            metrics = rt.algorithm.train(ctx)
    else:
        metrics = rt.algorithm.train(ctx)
    algo = rt.algorithm
    sd = rt.model.state_dict()
    shared = {k: v.detach().cpu().clone() for k, v in sd.items() if algo.is_shared(k)}
    uploads = {k: v.detach().cpu().clone() for k, v in ctx.uploads.items()}
    protected = {}
    if privacy_enabled(rt.cfg):  # client-level DP: clip (and noise) the update; uploads never leave the client
        protected = protect_update(rt.cfg, msg.content["arrays"], shared, uploads, msg.content["config"],
                                   ctx.round, ctx.data.client_id, {k for k, _ in rt.model.named_buffers()})
    else:
        shared.update(uploads)
    if fault == "nan":
        for v in shared.values():
            if v.is_floating_point():
                v.fill_(math.nan)
    if secagg.SECAGG in msg.content:  # secure aggregation: only the masked, quantized update leaves the client
        shared = {secagg.MASKED: torch.from_numpy(secagg.masked_upload(
            context.state, msg.content[secagg.SECAGG], msg.content["arrays"], shared, ctx.data.num_train,
            protected.pop(UNCLIPPED, None), int(rt.cfg["seed"]), ctx.data.client_id))}
    personal = {k: v.detach().cpu().clone() for k, v in sd.items() if algo.is_personal(k)}
    record = {k: float(v) for k, v in metrics.items()}
    record.update({"num-examples": ctx.data.num_train, "client-id": ctx.data.client_id, **protected})
    content = RecordDict({"arrays": ArrayRecord(shared), "metrics": MetricRecord(record)})
    keep = content if server_held(msg) else context.state  # see fedlt.core.client_state
    if personal:
        keep[PERSONAL] = ArrayRecord(personal)
    if ctx.state:
        keep[STATE] = ArrayRecord({k: v.detach().cpu().clone() for k, v in ctx.state.items()})
    return Message(content, reply_to=msg)


def evaluate(rt: ClientRuntime, msg: Message, context: Context) -> Message:
    """Every personalized predictor of the client on its local test set, masked and unmasked."""
    ctx = load_client(rt, msg, context, EVAL)
    act_out_fault(rt.cfg, ctx.data.client_id, ctx.round, "evaluate", rt.device)
    if msg.content["config"].get(EVAL_UPLOADS):
        return eval_uploads(rt, ctx, msg)
    data = ctx.data
    content = RecordDict()
    if msg.content["config"].get(DECOUPLED_GENERIC):  # eval.decoupled's generic cRT/LWS, from the global model
        heads = generic_uploads(ctx.model, data, rt.cfg, ctx.round, rt.device)  # before any predictor runs
        content["arrays"] = ArrayRecord({k: v.detach().cpu().clone() for k, v in heads.items()})
    batch = int(rt.cfg["eval"]["batch_size"])
    logits = ((name, predict_logits(fn, data.test_x, batch, rt.device))
              for name, fn in predictors_of(rt.algorithm, ctx).items())
    content["metrics"] = MetricRecord(client_eval_record(data.client_id, data.test_y, data.test_counts,
                                                         data.train_counts, rt.plan.num_classes, logits))
    return Message(content, reply_to=msg)


def eval_uploads(rt: ClientRuntime, ctx: ClientContext, msg: Message) -> Message:
    """The eval-uploads pass of an evaluation round: the algorithm's ``eval_uploads(ctx)`` on the received global
    model, nothing scored. Under client-level DP they are withheld (never protected; such algorithms are refused
    before the run, and the server stops on a reply that counts withheld arrays)."""
    uploads = {k: v.detach().cpu().clone() for k, v in rt.algorithm.eval_uploads(ctx).items()}
    record = {"num-examples": ctx.data.num_train, "client-id": ctx.data.client_id}
    if privacy_enabled(rt.cfg) and uploads:
        record[WITHHELD] = float(len(uploads))
        uploads = {}
    return Message(RecordDict({"arrays": ArrayRecord(uploads), "metrics": MetricRecord(record)}), reply_to=msg)


def train_cohort_message(rt: ClientRuntime, msg: Message, context: Context) -> Message:
    """Client batching: the clients listed in the message trained together (:func:`fedlt.core.cohort.train_cohort`
    with the algorithm's batched hooks). Each client starts as :func:`train` starts it (frozen -> global ->
    its own personal state, then ``batched_begin``) and ends as :func:`train` ends it (``batched_end``; its
    personal arrays and extra state go back under its own record names, :func:`fedlt.core.client_state.cohort_key`).
    The reply is the group's sample-weighted average of the shared arrays (non-finite clients left out, counted,
    and their state left unchanged) and summed metrics, one reply standing for the whole group."""
    cfg, seed, algo = rt.cfg, int(rt.cfg["seed"]), rt.algorithm
    rnd = int(msg.content["config"]["server-round"])
    group = [int(c) for c in msg.content["config"]["cohort"]]
    held = server_held(msg)
    if not held and type(algo).personal_prefixes:
        raise RuntimeError("client batching of a strategy with per-client state needs the state held by the server "
                           "(fedlt.core.client_state): a cohort node cannot hold other clients' state")
    base = {k: v.detach().clone() for k, v in rt.init_state.items()}
    for rec in start_state(rt, msg, context):
        base.update(rec.to_torch_state_dict())
    datas = [with_sampler(view_of(rt, c), cfg, rnd) for c in group]
    gens = [torch_generator(seed, TRAIN, rnd, c) for c in group]
    torch.manual_seed(derive_seed(seed, TRAIN, rnd, group[0]))
    t0 = time.monotonic()
    records = [(msg.content[cohort_key(PERSONAL, c)].to_torch_state_dict()
                if held and cohort_key(PERSONAL, c) in msg.content else {},
                dict(msg.content[cohort_key(STATE, c)].to_torch_state_dict())
                if held and cohort_key(STATE, c) in msg.content else {}) for c in group]
    received = msg.content[RECEIVED].to_torch_state_dict() if RECEIVED in msg.content else {}
    uploads: list[dict] = []
    states, extra, metrics = train_group(algo, rt.model, base, records, datas, gens, cfg, rnd, rt.device,
                                         received=received, uploads=uploads)
    if any(uploads) and not msg.content["config"].get(CLIENT_REPLIES):
        raise RuntimeError("client batching: the clients uploaded arrays besides the model (ctx.uploads), which only "
                           "a server with its own aggregate() receives (one reply per client)")
    if not held and any(extra):
        raise RuntimeError("client batching of a strategy that keeps extra client state (ctx.state) needs the state "
                           "held by the server (fedlt.core.client_state)")
    shared_keys = [k for k in base if algo.is_shared(k)]
    content = RecordDict()
    for c, sd, state in zip(group, states, extra, strict=True):
        if not held or not all(torch.isfinite(sd[k]).all() for k in shared_keys if sd[k].is_floating_point()):
            continue  # a non-finite client is dropped below, its state unchanged
        personal = {k: v for k, v in sd.items() if algo.is_personal(k)}
        if personal:
            content[cohort_key(PERSONAL, c)] = ArrayRecord(personal)
        if state:
            content[cohort_key(STATE, c)] = ArrayRecord(state)
    ok = [i for i, sd in enumerate(states)
          if all(torch.isfinite(sd[k]).all() for k in shared_keys if sd[k].is_floating_point())]
    if not ok:
        raise RuntimeError(f"every client of cohort {group} produced non-finite weights in round {rnd}")
    weights = [datas[i].num_train for i in ok]
    total = sum(weights)
    record = {"num-examples": total, "client-id": group[0], "num-clients": len(ok),
              "failed-clients": len(group) - len(ok), "train/time_s": time.monotonic() - t0}
    for key in metrics[ok[0]]:  # means over the clients weighted as train/loss is in the round's row; counts summed
        if key in ("train/steps", "train/samples"):
            record[key] = float(sum(metrics[i][key] for i in ok))
        else:
            record[key] = sum(metrics[i][key] * w for i, w in zip(ok, weights, strict=True)) / total
    if msg.content["config"].get(CLIENT_REPLIES):  # the server aggregates by itself: every client's own reply
        content["metrics"] = MetricRecord(record)  # the first metric record: the round loop's client_of
        sent, config = msg.content["arrays"], msg.content["config"]
        buffers = {k for k, _ in rt.model.named_buffers()}
        for i in ok:
            shared = {k: states[i][k] for k in shared_keys}
            rec = {**metrics[i], "num-examples": datas[i].num_train, "client-id": group[i]}
            if privacy_enabled(cfg):  # as train() protects it: clipped (dp_local: noised) with this client's id
                rec.update(protect_update(cfg, sent, shared, uploads[i], config, rnd, group[i], buffers))
            else:  # as train() sends them: the algorithm's uploads beside the shared arrays
                shared.update(uploads[i])
            arrays_name, metrics_name = client_record_names(group[i])
            content[arrays_name], content[metrics_name] = ArrayRecord(shared), MetricRecord(rec)
        return Message(content, reply_to=msg)
    if privacy_enabled(cfg):  # client-level DP: every client's update is protected before the group's reply
        avg, protected = protected_cohort(rt, msg, [states[i] for i in ok], [group[i] for i in ok], weights,
                                          shared_keys)
        record.update(protected)
    else:
        avg = average_states([states[i] for i in ok], weights, shared_keys)
    content["arrays"] = ArrayRecord(avg)
    content["metrics"] = MetricRecord(record)
    return Message(content, reply_to=msg)


def train_group(algo: ClientAlgorithm, model: torch.nn.Module, base: dict, records: list[tuple[dict, dict]],
                datas: list, gens: list, cfg: dict, rnd: int, device: str, received: dict | None = None,
                uploads: list | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """The clients of a cohort from the shared start state ``base`` (initial -> frozen -> global) and each one's
    (personal arrays, extra state) ``records``, as :func:`train` runs each of them: load its personal arrays,
    ``batched_begin``, then ONE vectorised update of all (:func:`fedlt.core.cohort.train_cohort`; one per phase of
    ``batched_phases``), then per client
    ``batched_end`` on its trained state. ``received``: the round's arrays from the server (every client's
    ``ctx.received``). Returns each client's final state dict and extra state (CPU copies) and its metrics; each
    client's ``ctx.uploads`` are appended to ``uploads`` when given."""
    model.load_state_dict(base)  # once: per client only the personal keys change (batched_begin's contract)
    base_personal = {k: v for k, v in base.items() if algo.is_personal(k)}
    starts, terms, ctxs = [], [], []
    for data, gen, (personal, state) in zip(datas, gens, records, strict=True):
        if base_personal:
            model.load_state_dict({**base_personal, **personal}, strict=False)
        ctx = ClientContext(model=model, data=data, cfg=cfg, round=rnd, generator=gen, state=dict(state),
                            device=device, received=dict(received or {}))
        algo.batched_begin(ctx)
        sd = model.state_dict()
        starts.append({k: sd[k].detach().clone() if k in base_personal else base[k] for k in base})
        terms.append(algo.batched_terms(ctx))
        ctx.memory = algo.batched_memory(ctx)
        ctxs.append(ctx)
    random = [algo.batched_random(ctx) for ctx in ctxs]
    phases = []  # the algorithm's phases one after another (fresh SGD state each), the generators continuing
    states = starts
    plan = algo.batched_phases(model, cfg)
    for i, (epochs, groups) in enumerate(plan):
        states = [algo.batched_phase_start(ctx, i, start, previous)
                  for ctx, start, previous in zip(ctxs, starts, states, strict=True)]
        phase_terms = terms if len(plan) == 1 else [{**t, PHASE: torch.tensor(float(i))} for t in terms]
        states, metrics = train_cohort(model, states, datas, gens, {**cfg, "local_epochs": int(epochs)}, device,
                                       round=rnd, algorithm=algo, terms=phase_terms,
                                       memory=[ctx.memory for ctx in ctxs], groups=groups, random=random)
        phases.append(metrics)
    metrics = [algo.batched_metrics([phase[i] for phase in phases]) for i in range(len(datas))]
    ends = type(algo).batched_end is not ClientAlgorithm.batched_end
    extra = []
    for i, ctx in enumerate(ctxs):
        if ends:
            model.load_state_dict(states[i])
            algo.batched_end(ctx)
            states[i] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        extra.append({k: v.detach().cpu().clone() for k, v in ctx.state.items()})
        if uploads is not None:
            uploads.append({k: v.detach().cpu().clone() for k, v in ctx.uploads.items()})
    return states, extra, metrics


def protected_cohort(rt: ClientRuntime, msg: Message, states: list[dict], clients: list[int], weights: list[int],
                     shared_keys: list[str]) -> tuple[dict, dict]:
    """Client batching under client-level DP: each client's update is protected exactly as :func:`train` protects
    it (``protect_update`` with that client's id: the same clipping and, under dp_local, the same seeded noise).
    dp_local: the reply is the sample-weighted average of the protected states, what the server would compute
    from the clients' own replies. dp_central: the reply is sent + the SUM of the clipped updates, with the sum
    of the clients' "norm <= C" bits; the server counts it as ``num-clients`` clients
    (:meth:`fedlt.privacy.server.RunPrivacy.noised_replies`). Returns (arrays, reply metrics)."""
    cfg, sent, config = rt.cfg, msg.content["arrays"], msg.content["config"]
    buffers = {k for k, _ in rt.model.named_buffers()}
    protected, metrics = [], {}
    for sd, cid in zip(states, clients, strict=True):
        shared = {k: sd[k] for k in shared_keys}
        for key, value in protect_update(cfg, sent, shared, {}, config, int(config["server-round"]), cid,
                                         buffers).items():
            metrics[key] = metrics.get(key, 0.0) + value  # UNCLIPPED: the sum of the bits; WITHHELD: a count
        protected.append(shared)
    if privacy_mode(cfg) != CENTRAL:
        return average_states(protected, weights, list(protected[0])), metrics
    start = sent.to_torch_state_dict()
    unprotected = cfg["privacy"].get("batchnorm_stats", "clip") == "unprotected"
    out = {}
    for k in protected[0]:
        v = start[k]
        if not v.is_floating_point():
            out[k] = v.clone()  # protect_update sends back what the server sent
        elif unprotected and k in buffers:  # released in the clear as the mean over clients (README Privacy)
            out[k] = (sum(p[k].double() for p in protected) / len(protected)).to(v.dtype)
        else:
            out[k] = (v.double() + sum(p[k].double() - v.double() for p in protected)).to(v.dtype)
    return out, metrics


def secagg_stage(msg: Message, context: Context) -> Message:
    """A secure-aggregation stage other than training (setup, share keys, unmask; :mod:`fedlt.privacy.secagg`):
    the client's secrets stay in its ``context.state``."""
    cid = int(context.node_config["partition-id"])
    return Message(secagg.client_stage(msg.content, context.state, cid), reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """Which client this node is (the server samples by client id, not node id)."""
    cid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"client-id": cid, "pid": os.getpid()})}), reply_to=msg)


def handle(rt: ClientRuntime, msg: Message, context: Context) -> Message:
    """Dispatch one message by its type (the in-process grid's entry; the ClientApp registers each type)."""
    kind = msg.metadata.message_type
    if kind == MessageType.QUERY:
        return query(msg, context)
    if kind == MessageType.TRAIN:
        return train(rt, msg, context)
    if kind == f"{MessageType.TRAIN}.{COHORT}":
        return train_cohort_message(rt, msg, context)
    if kind == secagg.STAGE_MESSAGE:
        return secagg_stage(msg, context)
    if kind == MessageType.EVALUATE:
        return evaluate(rt, msg, context)
    raise ValueError(f"fedlt client: unknown message type {kind!r}")
