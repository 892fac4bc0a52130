"""Client partitioners: map the long-tailed training labels to per-client index arrays.

Every partitioner is ``fn(labels, num_clients, seed, **params) -> list[np.ndarray]``: one sorted index array
per client (indices into the label array it was given), every index used exactly once. Labels are integers
``0..C-1``. ``partition()`` adds the bounded ``min_samples_per_client`` re-draw guard; ``fedlt.data.flower``
wraps any of them as a flwr-datasets ``Partitioner``.

Why not flwr-datasets' own partitioners: ``DirichletPartitioner`` splits by cumulative proportions with a
resampling loop (not the official FedLoGe draw); ``IidPartitioner`` takes contiguous shards of the data as
given (on a class-sorted long-tailed set that is a pathological split, not an IID one); ``ShardPartitioner``
drops the samples that do not fill a whole shard and its shards of a class-sorted long-tailed set straddle
several tail classes; ``PathologicalPartitioner`` drops the classes no client drew; ``InnerDirichletPartitioner``
has the semantics of ``dirichlet_per_client`` but assigns sample by sample over an HF ``Dataset`` (seconds
for 12k samples, plus importing ``datasets``) and fails with NaN probabilities once every class a client
favours is exhausted. Each partitioner below says which published convention it follows.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np


class PartitionError(ValueError):
    """A partitioner could not satisfy its constraints (reported to the user, no traceback)."""


def _check_alpha(alpha: float, name: str) -> float:
    alpha = float(alpha)
    if not alpha > 0 or not math.isfinite(alpha):
        raise PartitionError(f"invalid value partition.alpha={alpha!r} for partition={name}: the Dirichlet "
                             f"concentration must be a finite number > 0 (smaller = more skewed clients)")
    return alpha


def _num_classes(labels: np.ndarray) -> int:
    return int(labels.max()) + 1 if labels.size else 0


def dirichlet_official(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Per-class Dirichlet over clients, each sample assigned independently (FedLoGe's
    ``non_iid_dirichlet_sampling``; also FL-bench and FedLab "hetero"). Client sizes are unequal.

    Written by hand because flwr-datasets' ``DirichletPartitioner`` splits by cumulative proportions with a
    resampling loop, which gives different client sizes. This reproduces the official draw order on the legacy
    ``np.random`` stream: ``seed``, one ``binomial(1, 1, (N, C))`` call (the all-ones class-eligibility matrix of
    the official code, which still consumes RNG state), then per class in label order ``dirichlet([alpha]*N)``
    followed by ``choice(N, size=n_c, p=...)``. With seed 3407 it gives the official client sizes exactly.
    """
    alpha = _check_alpha(alpha, "dirichlet")
    labels = np.asarray(labels)
    num_classes = _num_classes(labels)
    rng = np.random.RandomState(seed)  # same stream as np.random.seed(seed), without touching global state
    rng.binomial(1, 1.0, size=(num_clients, num_classes))
    owner = np.empty(len(labels), dtype=np.int64)
    clients = list(range(num_clients))
    for c in range(num_classes):
        idx = np.where(labels == c)[0]
        p = rng.dirichlet([alpha] * num_clients)
        owner[idx] = rng.choice(clients, size=len(idx), p=p.tolist())
    return [np.where(owner == k)[0] for k in range(num_clients)]


