"""The local SGD loop every strategy uses: shuffled mini-batches from the client's cached arrays, batched
augmentation in torch, one explicit generator, and a ``step`` callback that holds the algorithm's own
update (loss, proximal terms, extra heads). Which samples an epoch draws is the run's client sampler
(``sampler=``, :mod:`fedlt.train.samplers`), carried by the client's data view (``ClientData.sampler``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from fedlt.data.augment import crop_flip, crop_flip_draws
from fedlt.data.federated import ClientData
from fedlt.train.samplers import SamplerSpec, batch_length, epoch_draw


def batch_draws(n: int, batch_size: int, epochs: int, generator: torch.Generator, padding: int = 0,
                hflip: bool = False, sampler: SamplerSpec | None = None, labels: torch.Tensor | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """Every random draw of ``epochs`` passes over ``n`` samples, batch by batch: (indices, crop row offsets, crop
    column offsets, flips). The one place that fixes the order in which a client's generator is consumed, shared
    by :func:`batches` and the vectorised trainer of ``backend.client_batching``. Each epoch first draws its
    whole index sequence (``sampler``: None = a random permutation, as always; else
    :func:`fedlt.train.samplers.epoch_draw` on the client's ``labels``), then each batch its augmentation. A
    trailing batch of one image is dropped: BatchNorm cannot train on it (the official DataLoader would crash
    there). ``sampler=episodic`` cuts the sequence into its episodes (min(ways, C) x shots <= batch_size)."""
    draw = epoch_draw(sampler, n, labels)
    size = batch_length(sampler, batch_size, labels)
    for _ in range(epochs):
        perm = draw(generator)
        m = perm.numel()
        for start in range(0, m, size):
            idx = perm[start : start + size]
            if idx.numel() < 2 and m > 1:
                continue
            yield (idx, *crop_flip_draws(idx.numel(), padding, hflip, generator))


def batches(data: ClientData, batch_size: int, epochs: int, generator: torch.Generator,
            augment: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) for ``epochs`` passes drawn by the data's sampler (``data.sampler``; None: shuffled passes),
    augmented with the plan's crop/flip."""
    plan = data.plan
    padding, hflip = (plan.augment_padding, plan.augment_hflip) if augment else (0, False)
    for idx, dy, dx, flip in batch_draws(data.num_train, batch_size, epochs, generator, padding, hflip,
                                         getattr(data, "sampler", None), data.train_y):
        x = data.normalise(data.train_x[idx])
        if padding > 0 or hflip:
            x = crop_flip(x, padding, dy, dx, flip)
        yield x, data.train_y[idx]


def sgd(params, cfg: dict) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=float(cfg["lr"]), momentum=float(cfg.get("momentum", 0.0)),
                           weight_decay=float(cfg.get("weight_decay", 0.0)))


_BLOCKED: ContextVar[str] = ContextVar("fedlt_plain_training_blocked", default="")


@contextmanager
def plain_training_blocked(reason: str):
    """While active, :func:`run_local_epochs` raises ``RuntimeError(reason)``: under ``privacy=dp_sgd`` a client's
    training must go through the DP-SGD loop (fedlt.privacy.dp_sgd), never this one."""
    token = _BLOCKED.set(reason)
    try:
        yield
    finally:
        _BLOCKED.reset(token)


def run_local_epochs(data: ClientData, epochs: int, batch_size: int, generator: torch.Generator,
                     step: Callable[[torch.Tensor, torch.Tensor], float], device: str = "cpu") -> dict[str, float]:
    """Call ``step(x, y) -> loss`` on every batch; return mean loss and step count."""
    if reason := _BLOCKED.get():
        raise RuntimeError(reason)
    total, steps, samples = 0.0, 0, 0
    for x, y in batches(data, batch_size, epochs, generator):
        total += float(step(x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
        steps += 1
        samples += len(y)
    return {"train/loss": total / max(steps, 1), "train/steps": float(steps), "train/samples": float(samples)}


def supervised_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn,
                    extra: Callable[[], torch.Tensor] | None = None) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """A plain step: loss_fn(model(x), y) (+ ``extra()``, e.g. a proximal term), backward, optimizer step."""

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        optimizer.step()
        return loss.detach().item()

    return step
