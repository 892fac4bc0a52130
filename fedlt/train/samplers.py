"""Client samplers (``sampler=NAME``, configs/sampler/): which of a client's own training samples its local
mini-batches are drawn from, epoch by epoch. Every strategy gets the run's sampler, because every local update goes
through :func:`fedlt.train.local.batches` / :func:`~fedlt.train.local.batch_draws` (and client batching draws
through the same function), which draw one epoch's index sequence here and cut it into batches as before.

Samplers (n_c: the client's training count of class c; only classes the client holds take part; C: their
number; n: the client's training size):

* ``uniform`` (default) -- a random permutation of the n samples per epoch, exactly the draws of fedlt before
  samplers existed (same calls on the same generator).
* ``ros`` -- random over-sampling (Buda et al., Neural Networks 2018: over-sampling "to the level that completely
  eliminates the imbalance" was their strongest simple fix): every class is raised to max(n_c, ceil(ratio *
  max n)) samples by adding copies drawn uniformly with replacement from that class; the set is shuffled.
* ``rus`` -- random under-sampling: every class is cut to min(n_c, max(1, floor(min n / ratio))) samples drawn
  without replacement; the set is shuffled. ``ratio`` = 1 (both): fully balanced.
* ``class_balanced`` -- every draw picks a class uniformly, then a sample of it uniformly (with replacement):
  p_c = 1 / C (Kang et al., ICLR 2020, "class-balanced sampling").
* ``sqrt`` -- p_c proportional to n_c^q with q = ``q`` (0.5: square-root sampling, Kang et al. 2020; q = 1
  instance-balanced with replacement, q = 0 class-balanced).
* ``progressive`` -- p_c = (1 - t) n_c / n + t / C with t = (round - 1) / (num_rounds - 1): instance-balanced in
  the first round, class-balanced in the last (Kang et al.'s progressively-balanced sampling with rounds in
  place of epochs; their official ``MixedPrioritizedSampler`` steps the mix linearly from 0 to 1 over the epochs,
  facebookresearch/classifier-balancing at 22370c6, data/MixedPrioritizedSampler.py). t is fixed within a round.

* ``episodic`` -- every batch is one episode: ``ways`` of the client's classes drawn uniformly without replacement
  (all C when it holds fewer), then ``shots`` samples of each (without replacement, or every sample plus draws
  with replacement when the class has fewer than ``shots``). ``shots`` null = batch_size // ways. The batch is
  the episode, min(ways, C) * shots samples (<= batch_size, checked), so a client holding fewer classes than
  ``ways`` trains on smaller batches. Kang et al.'s class-aware sampler builds its batches the same way, in
  groups of ``num_samples_cls`` = 4 samples per class (data/ClassAwareSampler.py at 22370c6); here the classes
  of an episode are distinct and drawn afresh per episode.

The epoch-length rule: an epoch draws n samples for every sampler (the same number of samples and steps as
``uniform``), unless ``epoch: resampled`` (``ros``/``rus`` only): then an epoch is one pass over the re-sampled
set (sum of the targets above: C * max n for full over-sampling, C * min n for full under-sampling);
``episodic``: as many episodes as ``uniform`` would make batches of the episode's size E from n samples
(max(1, floor((n + E - 2) / E)), i.e. ceil(n / E) with a trailing batch of one dropped), about n samples. With
``epoch: same`` ``ros`` takes the first n of its shuffled set and ``rus`` chains fresh shuffled sets up to n.
The per-draw samplers (class_balanced, sqrt, progressive) draw with replacement (one ``torch.multinomial`` per
epoch); the official class-aware sampler cycles through shuffled per-class lists instead and makes its epoch C *
max n long (data/ClassAwareSampler.py at the same commit) -- here the epoch keeps the uniform length so that
samplers compare at equal compute. As everywhere, a trailing batch of one sample is dropped.

Every draw uses the client's generator (seeded from (seed, round, client)); nothing else is random."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedlt.config import ConfigError, check_choice, check_params, param

UNIFORM = "uniform"
SAME, RESAMPLED = "same", "resampled"


@dataclass(frozen=True)
class NoOptions:
    """A sampler without options (``sampler.*`` holds only its name)."""


@dataclass(frozen=True)
class ResampleParams:
    ratio: float = param(1.0, "smallest class-size ratio min/max left after re-sampling; 1 = fully balanced",
                         lo=0.0, hi=1.0, lo_open=True)
    epoch: str = param(SAME, "epoch length: same = n draws (uniform's steps); resampled = one pass over the "
                             "re-sampled set", choices=(SAME, RESAMPLED))


@dataclass(frozen=True)
class PowerParams:
    q: float = param(0.5, "p_c proportional to n_c^q: 0.5 square-root, 1 instance-, 0 class-balanced",
                     lo=0.0, hi=1.0)


@dataclass(frozen=True)
class EpisodicParams:
    ways: int = param(4, "classes per batch (all the client's classes when it holds fewer)", lo=1)
    shots: int | None = param(None, "samples of each class per batch (>= 2); null = batch_size // ways", lo=2)


EPISODIC = "episodic"
EPISODIC_WAYS = EpisodicParams.ways  # the one default of `ways` (a config without the key gets it)
SAMPLERS: dict[str, type] = {UNIFORM: NoOptions, "ros": ResampleParams, "rus": ResampleParams,
                             "class_balanced": NoOptions, "sqrt": PowerParams, "progressive": NoOptions,
                             EPISODIC: EpisodicParams}
NEEDS_ROUND = ("progressive",)


@dataclass(frozen=True)
class SamplerSpec:
    """What a client's data view carries (``ClientData.sampler``): the sampler, its options and, for
    ``progressive``, how far the run is (t in [0, 1]). Built from the run config by :func:`sampler_spec`."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    progress: float | None = None

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)


