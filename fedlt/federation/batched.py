"""``backend.client_batching``: the sampled clients of a round trained together as ONE vectorised computation.

Small models leave a GPU idle when clients train one after another (each step is a handful of tiny kernels).
Here the K clients' weights are stacked along a leading dimension and every local SGD step of all clients is a
single ``torch.func.vmap`` of ``functional_call`` + ``grad`` over that dimension, with SGD (momentum, weight
decay) applied to the stacks. What stays per client is exactly what the one-client-at-a-time loop does: each
client's mini-batches come from the same draws of the same generator (``batch_draws``: same shuffles, same
augmentation), BatchNorm normalises with that client's own batch statistics and updates that client's own
running statistics (the buffers are stacked too), and the results are that client's weights. Clients whose
data sizes differ simply train during fewer steps (the stacks are ordered and the steps laid out so that the
clients training at a step are a prefix), and short batches are padded and masked, so each step stays one call
with no host round trip.

Supported: strategies whose clients run the default local SGD (``ClientAlgorithm.train``) with ``loss=ce``,
keep no personal state, and whose server side averages with Flower's FedAvg (no custom ``aggregate_train`` /
``after_aggregate``) -- e.g. ``fedavg``. Anything else is refused with a ConfigError before Ray starts.

In the Flower path (``make_cohort_strategy``) the server sends one ``train.cohort`` message per group of sampled
clients instead of one message per client; the actor trains the group with :func:`train_cohort` and replies
with the group's sample-weighted average, which the server's FedAvg averages again by sample count: the same
weighted mean (up to float rounding) with far fewer messages.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from fedlt.data.augment import crop_flip, to_float

COHORT = "cohort"  # message type suffix: "train.cohort"


# --------------------------------------------------------------------------------------------- support
def unsupported_reasons(cfg: dict) -> list[str]:
    from fedlt.federation.algorithm import ClientAlgorithm
    from fedlt.federation.strategy import FedLTStrategy
    from strategies import get_strategy

    server_cls = get_strategy(cfg["strategy"]["name"])
    algo = server_cls.client_cls
    reasons = []
    if algo.train is not ClientAlgorithm.train:
        reasons.append("its clients run their own train() instead of the default local SGD")
    if algo.personal_prefixes:
        reasons.append("its clients keep personal model state")
    for hook in ("aggregate_train", "after_aggregate"):
        if getattr(server_cls, hook) is not getattr(FedLTStrategy, hook):
            reasons.append(f"its server overrides {hook}()")
    loss = (cfg.get("loss") or {}).get("name", "ce")
    if loss != "ce":
        reasons.append(f"loss={loss} (only ce)")
    return reasons


def check_supported(cfg: dict) -> None:
    from fedlt.config import ConfigError

    reasons = unsupported_reasons(cfg)
    if reasons:
        raise ConfigError(
            f"invalid value backend.client_batching=true for strategy={cfg['strategy']['name']}: client batching "
            f"vectorises plain local SGD of clients without personal state and averages them with FedAvg, but "
            f"{'; '.join(reasons)}. Set backend.client_batching=false (or use a plain-SGD strategy such as fedavg).")


# --------------------------------------------------------------------------------------------- trainer
class _MaskedBatchNorm:
    """While ``enabled``, the model's BatchNorm layers take their training statistics over the valid samples of
    a padded batch only (``mask``: one 0/1 weight per sample), so clients whose batch is shorter than batch_size
    (an epoch's last batch) share the vectorised call of the others. ``F.batch_norm`` has no sample mask, hence
    this re-implementation of its training branch (same formulas: biased variance to normalise, unbiased
    variance and ``momentum`` for the running statistics). Steps where every batch is full use the stock layer."""

    def __init__(self, model: torch.nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self.mask: torch.Tensor | None = None
        self.enabled = False

    def __enter__(self):
        for bn in self.layers:
            bn.forward = self._forward_of(bn)
        return self

    def __exit__(self, *exc):
        for bn in self.layers:
            del bn.forward  # back to the class's forward

    def _forward_of(self, bn):
        original = type(bn).forward.__get__(bn)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not (self.enabled and bn.training):
                return original(x)
            dims = [0, *range(2, x.dim())]
            shape = [1, -1] + [1] * (x.dim() - 2)
            m = self.mask.view([-1] + [1] * (x.dim() - 1))
            count = self.mask.sum() * (x[0, 0].numel())  # >= 2 images: batches of one are never drawn
            mean = (x * m).sum(dims) / count
            centred = x - mean.view(shape)
            var = (centred.square() * m).sum(dims) / count
            y = centred * torch.rsqrt(var + bn.eps).view(shape)
            if bn.affine:
                y = y * bn.weight.view(shape) + bn.bias.view(shape)
            if bn.track_running_stats:
                with torch.no_grad():
                    bn.num_batches_tracked.add_(1)
                    f = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.to(mean.dtype)
                    bn.running_mean.mul_(1 - f).add_(mean * f)
                    bn.running_var.mul_(1 - f).add_(var * (count / (count - 1)) * f)
            return y

        return forward


def _schedule(datas: list, generators: list, cfg: dict) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Each client's batches as index/augmentation tables of shape (steps, clients, batch_size), drawn from each
    client's generator by :func:`fedlt.train.local.batch_draws`, i.e. exactly what its one-client loop draws.

    Layout: clients (lanes) are ordered by batches per epoch, most first, and the steps form one block per
    epoch, as long as the longest client's epoch; every client runs its epoch in the LAST steps of the block.
    So at any step the clients training are a prefix of the lanes, and every short batch (an epoch's last) falls
    on a block's last step: one masked step per epoch. The total number of steps is the longest client's, as in
    any layout. Returns the lane order (client positions) and the tables; ``valid`` marks real samples."""
    from fedlt.train.local import batch_draws

    bs, epochs = int(cfg["batch_size"]), int(cfg["local_epochs"])
    plan = datas[0].plan
    padding, hflip = int(plan.augment_padding), bool(plan.augment_hflip)
    draws = [list(batch_draws(d.num_train, bs, epochs, g, padding, hflip))
             for d, g in zip(datas, generators, strict=True)]
    per_epoch = [len(d) // max(epochs, 1) for d in draws]  # batch_draws yields the same number every epoch
    order = sorted(range(len(datas)), key=lambda i: -per_epoch[i])
    block = max(per_epoch, default=0)
    steps, k = block * epochs, len(datas)
    table = {"index": torch.zeros(steps, k, bs, dtype=torch.long), "valid": torch.zeros(steps, k, bs, dtype=torch.bool),
             "dy": torch.zeros(steps, k, bs, dtype=torch.long), "dx": torch.zeros(steps, k, bs, dtype=torch.long),
             "flip": torch.zeros(steps, k, bs, dtype=torch.bool)}
    offsets = [0]
    for d in datas:
        offsets.append(offsets[-1] + d.num_train)
    for lane, i in enumerate(order):
        table["index"][:, lane, :] = offsets[i]  # padding points at a real image of the client (weight 0)
        for b, (idx, dy, dx, flip) in enumerate(draws[i]):
            s = (b // per_epoch[i]) * block + block - per_epoch[i] + b % per_epoch[i]
            nb = idx.numel()
            table["index"][s, lane, :nb] = idx + offsets[i]
            table["valid"][s, lane, :nb] = True
            for name, v in (("dy", dy), ("dx", dx), ("flip", flip)):
                if v is not None:
                    table[name][s, lane, :nb] = v
    return order, table


def train_cohort(model: torch.nn.Module, start_state: dict[str, torch.Tensor], datas: list, generators: list,
                 cfg: dict, device: str = "cpu") -> tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """Train ``len(datas)`` clients from the same ``start_state`` with local SGD, vectorised over clients.

    Every step is ONE vmapped call: the clients' images live on the device in one tensor and each step gathers
    and augments all clients' batches at once from precomputed tables (:func:`_schedule`). The clients training
    at a step are a prefix of the stacked weights, so the step runs on views of that prefix (idle clients cost
    nothing, no copies); short batches are padded and masked (:class:`_MaskedBatchNorm`, zero loss weights).
    Nothing waits for the device before the end. Returns each client's final state dict (on CPU) and metrics
    ({"train/loss", "train/steps"}), identical in meaning to ``ClientAlgorithm.train`` run once per client with
    ``model.load_state_dict(start_state)`` (equal up to float rounding)."""
    k = len(datas)
    opt = cfg["optimizer"]
    lr, momentum, wd = float(opt["lr"]), float(opt.get("momentum", 0.0)), float(opt.get("weight_decay", 0.0))
    plan = datas[0].plan
    padding, hflip = int(plan.augment_padding), bool(plan.augment_hflip)
    order, table = _schedule(datas, generators, cfg)
    total_steps, bs = table["index"].shape[0], table["index"].shape[2]
    busy = table["valid"].any(2)  # steps, lanes
    running = busy.sum(1).tolist()
    assert all(bool(busy[s, : running[s]].all()) for s in range(total_steps)), "training clients must be a prefix"
    full = [bool(table["valid"][s, : running[s]].all()) for s in range(total_steps)]
    steps_of = busy.sum(0)
    table = {n: v.to(device, non_blocking=True) for n, v in table.items()}
    images = torch.cat([d.train_x for d in datas]).to(device, non_blocking=True)
    labels = torch.cat([d.train_y for d in datas]).to(device, non_blocking=True)
    mean = torch.tensor(plan.mean, dtype=torch.float32).to(device)
    std = torch.tensor(plan.std, dtype=torch.float32).to(device)

    model = model.to(device)
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: start_state[n].to(device).unsqueeze(0).repeat(k, *[1] * start_state[n].dim()).contiguous()
              for n in trainable}
    buffers = {n: v.to(device).unsqueeze(0).repeat(k, *[1] * v.dim()).contiguous()
               for n, v in start_state.items() if n not in params}
    momenta = {n: torch.zeros_like(v) for n, v in params.items()} if momentum != 0 else {}
    masked_bn = _MaskedBatchNorm(model)

    def loss_of(p, b, x, y, w):
        masked_bn.mask = w
        logits = functional_call(model, (p, b), (x,))
        return (F.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()

    step_fn = vmap(grad_and_value(loss_of), in_dims=(0, 0, 0, 0, 0), randomness="error")
    loss_sum = torch.zeros(k, device=device)
    with masked_bn:
        for s in range(total_steps):
            a = running[s]
            if a == 0:
                continue
            index = table["index"][s, :a].reshape(-1)
            x = to_float(images[index], mean, std)
            if padding > 0 or hflip:
                x = crop_flip(x, padding, table["dy"][s, :a].reshape(-1), table["dx"][s, :a].reshape(-1),
                              table["flip"][s, :a].reshape(-1) if hflip else None)
            masked_bn.enabled = not full[s]
            p = {n: v[:a] for n, v in params.items()}  # views: in-place updates land in the stacks
            b = {n: v[:a] for n, v in buffers.items()}  # BatchNorm updates these running statistics in place
            grads, losses = step_fn(p, b, x.view(a, bs, *x.shape[1:]), labels[index].view(a, bs),
                                    table["valid"][s, :a].to(x.dtype))
            with torch.no_grad():  # torch.optim.SGD's multi-tensor arithmetic (dampening 0, no Nesterov)
                loss_sum[:a] += losses
                ps, d_p = list(p.values()), [grads[n] for n in p]
                if wd != 0:
                    d_p = torch._foreach_add(d_p, ps, alpha=wd)
                if momentum != 0:
                    bufs = [momenta[n][:a] for n in p]
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, d_p)
                    d_p = bufs
                torch._foreach_add_(ps, d_p, alpha=-lr)
    loss_sum = loss_sum.cpu()
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    metrics: list[dict[str, float]] = [{} for _ in range(k)]
    for lane, i in enumerate(order):
        for n in start_state:
            src = params[n] if n in params else buffers[n]
            states[i][n] = src[lane].detach().cpu().clone()
        steps = int(steps_of[lane])
        metrics[i] = {"train/loss": float(loss_sum[lane]) / max(steps, 1), "train/steps": float(steps)}
    return states, metrics


# ------------------------------------------------------------------------------------ Flower integration
class CohortTraining:
    """Mixin for a FedLTStrategy: one ``train.cohort`` message per group of the round's sampled clients."""

    def cohorts(self, clients: list[int]) -> list[list[int]]:
        size = int(self.cfg["backend"].get("batching_group") or 0)
        if size <= 0:
            groups = max(1, min(len(clients), _actor_count(self.cfg)))
            size = math.ceil(len(clients) / groups)
        return [clients[i : i + size] for i in range(0, len(clients), size)]

    def configure_train(self, server_round, arrays, config, grid):
        from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

        base = {**dict(config), "server-round": server_round, **self.train_config(server_round)}
        out = []
        for group in self.cohorts(self.sample_clients(server_round)):
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({**base, "cohort": list(group)})})
            if self.frozen:
                content["frozen"] = ArrayRecord(self.frozen)
            out.append(Message(content=content, dst_node_id=self.node_of_client[group[0]],
                               message_type=f"{MessageType.TRAIN}.{COHORT}"))
        return out


