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

What a client does per batch is its algorithm's batched hooks (``fedlt.api.client.ClientAlgorithm``:
``batched_loss`` -- one client's batch as a pure function returning the objective whose gradient each parameter
group steps with --, ``batched_groups`` -- the SGD settings of each parameter group, ``batched_terms`` -- the
client's own loss tensors, e.g. ``loss=`` parameters from its class counts, stacked over clients --, and
``batched_begin`` / ``batched_end`` around it; ``batched_grads`` maps a client's gradients to what its SGD
steps with, e.g. clipping; ``batched_memory`` / ``batched_accumulate`` keep per-client running tensors across its
steps, e.g. a gradient sum). The defaults are plain local SGD with ``loss=`` (every loss of ``fedlt.train.losses``
has a vectorised form). Frozen arrays are loaded and never trained or uploaded; personal
arrays are stacked per client, loaded from and saved back to each client's own server-held records; the reply
carries only shared arrays. Strategies that override ``train`` or ``loss_fn`` without declaring a batched form
(``batched_ready = True`` in the overriding class) are refused before Ray starts (:func:`unsupported_reasons`,
called by ``fedlt.validate``), naming the method. A cohort message carries the server's ``round_arrays`` (each
client's ``ctx.received``). Servers with their own ``aggregate`` / ``after_aggregate`` get every client's own reply
(:func:`needs_client_replies`), with its ``ctx.uploads`` (a cohort whose clients upload anything while the server
takes the group's average stops with an error: such a server must aggregate by itself).

With client batching the round loop sends one ``train.cohort`` message per group of sampled clients
(:func:`cohorts`) instead of one per client; the client step (``fedlt.core.client_step.train_cohort_message``)
trains the group with :func:`train_cohort` and replies with the group's sample-weighted average, which the
server averages again by sample count: the same weighted mean (up to float rounding) with far fewer messages.
For a server that aggregates by itself, the reply carries each client's shared arrays and metrics instead, and
the round loop unpacks them into one reply per client (:func:`client_replies`)."""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, grad_and_value, vmap

from fedlt.api.client import MEMORY, RANDOM
from fedlt.config import ConfigError
from fedlt.data.augment import crop_flip, to_float

# --------------------------------------------------------------------------------------------- support
def _owner(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO whose own body defines ``name``."""
    return next(c for c in cls.__mro__ if name in c.__dict__)


def unsupported_reasons(server_cls, cfg: dict) -> list[str]:
    """Why ``server_cls`` cannot be trained with client batching under ``cfg`` (empty: it can)."""
    from fedlt.train.losses import loss_terms

    algo = server_cls.client_cls
    reasons = []
    for method in ("train", "loss_fn"):
        owner = _owner(algo, method)
        if not owner.__dict__.get("batched_ready", False):
            why = owner.__dict__.get("batched_refusal", "")
            reasons.append(f"its clients run their own {method}() ({owner.__name__}.{method}) with no batched form "
                           + (f"because it {why}" if why else
                              f"(the ClientAlgorithm.batched_* hooks, declared by batched_ready = True in "
                              f"{owner.__name__})"))
    loss = dict(cfg.get("loss") or {"name": "ce"})
    try:
        loss_terms(loss, counts=torch.ones(2), round=1, num_rounds=1)
    except ValueError:
        reasons.append(f"loss={loss.get('name')} has no vectorised form (fedlt.train.losses.loss_terms)")
    return reasons


def check_supported(cfg: dict, server_cls) -> None:
    """Refuse ``backend.client_batching=true`` for a strategy it cannot train (one paragraph, before Ray)."""
    reasons = unsupported_reasons(server_cls, cfg)
    if reasons:
        raise ConfigError(
            f"invalid value backend.client_batching=true for strategy={cfg['strategy']['name']}: client batching "
            f"trains a round's clients as one vectorised computation of their batched local update and replies "
            f"with the group's average, but {'; '.join(reasons)}. Set backend.client_batching=false (or use a "
            f"strategy it supports, e.g. fedavg or fedloge).")


# --------------------------------------------------------------------------------------------- trainer
class _MaskedBatchNorm:
    """While ``enabled``, the model's BatchNorm layers take their training statistics over the valid samples of
    a padded batch only (``mask``: one 0/1 weight per sample), so clients whose batch is shorter than batch_size
    (an epoch's last batch) share the vectorised call of the others. ``F.batch_norm`` has no sample mask, hence
    this re-implementation of its training branch (same formulas: biased variance to normalise, unbiased
    variance and ``momentum`` for the running statistics). Steps where every batch is full use the stock layer.
    Under bf16 autocast (``backend.batched_autocast``) every BatchNorm runs in float32, as its statistics do."""

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
            dtype = x.dtype  # bf16 under backend.batched_autocast: BatchNorm runs in float32, as its statistics
            if dtype in (torch.bfloat16, torch.float16):
                x = x.float()
            if not (self.enabled and bn.training):
                return original(x).to(dtype)
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
            return y.to(dtype)

        return forward


def _schedule(datas: list, generators: list, cfg: dict,
              round: int | None = None) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Each client's batches as index/augmentation tables of shape (steps, clients, batch_size), drawn from each
    client's generator by :func:`fedlt.train.local.batch_draws` with the run's sampler (``sampler=``; ``round``
    only for the samplers that need it), i.e. exactly what its one-client loop draws.

    Layout: clients (lanes) are ordered by batches per epoch, most first, and the steps form one block per
    epoch, as long as the longest client's epoch; every client runs its epoch in the LAST steps of the block.
    So at any step the clients training are a prefix of the lanes, and every short batch (an epoch's last) falls
    on a block's last step: one masked step per epoch. The total number of steps is the longest client's, as in
    any layout. Returns the lane order (client positions) and the tables; ``valid`` marks real samples."""
    from fedlt.train.local import batch_draws
    from fedlt.train.samplers import sampler_spec

    bs, epochs = int(cfg["batch_size"]), int(cfg["local_epochs"])
    plan = datas[0].plan
    padding, hflip = int(plan.augment_padding), bool(plan.augment_hflip)
    spec = sampler_spec(cfg, round)
    draws = [list(batch_draws(d.num_train, bs, epochs, g, padding, hflip, spec, d.train_y))
             for d, g in zip(datas, generators, strict=True)]
    # batch_draws yields the same number every epoch (every sampler's epoch length depends only on the counts)
    per_epoch = [len(d) // max(epochs, 1) for d in draws]
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


class _Objective(torch.nn.Module):
    """``algorithm.batched_loss(model, ...)`` as a module, so that ``functional_call`` runs it with one client's
    parameters and buffers swapped into ``model`` (keys prefixed ``model.``)."""

    def __init__(self, model: torch.nn.Module, algorithm):
        super().__init__()
        self.model = model
        self.algorithm = algorithm  # not a module: no state of its own

    def forward(self, x, y, w, terms):
        return self.algorithm.batched_loss(self.model, x, y, w, terms)


def _stack(states: list[dict[str, torch.Tensor]], keys: list[str], order: list[int], device) -> dict:
    """Per-key stacks over the lanes (clients in ``order``); one client's tensors repeated when all are the same
    objects (a shared start state)."""
    out = {}
    for n in keys:
        first = states[order[0]][n]
        if all(states[i][n] is first for i in order):
            v = first.to(device)
            out[n] = v.unsqueeze(0).repeat(len(order), *[1] * v.dim()).contiguous()
        else:
            out[n] = torch.stack([states[i][n].to(device) for i in order]).contiguous()
    return out


def train_cohort(model: torch.nn.Module, start_state, datas: list, generators: list, cfg: dict,
                 device: str = "cpu", round: int | None = None, algorithm=None,
                 terms: list[dict[str, torch.Tensor]] | None = None,
                 memory: list[dict[str, torch.Tensor]] | None = None,
                 groups: list[tuple[tuple[str, ...], dict]] | None = None,
                 random: list[tuple[torch.Generator, tuple[int, ...]] | None] | None = None
                 ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """Train ``len(datas)`` clients with their local update, vectorised over clients.

    ``start_state``: one state dict every client starts from, or one per client (personal state differs).
    ``algorithm``: the strategy's client (default: plain :class:`fedlt.api.client.ClientAlgorithm`); its
    batched hooks define the step: ``batched_loss`` (one client's batch -> objective and metrics),
    ``batched_groups`` (the parameter groups and their SGD settings) and the per-client loss tensors ``terms``
    (default: ``algorithm.batched_terms`` of a context on each client's data); ``batched_grads`` maps each
    client's gradients to what its SGD steps with; ``memory``: each client's ``batched_memory`` (running
    tensors, replaced at each of its steps by ``batched_accumulate``), updated in place to the final values.
    ``groups``: the parameter groups of this call (one phase of ``batched_phases``; default ``batched_groups``).
    ``random``: per client, ``batched_random``'s (generator, shape) or None: at each of the client's steps, in
    order, one ``torch.rand(shape)`` from its generator reaches ``batched_loss`` as ``terms[RANDOM]``.

    Every step is ONE vmapped call: the clients' images live on the device in one tensor and each step gathers
    and augments all clients' batches at once from precomputed tables (:func:`_schedule`). The clients training
    at a step are a prefix of the stacked weights, so the step runs on views of that prefix (idle clients cost
    nothing, no copies); short batches are padded and masked (:class:`_MaskedBatchNorm`, zero loss weights).
    Nothing waits for the device before the end. Returns each client's final state dict (on CPU) and metrics
    (the hook's metrics averaged over the client's steps, "train/steps", "train/samples"), identical in meaning
    to the algorithm's ``train`` run once per client from its start state (equal up to float rounding).
    ``round``: the server round (round-dependent samplers, ``sampler=progressive``; loss schedules)."""
    from fedlt.api.client import ClientAlgorithm, ClientContext

    k = len(datas)
    algorithm = algorithm if algorithm is not None else ClientAlgorithm(cfg)
    starts = start_state if isinstance(start_state, list) else [start_state] * k
    if terms is None:
        terms = [algorithm.batched_terms(ClientContext(model=model, data=d, cfg=cfg, round=int(round or 1),
                                                       generator=g, device=device))
                 for d, g in zip(datas, generators, strict=True)]
    plan = datas[0].plan
    padding, hflip = int(plan.augment_padding), bool(plan.augment_hflip)
    order, table = _schedule(datas, generators, cfg, round)
    total_steps, bs = table["index"].shape[0], table["index"].shape[2]
    busy = table["valid"].any(2)  # steps, lanes
    running = busy.sum(1).tolist()
    assert all(bool(busy[s, : running[s]].all()) for s in range(total_steps)), "training clients must be a prefix"
    full = [bool(table["valid"][s, : running[s]].all()) for s in range(total_steps)]
    steps_of = busy.sum(0)
    draws = None  # batched_random: each client's draws at its own steps, drawn in step order (as train draws them)
    if random is not None and any(r is not None for r in random):
        shape = next(r[1] for r in random if r is not None)
        draws = torch.zeros(total_steps, k, *shape)
        for lane, i in enumerate(order):
            if random[i] is not None:
                for step in busy[:, lane].nonzero().flatten().tolist():
                    draws[step, lane] = torch.rand(shape, generator=random[i][0])
        draws = draws.to(device)
    samples_of = table["valid"].sum((0, 2))
    table = {n: v.to(device, non_blocking=True) for n, v in table.items()}
    images = torch.cat([d.train_x for d in datas]).to(device, non_blocking=True)
    labels = torch.cat([d.train_y for d in datas]).to(device, non_blocking=True)
    mean = torch.tensor(plan.mean, dtype=torch.float32).to(device)
    std = torch.tensor(plan.std, dtype=torch.float32).to(device)

    model = model.to(device)
    model.train()
    # parameter groups: each trainable parameter in the first group whose prefixes match (() = every one);
    # one in no group is not trained (no optimizer holds it) and travels with the buffers
    declared = algorithm.batched_groups(model, cfg) if groups is None else groups
    groups = []
    for prefixes, opt in declared:
        groups.append(([], float(opt["lr"]), float(opt.get("momentum", 0.0)), float(opt.get("weight_decay", 0.0)),
                       tuple(prefixes)))
    for n, p in model.named_parameters():
        if p.requires_grad:
            for g in groups:
                if not g[4] or n.startswith(g[4]):
                    g[0].append(n)
                    break
    trainable = [n for g in groups for n in g[0]]
    keys = list(starts[0])
    params = _stack(starts, trainable, order, device)
    buffers = _stack(starts, [n for n in keys if n not in params], order, device)
    term_stack = {n: torch.stack([terms[i][n].to(device) for i in order]) for n in terms[order[0]]}
    momenta = {n: torch.zeros_like(params[n]) for g in groups if g[2] != 0 for n in g[0]}
    masked_bn = _MaskedBatchNorm(model)
    objective = _Objective(model, algorithm)

    def loss_of(p, b, x, y, w, t):
        masked_bn.mask = w
        state = {f"model.{n}": v for n, v in p.items()}
        state.update({f"model.{n}": v for n, v in b.items()})
        loss, metrics = functional_call(objective, state, (x, y, w, t))
        return loss, {"train/loss": loss, **metrics}

    objective_grad = grad_and_value(loss_of, has_aux=True)
    accumulate = bool(memory) and bool(memory[order[0]])
    mem_stack = ({n: torch.stack([memory[i][n].to(device) for i in order]).contiguous() for n in memory[order[0]]}
                 if accumulate else {})
    transform = type(algorithm).batched_grads is not ClientAlgorithm.batched_grads
    collect = accumulate and type(algorithm).batched_collect is not ClientAlgorithm.batched_collect
    block = total_steps // max(int(cfg["local_epochs"]), 1)  # steps per epoch (every client's epoch e in block e)
    epoch_of = torch.arange(max(int(cfg["local_epochs"]), 1), device=device)  # views per step: no host copy
    if not (accumulate or transform):
        plain = vmap(objective_grad, in_dims=(0, 0, 0, 0, 0, 0), randomness="error")

        def step_fn(p, b, x, y, w, t, m, epoch):
            return (*plain(p, b, x, y, w, t), m)
    else:  # the algorithm's per-client running sums and gradient transform, inside the same vmapped call

        def step_of(p, b, x, y, w, t, m, epoch):
            if collect:  # the running memory is part of what the loss sees
                t = {**t, **{MEMORY + n: v for n, v in m.items()}}
            grads, aux = objective_grad(p, b, x, y, w, t)
            if accumulate:
                m = algorithm.batched_accumulate(m, grads, p, t)
            if collect:
                m = algorithm.batched_collect(m, aux[1], epoch, t)
            if transform:
                grads = algorithm.batched_grads(grads, p, t)
            return grads, aux, m

        step_fn = vmap(step_of, in_dims=(0, 0, 0, 0, 0, 0, 0, None), randomness="error")
    # backend.batched_autocast=bf16: the step's forward and backward under bfloat16 autocast (tensor cores on a
    # GPU); weights, optimizer arithmetic and BatchNorm statistics stay float32
    bf16 = str((cfg.get("backend") or {}).get("batched_autocast") or "none") == "bf16"
    sums: dict[str, torch.Tensor] = {}
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
            t = {n: v[:a] for n, v in term_stack.items()}
            if draws is not None:
                t[RANDOM] = draws[s, :a]
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                grads, (_, metrics), m = step_fn(p, b, x.view(a, bs, *x.shape[1:]), labels[index].view(a, bs),
                                                 table["valid"][s, :a].to(x.dtype), t,
                                                 {n: v[:a] for n, v in mem_stack.items()},
                                                 epoch_of[s // max(block, 1)])
            with torch.no_grad():  # torch.optim.SGD's multi-tensor arithmetic (dampening 0, no Nesterov)
                for name, v in m.items() if accumulate else ():
                    mem_stack[name][:a].copy_(v)
                for name, v in metrics.items():
                    if v.dim() != 1:  # one scalar per client is averaged; other outputs are batched_collect's
                        continue
                    if name not in sums:
                        sums[name] = torch.zeros(k, device=device, dtype=torch.promote_types(v.dtype, torch.float32))
                    sums[name][:a] += v.detach()
                for names, lr, momentum, wd, _ in groups:
                    if not names:
                        continue
                    ps, d_p = [p[n] for n in names], [grads[n] for n in names]
                    if wd != 0:
                        d_p = torch._foreach_add(d_p, ps, alpha=wd)
                    if momentum != 0:
                        bufs = [momenta[n][:a] for n in names]
                        torch._foreach_mul_(bufs, momentum)
                        torch._foreach_add_(bufs, d_p)
                        d_p = bufs
                    torch._foreach_add_(ps, d_p, alpha=-lr)
    sums = {n: v.cpu() for n, v in sums.items()}
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    metrics: list[dict[str, float]] = [{} for _ in range(k)]
    for lane, i in enumerate(order):
        for n in keys:
            src = params[n] if n in params else buffers[n]
            states[i][n] = src[lane].detach().cpu().clone()
        steps = int(steps_of[lane])
        metrics[i] = {n: float(v[lane]) / max(steps, 1) for n, v in sums.items()}
        metrics[i].update({"train/steps": float(steps), "train/samples": float(samples_of[lane])})
        if accumulate:
            memory[i].update({n: v[lane].detach().cpu().clone() for n, v in mem_stack.items()})
    return states, metrics


# ------------------------------------------------------------------------------------------ groups
CLIENT_REPLIES = "cohort-client-replies"  # train.cohort config flag: reply with every client's own arrays


def needs_client_replies(server_cls) -> bool:
    """Does the server need each client's own reply (its own ``aggregate`` / ``after_aggregate``)? Then a cohort
    reply carries every client's shared arrays and metrics (:func:`client_record_names`) instead of the group's
    average, and the round loop unpacks them (:func:`client_replies`) into the replies the one-client-per-message
    path would have received."""
    from fedlt.api.server import ServerAlgorithm

    return any(getattr(server_cls, hook) is not getattr(ServerAlgorithm, hook)
               for hook in ("aggregate", "after_aggregate"))


def client_record_names(client: int) -> tuple[str, str]:
    """The (arrays, metrics) record names of one client's reply inside a cohort reply."""
    return f"arrays/{client}", f"metrics/{client}"


def client_replies(replies: list) -> list:
    """Replace each cohort reply that carries per-client records by one reply per client ("arrays", "metrics"),
    in client order, as the one-client-per-message path would have received them."""
    from flwr.app import Message, RecordDict

    out = []
    for r in replies:
        clients = sorted(int(k.partition("/")[2]) for k in r.content.keys() if k.startswith("metrics/"))
        if not clients:
            out.append(r)
            continue
        for c in clients:
            arrays, metrics = client_record_names(c)
            out.append(Message(RecordDict({"arrays": r.content[arrays], "metrics": r.content[metrics]}),
                               reply_to=r))
    return out


def cohorts(clients: list[int], cfg: dict, actors: int) -> list[list[int]]:
    """The round's sampled clients in groups of ``backend.batching_group`` (0: one group per actor)."""
    size = int(cfg["backend"].get("batching_group") or 0)
    if size <= 0:
        size = max(1, math.ceil(len(clients) / max(1, min(len(clients), actors))))  # >= 1: a Poisson round may be empty
    return [clients[i : i + size] for i in range(0, len(clients), size)]


def average_states(states: list[dict[str, torch.Tensor]], weights: list[int], keys: list[str]) -> dict:
    """Sample-weighted average of the listed keys (integer buffers averaged in float64)."""
    total = sum(weights)
    avg = {}
    for key in keys:
        acc = None
        for sd, w in zip(states, weights, strict=True):
            v = sd[key]
            term = (v.double() if not v.is_floating_point() else v) * (w / total)
            acc = term if acc is None else acc + term
        avg[key] = acc
    return avg