def sampler_name(cfg: dict) -> str:
    return str((cfg.get("sampler") or {}).get("name", UNIFORM))


def sampler_spec(cfg: dict, round: int | None = None) -> SamplerSpec | None:
    """The run's sampler for a client step in ``round`` (None: ``uniform``, the draws fedlt always made).
    ``progressive`` needs the round; the others ignore it."""
    node = cfg.get("sampler") or {}
    name = sampler_name(cfg)
    if name == UNIFORM:
        return None
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    progress = None
    if name in NEEDS_ROUND:
        if round is None:
            raise ValueError(f"sampler={name} needs the round (its class mix moves over the rounds)")
        total = int(cfg["num_rounds"])
        progress = min(max((int(round) - 1) / (total - 1), 0.0), 1.0) if total > 1 else 0.0
    options = {k: v for k, v in node.items() if k != "name"}
    if name == EPISODIC:
        options = {"ways": int(options.get("ways", EPISODIC_WAYS)),
                   "shots": episodic_shots(options, int(cfg["batch_size"]))}
    return SamplerSpec(name, tuple(sorted(options.items())), progress)


def episodic_shots(options: dict, batch_size: int) -> int:
    """``shots`` of the episodic sampler (null: batch_size // ways)."""
    shots = options.get("shots")
    return int(batch_size) // int(options.get("ways", EPISODIC_WAYS)) if shots is None else int(shots)


def validate_sampler(cfg: dict) -> None:
    """Config checks for the ``sampler`` group (called by fedlt.validate): the name, then its typed options."""
    node = cfg.get("sampler")
    if node is None:  # a run directory written before samplers existed: uniform
        return
    if not isinstance(node, dict) or "name" not in node:
        raise ConfigError(f"invalid value sampler={node!r}: choose a sampler with sampler=NAME, one of "
                          f"{', '.join(SAMPLERS)}.")
    name = check_choice(cfg, "sampler.name", tuple(SAMPLERS))
    check_params(cfg, "sampler", SAMPLERS[name])
    if name == EPISODIC and cfg.get("batch_size") is not None:
        ways, bs = int(node.get("ways", EPISODIC_WAYS)), int(cfg["batch_size"])
        shots = episodic_shots(node, bs)
        if shots < 2 or ways * shots > bs:
            raise ConfigError(
                f"invalid combination sampler=episodic with sampler.ways={ways}, sampler.shots={node.get('shots')!r} "
                f"and batch_size={bs}: an episode (one batch) holds ways x shots = {ways} x {shots} = {ways * shots} "
                f"samples, which must be at most batch_size (the batch the trainers allocate) with at least 2 shots "
                f"per class (a class with one sample per batch cannot train BatchNorm); lower ways or shots, or "
                f"raise batch_size to at least {ways * max(shots, 2)}.")


# ------------------------------------------------------------------------------------------------ draws
def class_probabilities(counts: torch.Tensor, spec: SamplerSpec) -> torch.Tensor:
    """Per-draw class probabilities of the per-draw samplers (zero for classes the client does not hold)."""
    n = counts.double()
    present = n > 0
    balanced = present.double() / present.sum()
    if spec.name == "class_balanced":
        return balanced
    if spec.name == "sqrt":
        w = torch.where(present, n.pow(float(spec.option("q", 0.5))), torch.zeros_like(n))
        return w / w.sum()
    if spec.name == "progressive":
        t = float(spec.progress or 0.0)
        return (1.0 - t) * n / n.sum() + t * balanced
    raise ValueError(f"sampler {spec.name!r} has no per-draw class probabilities")