def make_cohort_strategy(server_cls: type) -> type:
    """``server_cls`` with cohort training (used by the ServerApp when backend.client_batching is on)."""
    return type(f"Cohort{server_cls.__name__}", (CohortTraining, server_cls), {})


def _actor_count(cfg: dict) -> int:
    """How many client actors Ray can run at once (Flower's own formula), 1 when unknown."""
    try:
        import ray

        if not ray.is_initialized():
            return 1
        b = cfg["backend"]
        total = 0
        for node in ray.nodes():
            res = node.get("Resources") or {}
            n = int(res.get("CPU", 0) / float(b["num_cpus_per_client"]))
            if float(b["num_gpus_per_client"]) > 0:
                n = min(n, int(res.get("GPU", 0) / float(b["num_gpus_per_client"])))
            total += n
        return max(total, 1)
    except Exception:  # noqa: BLE001 -- a heuristic for the group size only
        return 1


def handle_cohort(rt, msg, context):
    """The ClientApp side of a ``train.cohort`` message: train the listed clients together, reply with their
    sample-weighted average (non-finite clients left out and counted) and summed metrics."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from fedlt.federation.client_app import FROZEN, client_view
    from fedlt.federation.strategy import has_prefix
    from fedlt.seeding import TRAIN, derive_seed, torch_generator

    cfg, algo = rt.cfg, rt.algorithm
    rnd = int(msg.content["config"]["server-round"])
    cohort = [int(c) for c in msg.content["config"]["cohort"]]
    start = {k: v.detach().clone() for k, v in rt.init_state.items()}
    sources = [msg.content["frozen"]] if "frozen" in msg.content else (
        [context.state[FROZEN]] if FROZEN in context.state else [])
    for rec in [*sources, msg.content["arrays"]]:
        start.update(rec.to_torch_state_dict())
    budget = float(cfg["backend"].get("client_data_cache_mb", 512))
    datas = [client_view(rt.plan, c, budget) for c in cohort]
    gens = [torch_generator(int(cfg["seed"]), TRAIN, rnd, c) for c in cohort]
    torch.manual_seed(derive_seed(int(cfg["seed"]), TRAIN, rnd, cohort[0]))
    t0 = time.monotonic()
    states, metrics = train_cohort(rt.model, start, datas, gens, cfg, rt.device)
    shared_keys = [k for k in start if not has_prefix(k, algo.frozen_prefixes)]
    ok = [i for i, sd in enumerate(states)
          if all(torch.isfinite(sd[k]).all() for k in shared_keys if sd[k].is_floating_point())]
    weights = [datas[i].num_train for i in ok]
    total = sum(weights)
    avg = {}
    for key in shared_keys:
        if not ok:
            break
        acc = None
        for i, w in zip(ok, weights, strict=True):
            v = states[i][key]
            term = (v.double() if not v.is_floating_point() else v) * (w / total)
            acc = term if acc is None else acc + term
        avg[key] = acc
    record = {"num-examples": total, "client-id": cohort[0], "num-clients": len(ok),
              "failed-clients": len(cohort) - len(ok), "train/time_s": time.monotonic() - t0,
              "train/loss": (sum(metrics[i]["train/loss"] * w for i, w in zip(ok, weights, strict=True)) / total
                             if total else float("nan")),
              "train/steps": float(sum(metrics[i]["train/steps"] for i in ok))}
    if not ok:
        raise RuntimeError(f"every client of cohort {cohort} produced non-finite weights in round {rnd}")
    return Message(RecordDict({"arrays": ArrayRecord(avg), "metrics": MetricRecord(record)}), reply_to=msg)


# ------------------------------------------------------------------------------------------ benchmark
def updates_benchmark(cfg: dict, fractional: bool = False, repeats: int = 3) -> dict:
    """Client updates per second: the sampled clients of round 1 trained one after another (what a client
    actor does per message) vs together with :func:`train_cohort`; plus, with ``fractional``, fedlt's Flower
    path with fractional GPUs per client (on a CPU-only machine: the same run on the CPU)."""
    from fedlt.data.federated import prepare
    from fedlt.federation.algorithm import ClientContext
    from fedlt.federation.client_app import client_view, configure_torch, device_for
    from fedlt.federation.model import build_run_model
    from fedlt.seeding import INIT, TRAIN, derive_seed, torch_generator
    from strategies import get_strategy

    reasons = unsupported_reasons(cfg)
    device = device_for(cfg["backend"])
    configure_torch(cfg["backend"])
    plan, _, _ = prepare(cfg)
    server_cls = get_strategy(cfg["strategy"]["name"])
    algo = server_cls.client_cls(cfg)
    torch.manual_seed(derive_seed(int(cfg["seed"]), INIT))
    model = build_run_model(cfg, plan, server_cls.client_cls).to(device)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    clients = server_cls(cfg).sample_clients(1)
    budget = float(cfg["backend"].get("client_data_cache_mb", 512))
    datas = [client_view(plan, c, budget) for c in clients]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def sequential() -> list[dict]:
        out = []
        for c, d in zip(clients, datas, strict=True):
            model.load_state_dict(start)
            ctx = ClientContext(model=model, data=d, cfg=cfg, round=1,
                                generator=torch_generator(int(cfg["seed"]), TRAIN, 1, c), device=device)
            algo.train(ctx)
            out.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        sync()
        return out

    def batched() -> list[dict]:
        gens = [torch_generator(int(cfg["seed"]), TRAIN, 1, c) for c in clients]
        states, _ = train_cohort(model, start, datas, gens, cfg, device)
        sync()
        return states

    result: dict = {"mode": "updates", "strategy": cfg["strategy"]["name"], "dataset": cfg["dataset"]["name"],
                    "model": cfg["model"]["name"], "device": device, "clients_per_update_batch": len(clients),
                    "steps_per_client_mean": None}
    seq_times, seq_states = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        seq_states = sequential()
        seq_times.append(time.perf_counter() - t0)
    result["sequential_updates_per_s"] = round(len(clients) / min(seq_times), 3)
    if reasons:
        result["client_batching"] = "unsupported: " + "; ".join(reasons)
    else:
        bat_times, bat_states = [], None
        for _ in range(repeats + 1):  # the first call compiles vmap's batching rules: not timed
            t0 = time.perf_counter()
            bat_states = batched()
            bat_times.append(time.perf_counter() - t0)
        best = min(bat_times[1:])
        result["batched_updates_per_s"] = round(len(clients) / best, 3)
        result["batched_speedup"] = round(min(seq_times) / best, 2)
        result["max_abs_weight_diff"] = max(float((a[k].double() - b[k].double()).abs().max())
                                            for a, b in zip(seq_states, bat_states, strict=True) for k in a)
    steps = [math.ceil(d.num_train / int(cfg["batch_size"])) * int(cfg["local_epochs"]) for d in datas]
    result["steps_per_client_mean"] = round(sum(steps) / len(steps), 1)
    if fractional:
        result["fractional_gpu_run"] = _fractional_run(cfg, device)
    return result


def _fractional_run(cfg: dict, device: str) -> dict:
    """fedlt's Flower path with 4 clients per GPU (num_gpus_per_client=0.25); CPU-only: the same run on CPU."""
    import tempfile

    try:
        import ray  # noqa: F401
    except ImportError:
        return {"skipped": "ray is not installed here"}
    from fedlt.federation.simulation import run

    b = dict(cfg["backend"])
    on_gpu = device.startswith("cuda")
    b["num_gpus_per_client"] = 0.25 if on_gpu else 0.0
    if on_gpu:
        b["num_cpus_per_client"] = min(float(b["num_cpus_per_client"]), 1.0)
    run_cfg = {**cfg, "backend": b, "eval": {**cfg["eval"], "every": 0}}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedlt-gpucheck-") as d:
        res = run(run_cfg, __import__("pathlib").Path(d))
    sampled = max(int(float(cfg["participation"]) * int(cfg["num_clients"])), 1)
    return {"num_gpus_per_client": b["num_gpus_per_client"], "device": device, "wall_s": round(time.monotonic() - t0, 2),
            "rounds": res.get("rounds_completed"), "generic_accuracy": res.get("generic/accuracy"),
            "client_updates": sampled * int(res.get("rounds_completed") or 0)}
