"""The client's half of client-level DP, called by the one client step (:func:`fedlt.core.client_step.train`)
before the reply is built.

The update is every floating-point shared array the client uploads minus what the server sent (model
parameters and BatchNorm running statistics alike: the statistics are computed from the client's data, so they
are clipped and noised with the weights rather than averaged in the clear; ``privacy.batchnorm_stats=
unprotected`` leaves floating-point buffers out of the update, sent as trained). Integer buffers (BatchNorm's batch
counter, which would reveal the client's number of batches) are replaced by the value the server sent. The
update is clipped to L2 norm C as one flat vector (Flower's ``clip_inputs_inplace``: scale by min(1, C/norm)).

* ``dp_central``: the clipped update leaves the client; the server adds the noise (:mod:`fedlt.privacy.server`).
  The reply also carries the bit "norm <= C" for adaptive clipping (the server only releases its noised sum).
* ``dp_local``: Gaussian noise of std sensitivity*sqrt(2 ln(1.25/delta))/epsilon is added to every entry of the
  clipped update on the client (Flower's ``LocalDpMod``), from a stream seeded by (seed, round, client).

* ``dp_sgd`` (sample-level DP): the update was produced by DP-SGD (:mod:`fedlt.privacy.dp_sgd`) and is sent as
  trained; only the withholding below applies.

Arrays that are not model arrays (``ctx.uploads``) are never sent under DP: they would be neither clipped nor
noised. Algorithms that declare such uploads are refused before the run (:mod:`fedlt.validate`); undeclared
ones are withheld here and the server stops the run (:meth:`fedlt.privacy.server.RunPrivacy.check_replies`)."""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord

from fedlt.privacy.params import DPSGD, LOCAL
from fedlt.seeding import PRIVACY, torch_generator

CLIP_KEY = "privacy-clip-norm"  # train-config key: the clipping norm of this round (adaptive clipping moves it)
UNCLIPPED = "privacy-unclipped"  # reply metric: 1.0 when the update's norm was <= C before clipping
WITHHELD = "privacy-withheld-uploads"  # reply metric: how many ctx.uploads arrays were not sent


def flat_norm(tensors) -> float:
    """L2 norm of the concatenation of ``tensors`` (computed in float64)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def clip_(update: dict[str, torch.Tensor], clip_norm: float) -> float:
    """Scale ``update`` in place to L2 norm at most ``clip_norm``; return its norm before clipping."""
    norm = flat_norm(update.values())
    if norm > clip_norm:
        scale = clip_norm / norm
        for v in update.values():
            v.mul_(scale)
    return norm


def local_noise_std(sensitivity: float, epsilon: float, delta: float) -> float:
    """Flower's ``LocalDpMod`` calibration of one upload: sensitivity * sqrt(2 ln(1.25/delta)) / epsilon."""
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def client_sensitivity(params: dict) -> float:
    return float(params["sensitivity"]) if params.get("sensitivity") is not None else 2 * float(params["clip_norm"])


def protect_update(cfg: dict, sent: ArrayRecord, shared: dict[str, torch.Tensor], uploads: dict, config,
                   rnd: int, cid: int, buffers=frozenset()) -> dict[str, float]:
    """Turn ``shared`` (the client's trained shared arrays, modified in place) into what may leave the client:
    sent + clipped update (+ local noise). ``buffers``: the model's buffer names (with
    ``privacy.batchnorm_stats=unprotected`` floating-point buffers are sent as trained, outside the update).
    Returns the reply metrics this adds."""
    p = cfg["privacy"]
    clip_norm = float(config[CLIP_KEY]) if CLIP_KEY in config else float(p["clip_norm"])
    start = sent.to_torch_state_dict()
    for k in [k for k in shared if k not in start]:  # not a model array the server sent: never uploaded
        uploads[k] = shared.pop(k)
    if p["name"] == DPSGD:  # sample-level DP: the update is already private (DP-SGD); only ctx.uploads stay here
        return {WITHHELD: float(len(uploads))} if uploads else {}
    unprotected = p.get("batchnorm_stats", "clip") == "unprotected"
    update = {}
    for k, v in shared.items():
        if unprotected and k in buffers and v.is_floating_point():
            continue  # averaged in the clear by the server (not covered by epsilon; the user chose so)
        if v.is_floating_point():
            update[k] = v.double() - start[k].double()
        else:
            shared[k] = start[k].clone()
    norm = clip_(update, clip_norm)
    if p["name"] == LOCAL:
        std = local_noise_std(client_sensitivity(p), float(p["epsilon"]), float(p["delta"]))
        g = torch_generator(int(cfg["seed"]), PRIVACY, rnd, cid)
        for k, u in update.items():
            u.add_(torch.normal(0.0, std, u.shape, generator=g, dtype=torch.float64))
    for k, u in update.items():
        shared[k] = (start[k].double() + u).to(shared[k].dtype)
    metrics = {} if p["name"] == LOCAL else {UNCLIPPED: float(norm <= clip_norm)}
    if uploads:
        metrics[WITHHELD] = float(len(uploads))
    return metrics