def resample_targets(counts: torch.Tensor, spec: SamplerSpec) -> torch.Tensor:
    """``ros``/``rus``: how many samples each class contributes to one re-sampled set (0 for absent classes)."""
    n = counts.long()
    present = n > 0
    ratio = float(spec.option("ratio", 1.0))
    if spec.name == "ros":
        target = torch.clamp(n, min=math.ceil(ratio * int(n.max()) - 1e-9))  # 1e-9: 0.3 * 10 is 3.0000000000000004
    elif spec.name == "rus":
        target = torch.clamp(n, max=max(1, math.floor(int(n[present].min()) / ratio + 1e-9)))
    else:
        raise ValueError(f"sampler {spec.name!r} is not a re-sampling sampler")
    return torch.where(present, target, torch.zeros_like(n))


def episode_size(counts: torch.Tensor, spec: SamplerSpec) -> int:
    """``episodic``: samples per batch, min(ways, C) * shots for a client holding C classes."""
    held = int((counts > 0).sum())
    return min(int(spec.option("ways")), max(held, 1)) * int(spec.option("shots"))


def batch_length(spec: SamplerSpec | None, batch_size: int, labels: torch.Tensor | None) -> int:
    """How many drawn samples make one batch: the episode for ``episodic``, else ``batch_size``."""
    if spec is None or spec.name != EPISODIC or labels is None or labels.numel() == 0:
        return batch_size
    return episode_size(torch.bincount(labels.long()), spec)


def episodes_per_epoch(n: int, size: int) -> int:
    """The steps ``uniform`` makes from n samples at batch ``size`` (its trailing batch of one dropped)."""
    return max(1, (n + size - 2) // size)


def episodic_draw(labels: torch.Tensor, spec: SamplerSpec) -> Callable[[torch.Generator], torch.Tensor]:
    counts = torch.bincount(labels)
    held = torch.nonzero(counts > 0).flatten()
    members = [torch.nonzero(labels == c).flatten() for c in range(len(counts))]
    ways, shots = min(int(spec.option("ways")), held.numel()), int(spec.option("shots"))
    steps = episodes_per_epoch(labels.numel(), ways * shots)

    def shots_of(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if idx.numel() >= shots:
            return idx[torch.randperm(idx.numel(), generator=g)[:shots]]
        extra = idx[torch.randint(idx.numel(), (shots - idx.numel(),), generator=g)]  # a class with < shots samples
        return torch.cat([idx[torch.randperm(idx.numel(), generator=g)], extra])

    def one_epoch(g: torch.Generator) -> torch.Tensor:
        out = []
        for _ in range(steps):
            classes = held[torch.randperm(held.numel(), generator=g)[:ways]]
            out.extend(shots_of(members[int(c)], g) for c in classes)
        return torch.cat(out)

    return one_epoch


def epoch_draw(spec: SamplerSpec | None, n: int,
               labels: torch.Tensor | None = None) -> Callable[[torch.Generator], torch.Tensor]:
    """A function ``generator -> indices`` drawing one epoch's sample sequence (indices into the client's ``n``
    training samples), to be cut into batches in order."""
    if spec is None:
        return lambda g: torch.randperm(n, generator=g)
    if labels is None or labels.numel() != n:
        raise ValueError(f"sampler={spec.name} needs the client's {n} training labels")
    labels = labels.long()
    counts = torch.bincount(labels)
    if n == 0:
        return lambda g: torch.zeros(0, dtype=torch.long)
    if spec.name == EPISODIC:
        return episodic_draw(labels, spec)
    if spec.name in ("ros", "rus"):
        targets = resample_targets(counts, spec).tolist()
        members = [torch.nonzero(labels == c).flatten() for c in range(len(counts))]
        over = spec.name == "ros"

        def one_set(g: torch.Generator) -> torch.Tensor:
            parts = []
            for idx, t in zip(members, targets, strict=True):
                if t == 0:
                    continue
                if over:
                    parts.append(idx)
                    if t > idx.numel():  # the extra copies: uniform with replacement within the class
                        parts.append(idx[torch.randint(idx.numel(), (t - idx.numel(),), generator=g)])
                else:
                    parts.append(idx[torch.randperm(idx.numel(), generator=g)[:t]])
            s = torch.cat(parts)
            return s[torch.randperm(s.numel(), generator=g)]

        if spec.option("epoch", SAME) == RESAMPLED:
            return one_set

        def same_length(g: torch.Generator) -> torch.Tensor:
            out, total = [], 0
            while total < n:
                s = one_set(g)
                out.append(s)
                total += s.numel()
            return torch.cat(out)[:n]

        return same_length
    p = class_probabilities(counts, spec)
    weights = (p / counts.double().clamp(min=1))[labels]  # per sample: its class's probability / n_c

    return lambda g: torch.multinomial(weights, n, replacement=True, generator=g)
