"""Client partitioners: map the long-tailed training labels to per-client index arrays.

Every partitioner is ``fn(labels, num_clients, seed, **params) -> list[np.ndarray]``: one sorted index array
per client (indices into the label array it was given), every index used exactly once -- except ``local_lt``, which
keeps each client's exact long tail and leaves the rest of the pool unused (``partition.json``:
``unassigned_train_images``). Labels are integers
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
        by_class = [chunk[chunk_labels == c].tolist() for c in range(num_classes)]
        concentration = np.repeat(alpha, m)
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
            lens = np.zeros(m, dtype=np.int64)
            for idx_c in by_class:
                p = rs.dirichlet(concentration)  # drawn for every class: keeps the reference's RNG stream
                n_c = len(idx_c)
                if n_c == 0:
                    continue
                open_ = lens < size / m
                p = p * open_
                total = p.sum()
                p = p / total if total > 0 else open_ / open_.sum()  # NaN / zero shares: uniform over open clients
                bounds = [0, *(np.cumsum(p) * n_c).astype(int)[:-1].tolist(), n_c]
                for j in range(m):
                    if bounds[j + 1] > bounds[j]:
                        group[j].extend(idx_c[bounds[j]:bounds[j + 1]])
                        lens[j] += bounds[j + 1] - bounds[j]
            smallest = int(lens.min())
        lists += group
    flat = np.asarray([i for b in lists for i in b], dtype=np.int64)
    return [np.sort(part) for part in np.array_split(flat, num_clients)]


def dirichlet_per_client(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Per-client Dirichlet over classes with equal client sizes: FedLab's "balanced Dirichlet"
    (``client_inner_dirichlet_partition``; Acar et al. 2021, FedDyn) -- flwr-datasets' ``InnerDirichletPartitioner``.

    Client sizes are ``len(labels) / N`` (differing by at most one). Each client draws class priors
    ``q_k ~ Dir(alpha * 1_C)``; then, one sample at a time, a client that still needs data is picked uniformly
    and draws a class from ``q_k``; an exhausted class gets probability zero for everyone (priors renormalised,
    as in flwr-datasets -- the same distribution as FedLab's re-draw until a class with samples left comes up).
    If every class a client still favours is exhausted (FedLab then re-draws forever, flwr-datasets fails on NaN
    probabilities), it draws uniformly from the classes left. Written here for speed (a loop over samples with
    lazily updated priors, no HF ``Dataset``); the random stream is NumPy's ``default_rng(seed)``, so splits
    match those libraries in distribution, not sample by sample.
    """
    alpha = _check_alpha(alpha, "dirichlet_per_client")
    labels = np.asarray(labels)
    n, num_classes = len(labels), _num_classes(labels)
    rng = np.random.default_rng(seed)
    sizes = [n // num_clients + (1 if k < n % num_clients else 0) for k in range(num_clients)]
    priors = rng.dirichlet([alpha] * num_classes, size=num_clients)
    pools = [rng.permutation(np.where(labels == c)[0]).tolist() for c in range(num_classes)]
    remaining = np.array([len(p) for p in pools])

    live = remaining > 0
    cum = np.zeros((num_clients, num_classes))
    row_version = np.full(num_clients, -1)
    version = 0  # bumped when a class runs out: a client's cumulative priors are recomputed when next drawn

    def row(k: int) -> np.ndarray:
        if row_version[k] != version:
            r = priors[k] * live
            cum[k] = np.cumsum(r if r.sum() > 0 else live.astype(float))  # all favoured classes gone: uniform
            row_version[k] = version
        return cum[k]

    out: list[list[int]] = [[] for _ in range(num_clients)]
    need = list(sizes)
    open_clients = [k for k in range(num_clients) if need[k] > 0]
    while open_clients:
        pos = int(rng.integers(len(open_clients)))
        k = open_clients[pos]
        r = row(k)
        # exhausted classes have zero width in ``r``, so they are never drawn
        c = min(int(np.searchsorted(r, rng.random() * r[-1], side="right")), num_classes - 1)
        remaining[c] -= 1
        out[k].append(pools[c][remaining[c]])
        if remaining[c] == 0:
            live[c] = False
            version += 1
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


# ------------------------------------------------------------------ global vs local long tails, quantity skew
ORDERINGS = ("random", "shifted", "global")
SIZE_DISTRIBUTIONS = ("lognormal", "dirichlet")


def _local_profiles(num_clients: int, num_classes: int, rng: np.random.Generator, imbalance_factor_min: float,
                    imbalance_factor_max: float, ordering: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Each client's own long tail: its imbalance factor IF_k, log-uniform in [min, max] (all equal when min ==
    max), and its class order (``random``: its own permutation; ``shifted``: client k's head is class k mod C, then
    k+1, ...; ``global``: class 0 first, as the global profile). Returns (IF_k, w) with w[k, c] = IF_k^(-rank/(C-1)),
    the exponential profile of Cao et al. (2019) with head weight 1."""
    lo, hi = float(imbalance_factor_min), float(imbalance_factor_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and 1.0 <= lo <= hi):
        raise PartitionError(f"invalid values partition.imbalance_factor_min={imbalance_factor_min!r}, "
                             f"imbalance_factor_max={imbalance_factor_max!r} for partition={name}: each client's "
                             f"imbalance factor is drawn between them, so they must be finite with 1 <= min <= max")
    if ordering not in ORDERINGS:
        raise PartitionError(f"invalid value partition.ordering={ordering!r} for partition={name}: allowed values are "
                             f"{', '.join(ORDERINGS)}")
    factors = np.exp(rng.uniform(math.log(lo), math.log(hi), size=num_clients)) if hi > lo else np.full(num_clients, lo)
    ranks = np.empty((num_clients, num_classes), dtype=np.int64)
    for k in range(num_clients):
        order = (rng.permutation(num_classes) if ordering == "random" else
                 np.roll(np.arange(num_classes), -k) if ordering == "shifted" else np.arange(num_classes))
        ranks[k, order] = np.arange(num_classes)
    weights = factors[:, None] ** (-ranks / max(num_classes - 1.0, 1.0))
    return factors, weights


def local_lt(labels: np.ndarray, num_clients: int, seed: int, imbalance_factor_min: float = 10.0,
             imbalance_factor_max: float = 100.0, ordering: str = "random") -> list[np.ndarray]:
    """Balanced global data, a long tail per client (validation requires ``dataset.imbalance_factor=1``): client k
    gets n_{k,c} = floor(m * IF_k^(-rank_k(c)/(C-1))) images of class c -- its own imbalance factor IF_k and class
    order (:func:`_local_profiles`) with a head count m common to all clients, the largest the pool allows (m =
    min_c P_c / sum_k w[k, c], P_c the pool's count of class c). So each client's realised imbalance factor is
    floor(m) / floor(m / IF_k), IF_k up to rounding; the images no client needs stay unused (with ``shifted`` and N a
    multiple of C nothing is left). Each class's images are shuffled and dealt in client order. Fails when the
    pool is too small to give every client at least one image of its tail class.

    The same idea as LongTailLib's "local long tail" generator (gzhu-hcai/LongTailLib, dataset/utils/dataset_utils.py
    ``imbalanced_split``), which uses one imbalance factor for all clients, an exponential profile over a random class
    order and a near-balanced Dirichlet pre-split; here every client has its own factor and exact counts."""
    labels = np.asarray(labels)
    c_num = _num_classes(labels)
    rng = np.random.default_rng(seed)
    factors, w = _local_profiles(num_clients, c_num, rng, imbalance_factor_min, imbalance_factor_max, ordering,
                                 "local_lt")
    pool = np.bincount(labels, minlength=c_num)
    demand = w.sum(axis=0)
    head = float(np.min(pool / demand))
    counts = np.floor(head * w).astype(np.int64)
    if counts.min() < 1:
        k = int(np.argmin(counts.min(axis=1)))
        raise PartitionError(
            f"partition=local_lt cannot give every client its long tail: the pool holds {int(pool.min())} images of "
            f"its smallest class, so with {num_clients} clients the common head count is {head:.1f} and client {k} "
            f"(imbalance factor {factors[k]:.1f}) would get no image of its tail class; lower num_clients or "
            f"partition.imbalance_factor_max, or raise dataset.n_max")
    out: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(c_num):
        idx = rng.permutation(np.where(labels == c)[0])
        bounds = np.concatenate([[0], np.cumsum(counts[:, c])])
        for k in range(num_clients):
            out[k].append(idx[bounds[k]:bounds[k + 1]])
    return [np.sort(np.concatenate(o)) for o in out]


def global_local_lt(labels: np.ndarray, num_clients: int, seed: int, imbalance_factor_min: float = 10.0,
                    imbalance_factor_max: float = 100.0, ordering: str = "random") -> list[np.ndarray]:
    """A global long tail (the dataset's profile, every image used) AND a long tail per client: each client has its
    own imbalance factor and class order (:func:`_local_profiles`), and every class c is cut over the clients in
    proportion to their weights w[k, c] (shuffled, cut at the cumulative proportions). Client k's class mix is
    therefore the global prior times its own long tail, pi_{k,c} ~ P_c * w[k, c] / sum_j w[j, c]: its realised
    imbalance factor differs from IF_k by the global profile (``partition.json``: ``client_imbalance_factors``)."""
    labels = np.asarray(labels)
    c_num = _num_classes(labels)
    rng = np.random.default_rng(seed)
    _, w = _local_profiles(num_clients, c_num, rng, imbalance_factor_min, imbalance_factor_max, ordering,
                           "global_local_lt")
    share = w / w.sum(axis=0, keepdims=True)
    out: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(c_num):
        idx = rng.permutation(np.where(labels == c)[0])
        bounds = [0, *(np.cumsum(share[:, c]) * len(idx)).astype(int)[:-1].tolist(), len(idx)]
        for k in range(num_clients):
            out[k].append(idx[bounds[k]:bounds[k + 1]])
    return [np.sort(np.concatenate(o)) for o in out]


def client_sizes(n: int, num_clients: int, rng: np.random.Generator, distribution: str, sigma: float,
                 size_alpha: float) -> np.ndarray:
    """Quantity skew: client sizes summing to n. ``lognormal`` (FedLab ``lognormal_unbalance_partition``): x_k ~
    LogNormal(log(n/N), sigma), sizes proportional to x (sigma = 0: equal sizes); ``dirichlet`` (FedLab / NIID-Bench
    "iid-diff-quantity"): proportions ~ Dir(size_alpha * 1_N). Rounded down, the remainder given one image each to
    the largest fractional parts (FedLab adds it all to the first client)."""
    if distribution == "lognormal":
        sigma = float(sigma)
        if not (math.isfinite(sigma) and sigma >= 0):
            raise PartitionError(f"invalid value partition.sigma={sigma!r} for partition=quantity_skew: the log-normal "
                                 f"spread must be a finite number >= 0 (0 = equal sizes)")
        x = rng.lognormal(mean=math.log(max(n / num_clients, 1e-12)), sigma=sigma, size=num_clients)
    elif distribution == "dirichlet":
        x = rng.dirichlet([_check_alpha(size_alpha, "quantity_skew (partition.size_alpha)")] * num_clients)
    else:
        raise PartitionError(f"invalid value partition.distribution={distribution!r} for partition=quantity_skew: "
                             f"allowed values are {', '.join(SIZE_DISTRIBUTIONS)}")
    exact = x / x.sum() * n
    sizes = np.floor(exact).astype(np.int64)
    extra = np.argsort(-(exact - sizes), kind="stable")[: n - int(sizes.sum())]
    sizes[extra] += 1
    return sizes


def quantity_skew(labels: np.ndarray, num_clients: int, seed: int, distribution: str = "lognormal",
                  sigma: float = 0.3, size_alpha: float = 0.5) -> list[np.ndarray]:
    """Quantity skew with an IID class mix (FedLab's "unbalanced IID"): client sizes from :func:`client_sizes`,
    then a seeded permutation of the pool cut at those sizes, so every client's label mix follows the global long
    tail and only the amounts differ. sigma = 0.3 is FedLab's ``unbalance_sgm`` in its tests and tutorials."""
    rng = np.random.default_rng(seed)
    sizes = client_sizes(len(labels), num_clients, rng, distribution, sigma, size_alpha)
    perm = rng.permutation(len(labels))
    return [np.sort(part) for part in np.split(perm, np.cumsum(sizes)[:-1])]


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "dirichlet": dirichlet_official,
    "dirichlet_balanced": dirichlet_balanced,
    "dirichlet_per_client": dirichlet_per_client,
    "shards": shards,
    "iid": iid,
    "local_lt": local_lt,
    "global_local_lt": global_local_lt,
    "quantity_skew": quantity_skew,
}


def regime(partition_cfg: dict, imbalance_factor: float, profile: str) -> str:
    """The global-vs-local long-tail regime of a run, in words (partition.json ``regime``, partition.png's title)."""
    name = partition_cfg.get("name")
    glob = ("natural class counts" if profile == "natural" else
            "balanced global data" if imbalance_factor == 1 else f"global long tail (IF={imbalance_factor:g})")
    lo, hi = partition_cfg.get("imbalance_factor_min"), partition_cfg.get("imbalance_factor_max")
    ifs = f"IF {lo:g}-{hi:g}" if isinstance(lo, int | float) and isinstance(hi, int | float) else "IF ?"
    if name == "local_lt":
        return f"{glob}, per-client long tails ({ifs}, {partition_cfg.get('ordering')} order)"
    if name == "global_local_lt":
        return f"{glob} and per-client long tails ({ifs}, {partition_cfg.get('ordering')} order)"
    if name == "quantity_skew":
        return f"{glob}, IID class mix, quantity skew ({partition_cfg.get('distribution')} sizes)"
    if name == "iid":
        return f"{glob}, IID split"
    return f"{glob}, {name} split"
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
