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

Supported: strategies whose clients run the default local SGD (``ClientAlgorithm.train``, no own ``loss_fn``)
with ``loss=ce``, keep no personal state, and whose server side averages (no custom ``aggregate`` /
``after_aggregate``) -- e.g. ``fedavg``, with any client sampler except the round-dependent ``progressive``. Anything
else is refused before Ray starts (:func:`unsupported_reasons`, called by ``fedlt.validate``).

With client batching the round loop sends one ``train.cohort`` message per group of sampled clients
(:func:`cohorts`) instead of one per client; the client step (``fedlt.core.client_step.train_cohort_message``)
trains the group with :func:`train_cohort` and replies with the group's sample-weighted average, which the
server averages again by sample count: the same weighted mean (up to float rounding) with far fewer messages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from fedlt.config import ConfigError
from fedlt.data.augment import crop_flip, to_float

# --------------------------------------------------------------------------------------------- support
def unsupported_reasons(server_cls, cfg: dict) -> list[str]:
    """Why ``server_cls`` cannot be trained with client batching under ``cfg`` (empty: it can)."""
    from fedlt.api.client import ClientAlgorithm
    from fedlt.api.server import ServerAlgorithm

    algo = server_cls.client_cls
    reasons = []
    if algo.train is not ClientAlgorithm.train:
        reasons.append("its clients run their own train() instead of the default local SGD")
    if algo.loss_fn is not ClientAlgorithm.loss_fn:
        reasons.append("its clients train with their own loss_fn() (the vectorised step is plain cross-entropy)")
    if algo.personal_prefixes:
        reasons.append("its clients keep personal model state")
    for hook in ("aggregate", "after_aggregate", "round_arrays"):
        if getattr(server_cls, hook) is not getattr(ServerAlgorithm, hook):
            reasons.append(f"its server overrides {hook}()")
    loss = (cfg.get("loss") or {}).get("name", "ce")
    if loss != "ce":
        reasons.append(f"loss={loss} (only ce)")
    from fedlt.train.samplers import NEEDS_ROUND, sampler_name

    if sampler_name(cfg) in NEEDS_ROUND:  # train_cohort(round=...) takes it; the cohort message step does not pass it
        reasons.append(f"sampler={sampler_name(cfg)} moves its class mix over the rounds, and the cohort trainer "
                       f"is not told the round")
    return reasons


def check_supported(cfg: dict, server_cls) -> None:
    """Refuse ``backend.client_batching=true`` for a strategy it cannot train (one paragraph, before Ray)."""
    reasons = unsupported_reasons(server_cls, cfg)
    if reasons:
        raise ConfigError(
            f"invalid value backend.client_batching=true for strategy={cfg['strategy']['name']}: client batching "
            f"vectorises plain local SGD of clients without personal state and averages them with FedAvg, but "
            f"{'; '.join(reasons)}. Set backend.client_batching=false (or use a plain-SGD strategy such as "
            f"fedavg).")


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


def train_cohort(model: torch.nn.Module, start_state: dict[str, torch.Tensor], datas: list, generators: list,
                 cfg: dict, device: str = "cpu",
                 round: int | None = None) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """Train ``len(datas)`` clients from the same ``start_state`` with local SGD, vectorised over clients.

    Every step is ONE vmapped call: the clients' images live on the device in one tensor and each step gathers
    and augments all clients' batches at once from precomputed tables (:func:`_schedule`). The clients training
    at a step are a prefix of the stacked weights, so the step runs on views of that prefix (idle clients cost
    nothing, no copies); short batches are padded and masked (:class:`_MaskedBatchNorm`, zero loss weights).
    Nothing waits for the device before the end. Returns each client's final state dict (on CPU) and metrics
    ({"train/loss", "train/steps"}), identical in meaning to ``ClientAlgorithm.train`` run once per client with
    ``model.load_state_dict(start_state)`` (equal up to float rounding). ``round``: the server round, needed only
    by round-dependent samplers (``sampler=progressive``)."""
    k = len(datas)
    opt = cfg["optimizer"]
    lr, momentum, wd = float(opt["lr"]), float(opt.get("momentum", 0.0)), float(opt.get("weight_decay", 0.0))
    plan = datas[0].plan
    padding, hflip = int(plan.augment_padding), bool(plan.augment_hflip)
    order, table = _schedule(datas, generators, cfg, round)
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


# ------------------------------------------------------------------------------------------ groups
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