def dirichlet_balanced(labels: np.ndarray, num_clients: int, alpha: float, seed: int, group_size: int = 10,
                       max_redraws: int = 1000) -> list[np.ndarray]:
    """Grouped Dirichlet followed by equal-size rebalancing: the FedDF split (Lin et al. 2020,
    ``build_non_iid_by_dirichlet``) as used by CReFF and FedETF.

    On one ``RandomState(seed)``: shuffle all samples; cut them into ``ceil(N / group_size)`` consecutive
    chunks, one per group of ``group_size`` clients (the last chunk takes the rest); within a group, per class
    in label order draw ``p ~ Dir(alpha)`` over the group's clients, zero the share of clients already holding
    ``>= chunk / group`` samples, renormalise, and cut the class at the cumulative proportions; re-draw the
    whole group until its smallest client has at least half the group's mean size. Finally the clients' lists
    are concatenated in client order and cut into ``N`` consecutive equal parts (sizes differ by at most one),
    so every client ends up with the same amount of data but a skewed label mix.

    Differences from the reference code, all in cases where it crashes or hangs: groups smaller than
    ``group_size`` are allowed when ``N < group_size`` (the reference asserts); the re-draw loop is bounded by
    ``max_redraws`` (the reference loops forever); when every non-full client's share underflows to zero (or
    the tiny-alpha Dirichlet draw is NaN) the class is split uniformly over the non-full clients (the reference
    produces NaN cuts).
    """
    alpha = _check_alpha(alpha, "dirichlet_balanced")
    if group_size < 1:
        raise PartitionError(f"invalid value partition.group_size={group_size}: must be an integer >= 1")
    labels = np.asarray(labels)
    n, num_classes = len(labels), _num_classes(labels)
    rs = np.random.RandomState(seed)
    order = np.arange(n)
    rs.shuffle(order)  # same permutation as the reference's shuffle of its (index, label) list
    group_size = min(group_size, num_clients)
    num_groups = math.ceil(num_clients / group_size)
    lists: list[list[int]] = []
    start, left = 0, num_clients
    for g in range(num_groups):
        stop = n if g == num_groups - 1 else start + int(group_size / num_clients * n)
        chunk = order[start:stop]
        start = stop
        m = min(group_size, left)
        left -= group_size
        chunk_labels = labels[chunk]
        size = len(chunk)
        by_class = [chunk[chunk_labels == c] for c in range(num_classes)]
        smallest, tries = 0, 0
        group: list[list[int]] = [[] for _ in range(m)]
        while smallest < int(0.5 * size / m):
            if tries >= max_redraws:
                raise PartitionError(
                    f"partition=dirichlet_balanced could not give every client of group {g} at least half the "
                    f"group's mean size ({int(0.5 * size / m)} samples) in max_redraws={max_redraws} re-draws "
                    f"(alpha={alpha}, {m} clients, {size} samples); raise partition.alpha or lower num_clients")
            tries += 1
            group = [[] for _ in range(m)]
            for idx_c in by_class:
                p = rs.dirichlet(np.repeat(alpha, m))  # drawn for every class: keeps the reference's RNG stream
                if len(idx_c) == 0:
                    continue
                open_ = np.array([len(b) < size / m for b in group], dtype=float)
                p = np.nan_to_num(p) * open_
                p = p / p.sum() if p.sum() > 0 else open_ / open_.sum()
                cuts = (np.cumsum(p) * len(idx_c)).astype(int)[:-1]
                group = [b + part.tolist() for b, part in zip(group, np.split(idx_c, cuts), strict=True)]
                smallest = min(len(b) for b in group)
        lists += group
    flat = np.asarray([i for b in lists for i in b], dtype=np.int64)
    return [np.sort(part) for part in np.array_split(flat, num_clients)]


