"""Sample-level DP inside every client: ``privacy=dp_sgd`` (DP-SGD, Abadi et al. 2016, "Deep Learning with
Differential Privacy"), the local loop that replaces :meth:`fedlt.api.client.ClientAlgorithm.local_epochs`.

One local step of client k (n_k training samples, batch size B, clipping norm C, noise multiplier sigma_k):

1. **Poisson batch**: every sample is in the batch independently with probability q_k = 1 / ceil(n_k / B),
   drawn from the client's generator; a round has local_epochs * ceil(n_k / B) steps (Opacus: ``DPDataLoader``
   sets ``sample_rate = 1 / len(data_loader)`` and its ``UniformWithReplacementSampler`` yields
   ``int(1 / sample_rate)`` batches an epoch). A batch may be empty (then the step is noise only). The
   augmentation (crop/flip) of the sampled images is drawn per sample, as in the plain loop.
2. **Per-sample gradients** of the run's loss on each sample alone, with ``torch.func``:
   ``vmap(grad(loss of functional_call(model, params, x_i)))``, ``physical_batch`` samples at a time.
3. **Clipping**: each per-sample gradient (all trained parameters as one vector) is scaled by
   min(1, C / (norm + 1e-6)) (Opacus's ``clip_and_accumulate``), so its norm is below C; the clipped gradients
   are summed.
4. **Noise**: N(0, (sigma_k * C)^2) on every entry of the sum, from a stream seeded by (seed, round, client);
   the result is divided by the EXPECTED batch size n_k * q_k (Opacus: ``scale_grad`` with
   ``loss_reduction="mean"``), whatever the batch's actual size, so one sample moves the sum by at most C.
5. The optimiser (the run's SGD: lr, momentum, weight decay) steps on this gradient; a data-independent
   ``extra`` term (FedProx's proximal term) adds its exact gradient afterwards (no privacy cost: it does not
   read the data).

Each step is the sampled Gaussian mechanism that :func:`fedlt.privacy.accounting.dp_sgd_epsilon` composes
(add/remove one of client k's samples). With ``target_epsilon`` each client's sigma_k is the smallest whose
local_epochs * ceil(n_k / B) * num_rounds steps (every round, whoever is sampled) spend at most the target.

Checked against Opacus (pytorch/opacus, commit 4d0ebc84613d214fbfd37fbfd1390e3747a625ce:
``opacus/optimizers/optimizer.py`` ``clip_and_accumulate`` / ``add_noise`` / ``scale_grad``,
``opacus/data_loader.py``, ``opacus/utils/uniform_sampler.py``, ``opacus/privacy_engine.py``); written from the
paper and those facts, not copied. Deviations: the expected batch size is the exact n_k * q_k (Opacus rounds it
down to an integer); per-sample gradients come from ``torch.func`` instead of Opacus's per-layer hooks (same
values); the noise is seeded for reproducibility (Opacus's ``secure_mode`` draws it from a secure source).

What the mechanism assumes, enforced elsewhere: no BatchNorm (it mixes the samples of a batch; ``model.norm=
group``), a loss that is a mean of per-sample terms and does not read the client's class counts, the uniform
sampler, and an algorithm whose whole local update is one ``local_epochs`` call (:mod:`fedlt.validate`). While a
client trains under ``dp_sgd`` the plain loop (:func:`fedlt.train.local.run_local_epochs`) refuses to run, and
the client step checks that exactly the accounted number of DP-SGD steps was taken (:class:`Session`)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedlt.data.augment import crop_flip, crop_flip_draws
from fedlt.privacy.accounting import calibrate_dp_sgd
from fedlt.seeding import PRIVACY, derive_seed
from fedlt.train.local import plain_training_blocked, sgd

NOISE_STREAM = 3  # key of the DP-SGD noise stream under (seed, PRIVACY, round, client, NOISE_STREAM)
STEPS_KEY = "privacy-dp-sgd-steps"  # reply metric: DP-SGD steps the client took this round
CLIP_EPS = 1e-6  # Opacus's denominator guard: factor = C / (norm + 1e-6)


# ------------------------------------------------------------------------------------------ schedule
def steps_per_epoch(n: int, batch_size: int) -> int:
    """ceil(n / B), at least 1 (Opacus's ``len(data_loader)``)."""
    return max(1, math.ceil(int(n) / int(batch_size)))


def sampling_rate(n: int, batch_size: int) -> float:
    """q = 1 / ceil(n / B): each sample's probability of being in a step's batch (1 when n <= B)."""
    return 1.0 / steps_per_epoch(n, batch_size)


def steps_per_round(n: int, cfg: dict) -> int:
    return int(cfg["local_epochs"]) * steps_per_epoch(n, int(cfg["batch_size"]))


@lru_cache(maxsize=1024)
def _calibrated(target: float, q: float, steps: int, delta: float) -> float:
    return calibrate_dp_sgd(target, q, steps, delta)


def noise_multiplier(cfg: dict, n: int) -> float:
    """sigma of a client with ``n`` training samples: ``privacy.noise_multiplier``, or with ``target_epsilon``
    the value calibrated for ALL ``num_rounds`` rounds of its steps (a pure function: the server and the client
    compute the same value)."""
    p = cfg["privacy"]
    if p.get("target_epsilon") is None:
        return float(p["noise_multiplier"])
    return _calibrated(float(p["target_epsilon"]), sampling_rate(n, int(cfg["batch_size"])),
                       steps_per_round(n, cfg) * int(cfg["num_rounds"]), float(p["delta"]))


# ------------------------------------------------------------------------------------------ session
@dataclass
class Session:
    """One client's train call under ``dp_sgd``: the DP-SGD steps it took (checked against the accountant)."""

    client_id: int
    planned: int
    steps: int = 0


_SESSION: ContextVar[Session | None] = ContextVar("fedlt_dp_sgd_session", default=None)


@contextmanager
def session(cfg: dict, client_id: int, n: int):
    """Around ``ClientAlgorithm.train`` under ``dp_sgd``: counts DP-SGD steps; the plain loop refuses to run."""
    s = Session(client_id, steps_per_round(n, cfg))
    token = _SESSION.set(s)
    try:
        with plain_training_blocked(
                f"privacy=dp_sgd: strategy={cfg['strategy']['name']} trained with the plain local loop "
                f"(fedlt.train.local.run_local_epochs), which neither clips nor noises per-sample gradients; under "
                f"dp_sgd a client's local update must go through ClientAlgorithm.local_epochs"):
            yield s
    finally:
        _SESSION.reset(token)
    if s.steps != s.planned:
        raise RuntimeError(
            f"privacy=dp_sgd: client {client_id} took {s.steps} DP-SGD steps in one round, but the accountant "
            f"assumes exactly local_epochs * ceil(n_k / batch_size) = {s.planned}; strategy="
            f"{cfg['strategy']['name']} must train with exactly one ClientAlgorithm.local_epochs call of "
            f"local_epochs epochs (its update was not sent)")


# ------------------------------------------------------------------------------------------ the mechanism
def per_sample_grads(model: nn.Module, names: list[str], fixed: dict, loss_fn, x: torch.Tensor,
                     y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample gradients {name: (b, *shape)} of ``loss_fn(model(x_i), y_i)`` w.r.t. the parameters ``names``
    (the rest of the model, ``fixed``, held constant), and the b per-sample losses."""
    params = {k: v for k, v in model.named_parameters() if k in names}

    def one(p, xi, yi):
        loss = loss_fn(functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),)), yi.unsqueeze(0))
        return loss, loss.detach()

    grads, losses = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0))(
        {k: v.detach() for k, v in params.items()}, x, y)
    return grads, losses


def clip_factors(grads: dict[str, torch.Tensor], clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: min(1, C / (norm + 1e-6)), the norm taken over all parameters together; and the norms. In
    float64, so that a clipped gradient's norm is <= C exactly (float32 rounding can overshoot C by an ulp)."""
    norms = torch.stack([g.double().reshape(g.shape[0], -1).norm(2, dim=1) for g in grads.values()],
                        dim=1).norm(2, dim=1)
    return (clip_norm / (norms + CLIP_EPS)).clamp(max=1.0), norms


def clip_and_sum(grads: dict[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """Scale every per-sample gradient by its clip factor and sum over the samples (float64)."""
    factor, _ = clip_factors(grads, clip_norm)
    return {k: torch.einsum("i,i...->...", factor, g.double()) for k, g in grads.items()}


def noised_mean(summed: torch.Tensor, sigma: float, clip_norm: float, expected: float,
                generator: torch.Generator) -> torch.Tensor:
    """(sum of clipped gradients + N(0, (sigma*C)^2)) / expected batch size, in float64."""
    noise = torch.normal(0.0, sigma * clip_norm, summed.shape, generator=generator, device=summed.device,
                         dtype=torch.float64)
    return (summed.double() + noise) / expected


def check_model(model: nn.Module) -> None:
    bn = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        raise ValueError(f"privacy=dp_sgd: the model has BatchNorm layers ({bn[:3]}), whose per-sample gradients "
                         f"are not defined (a batch's statistics mix its samples); use model.norm=group")


def train_epochs(ctx, model: nn.Module, params, loss_fn, extra=None, epochs: int | None = None) -> dict[str, float]:
    """DP-SGD local epochs on ``params`` of ``model`` (the module docstring); ``ctx`` is the client's
    :class:`fedlt.api.client.ClientContext`. Returns the plain loop's metrics (mean per-sample loss of the
    sampled examples, steps, samples)."""
    cfg, data = ctx.cfg, ctx.data
    p = cfg["privacy"]
    if getattr(data, "sampler", None) is not None:
        raise ValueError("privacy=dp_sgd draws Poisson batches; the run's sampler= must be uniform")
    check_model(model)
    s = _SESSION.get()
    n, batch = data.num_train, int(cfg["batch_size"])
    epochs = int(cfg["local_epochs"] if epochs is None else epochs)
    q, per_epoch = sampling_rate(n, batch), steps_per_epoch(n, batch)
    expected = n * q
    clip, sigma = float(p["clip_norm"]), noise_multiplier(cfg, n)
    chunk = int(p.get("physical_batch") or 0)
    trainable = {id(t) for t in params}
    names = [k for k, v in model.named_parameters() if id(v) in trainable]
    fixed = {k: v.detach() for k, v in model.named_parameters() if id(v) not in trainable}
    fixed.update({k: v for k, v in model.named_buffers()})
    named = dict(model.named_parameters())
    opt = sgd([named[k] for k in names], cfg["optimizer"])  # the run's optimiser, as the plain loop's
    device = ctx.device
    noise_gen = torch.Generator(device=device).manual_seed(
        derive_seed(int(cfg["seed"]), PRIVACY, int(ctx.round), int(data.client_id), NOISE_STREAM))
    plan = data.plan
    padding, hflip = plan.augment_padding, plan.augment_hflip
    total, steps, samples = 0.0, 0, 0
    for _ in range(epochs * per_epoch):
        idx = (torch.rand(n, generator=ctx.generator) < q).nonzero().flatten()
        dy, dx, flip = crop_flip_draws(idx.numel(), padding, hflip, ctx.generator)
        summed = {k: torch.zeros_like(named[k], dtype=torch.float64) for k in names}
        if idx.numel():
            x = data.normalise(data.train_x[idx])
            if padding > 0 or hflip:
                x = crop_flip(x, padding, dy, dx, flip)
            x, y = x.to(device), data.train_y[idx].to(device)
            step = chunk or idx.numel()
            for a in range(0, idx.numel(), step):
                g, losses = per_sample_grads(model, names, fixed, loss_fn, x[a:a + step], y[a:a + step])
                clipped = clip_and_sum(g, clip)
                for k in names:
                    summed[k] += clipped[k]
                total += float(losses.sum())
        opt.zero_grad(set_to_none=True)
        for k in names:
            named[k].grad = noised_mean(summed[k], sigma, clip, expected, noise_gen).to(named[k].dtype)
        if extra is not None:  # data-independent (e.g. a proximal term): its exact gradient, added after the noise
            extra().backward()
        opt.step()
        steps += 1
        samples += int(idx.numel())
        if s is not None:
            s.steps += 1
    return {"train/loss": total / max(samples, 1), "train/steps": float(steps), "train/samples": float(samples)}