def dirichlet_per_client(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Per-client Dirichlet over classes with equal client sizes: FedLab's "balanced Dirichlet"
    (``client_inner_dirichlet_partition``; Acar et al. 2021, FedDyn) -- flwr-datasets' ``InnerDirichletPartitioner``.

    Client sizes are ``len(labels) / N`` (differing by at most one). Each client draws class priors
    ``q_k ~ Dir(alpha * 1_C)``; then, one sample at a time, a client that still needs data is picked uniformly
    and draws a class from ``q_k``; an exhausted class gets probability zero for everyone (priors renormalised,
    as in flwr-datasets; FedLab re-draws forever). If every class a client still favours is exhausted, it draws
    uniformly from the classes left. Written here for speed (a plain loop over label counts, no HF ``Dataset``).
    """
    alpha = _check_alpha(alpha, "dirichlet_per_client")
    labels = np.asarray(labels)
    n, num_classes = len(labels), _num_classes(labels)
    rng = np.random.default_rng(seed)
    sizes = [n // num_clients + (1 if k < n % num_clients else 0) for k in range(num_clients)]
    priors = rng.dirichlet([alpha] * num_classes, size=num_clients)
    pools = [rng.permutation(np.where(labels == c)[0]).tolist() for c in range(num_classes)]
    remaining = np.array([len(p) for p in pools])

    def cumulative() -> np.ndarray:
        live = (remaining > 0).astype(float)
        rows = priors * live
        rows[rows.sum(1) == 0] = live  # every favoured class exhausted: uniform over the classes left
        return np.cumsum(rows, axis=1)

    cum = cumulative()
    out: list[list[int]] = [[] for _ in range(num_clients)]
    need = list(sizes)
    open_clients = [k for k in range(num_clients) if need[k] > 0]
    while open_clients:
        pos = int(rng.integers(len(open_clients)))
        k = open_clients[pos]
        row = cum[k]
        # exhausted classes have zero width in ``row``, so they are never drawn
        c = min(int(np.searchsorted(row, rng.random() * row[-1], side="right")), num_classes - 1)
        remaining[c] -= 1
        out[k].append(pools[c][remaining[c]])
        if remaining[c] == 0:
            cum = cumulative()
        need[k] -= 1
        if need[k] == 0:
            open_clients[pos] = open_clients[-1]
            open_clients.pop()
    return [np.sort(np.asarray(o, dtype=np.int64)) for o in out]


def shards(labels: np.ndarray, num_clients: int, seed: int, classes_per_client: int = 2) -> list[np.ndarray]:
    """Pathological split: every client holds exactly ``classes_per_client`` classes (McMahan et al. 2017's
    shards, per class). Class slots are dealt from a stream of random class permutations (client ``k`` takes
    the next ``classes_per_client`` distinct classes), so every class is held by ``floor`` or ``ceil`` of
    ``N * k / C`` clients; each class's samples are shuffled and cut into equal shards, one per holder.

    Fails (instead of dropping data, as flwr-datasets' ``ShardPartitioner`` / ``PathologicalPartitioner`` do)
    when ``N * k < C`` (some class would have no holder) or a class has fewer samples than holders.
    """
    labels = np.asarray(labels)
    k = int(classes_per_client)
    present = np.unique(labels)
    c_num = len(present)
    if k < 1 or k > c_num:
        raise PartitionError(f"invalid value partition.classes_per_client={k} for partition=shards: the training set "
                             f"has {c_num} classes, so it must be between 1 and {c_num}")
    if num_clients * k < c_num:
        raise PartitionError(f"partition=shards cannot use every class: num_clients={num_clients} x classes_per_client"
                             f"={k} = {num_clients * k} class slots < {c_num} classes; raise one of them")
    rng = np.random.default_rng(seed)
    slots = np.concatenate([rng.permutation(present) for _ in range(math.ceil(num_clients * k / c_num) + 1)])
    holders: dict[int, list[int]] = {int(c): [] for c in present}
    pos = 0
    for client in range(num_clients):
        chosen: list[int] = []
        while len(chosen) < k:
            if slots[pos] in chosen:  # only at a permutation boundary: swap in the next class not yet chosen
                later = next(j for j in range(pos + 1, len(slots)) if slots[j] not in chosen)
                slots[pos], slots[later] = slots[later], slots[pos]
            chosen.append(int(slots[pos]))
            pos += 1
        for c in chosen:
            holders[c].append(client)
    out: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, hs in holders.items():
        idx = rng.permutation(np.where(labels == c)[0])
        if len(idx) < len(hs):
            raise PartitionError(
                f"partition=shards cannot give each of the {len(hs)} clients holding class {c} a sample of it: the "
                f"class has only {len(idx)} training samples; lower num_clients or partition.classes_per_client, or "
                f"the imbalance factor")
        for client, part in zip(hs, np.array_split(idx, len(hs)), strict=True):
            out[client].append(part)
    return [np.sort(np.concatenate(o)) for o in out]


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniform random split into near-equal client sizes (a seeded permutation cut into N parts; the client
    label mix follows the global long tail). Not flwr-datasets' ``IidPartitioner``: it takes contiguous
    shards without shuffling, which is not IID on class-sorted data."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "dirichlet": dirichlet_official,
    "dirichlet_balanced": dirichlet_balanced,
    "dirichlet_per_client": dirichlet_per_client,
    "shards": shards,
    "iid": iid,
}
GUARD_PARAMS = ("name", "min_samples_per_client", "max_attempts")  # partition.* keys handled by partition()


def partitioner_params(name: str) -> dict[str, object]:
    """The keyword options of partitioner ``name`` and their defaults (``inspect.Parameter.empty`` if required)."""
    sig = inspect.signature(PARTITIONERS[name])
    return {p: v.default for p, v in sig.parameters.items() if p not in ("labels", "num_clients", "seed")}


def partition(
    labels: np.ndarray,
    num_clients: int,
    name: str,
    seed: int,
    min_samples_per_client: int = 0,
    max_attempts: int = 100,
    **params,
) -> list[np.ndarray]:
    """Run partitioner ``name``; if a client gets fewer than ``min_samples_per_client`` samples, re-draw with
    the next seed, at most ``max_attempts`` times, then fail with a clear message (never loop forever).
    The first draw always uses ``seed`` itself, so the official split is reproduced when the guard is off."""
    if name not in PARTITIONERS:
        raise PartitionError(f"unknown partitioner {name!r}; allowed: {', '.join(sorted(PARTITIONERS))}")
    labels = np.asarray(labels)
    if num_clients < 1:
        raise PartitionError(f"invalid value num_clients={num_clients}: must be >= 1")
    if num_clients > len(labels):
        raise PartitionError(f"invalid value num_clients={num_clients}: the training set has only {len(labels)} "
                             f"samples, so at most {len(labels)} clients can get one")
    if labels.size and (labels.min() < 0 or not np.issubdtype(labels.dtype, np.integer)):
        raise PartitionError("partition labels must be integers 0..C-1")
    known = partitioner_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise PartitionError(f"partition={name} has no option {', '.join(unknown)}; its options are "
                             f"{', '.join(sorted([*known, *GUARD_PARAMS[1:]]))}")
    fn = PARTITIONERS[name]
    smallest = 0
    for attempt in range(max(1, max_attempts)):
        parts = fn(labels, num_clients, seed=seed + attempt, **params)
        smallest = min(len(p) for p in parts)
        if smallest >= min_samples_per_client:
            return parts
    raise PartitionError(
        f"partition={name} could not give every one of the {num_clients} clients at least "
        f"min_samples_per_client={min_samples_per_client} samples in {max_attempts} attempts (the smallest client "
        f"had {smallest}); lower min_samples_per_client or num_clients, or raise partition.alpha"
    )
