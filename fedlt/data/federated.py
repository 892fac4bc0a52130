"""The federated dataset of a run: prepared once on the driver, opened once per client actor.

``prepare`` loads the source, applies the long-tail profile, partitions the long-tailed training set over the
clients and draws the local test sets. The split (index arrays only) is cached under
``<cache_dir>/splits/<hash>.npz``, keyed by everything it depends on; a damaged split file (truncated, missing
arrays) is drawn again (the draw is seeded: the new file holds the same split). Client actors receive a small,
picklable :class:`DataPlan` and open the memory-mapped source arrays and the split once per process
(``client_data``); a file damaged after ``prepare`` is a DataError there that names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlt.data.augment import to_float
from fedlt.data.local_testsets import holdout_local_tests, local_test_overlap, proportional_local_tests
from fedlt.data.longtail import IF_CONVENTION, longtail_counts, select_longtail
from fedlt.data.noise import flip_labels, head_tail, noise_config, noise_report
from fedlt.data.partition import GUARD_PARAMS, partition
from fedlt.data.sources import (DataError, SourceArrays, cache_lock, cache_write_error, discard, load_source,
                                open_cached_source, remove_stale_temps, temp_name)
from fedlt.seeding import SERVER_SET, numpy_rng

log = logging.getLogger("fedlt")


@dataclass(frozen=True)
class DataPlan:
    """Everything a client process needs to open its data view (paths, not arrays)."""

    source_name: str
    source_cache: str
    split_path: str
    mean: tuple
    std: tuple
    num_classes: int
    num_clients: int
    augment_padding: int
    augment_hflip: bool
    label_suffix: str = ""  # "_coarse": CIFAR-100 superclass labels stored beside the images
    local_test_split: str = "test"  # which source split the local test indices point into ("train" for holdout)


@dataclass
class FederatedSplit:
    lt_indices: np.ndarray  # indices of the long-tailed training set into the source training split
    client_train: list[np.ndarray]  # per client: indices into the source training split
    client_test: list[np.ndarray]  # per client: indices into the source test split
    class_counts: np.ndarray  # clients x classes training counts (what clients train on)
    global_counts: np.ndarray  # classes: long-tailed training counts (the profile, before any holdout)
    local_test_split: str = "test"  # "test": local tests drawn from the test split; "train": held out (holdout)
    # dataset.label_noise on: per client, the labels it trains on (aligned with client_train; clean ones stay in the
    # source arrays); None = clean labels (every split drawn without noise, and those written before it existed)
    noisy_labels: list[np.ndarray] | None = None
    # the server-held balanced set (``server_data.per_class``): indices into the source training split, drawn from
    # the long-tailed set before the partition (so no client holds them); empty = no server set
    server_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def save(self, path: Path) -> None:
        """Write to a temporary name beside ``path`` and rename it into place (readers never see half a file;
        permissions from the umask, like any other file). Call it holding the split's :func:`cache_lock`."""
        tmp = path.with_name(temp_name(path.stem, ".npz"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            arrays = {"lt_indices": self.lt_indices, "class_counts": self.class_counts,
                      "global_counts": self.global_counts, "local_test_split": np.array(self.local_test_split)}
            if len(self.server_indices):  # absent when off: the file of a run without a server set is unchanged
                arrays["server_indices"] = self.server_indices
            for k, (tr, te) in enumerate(zip(self.client_train, self.client_test, strict=True)):
                arrays[f"train_{k}"] = tr
                arrays[f"test_{k}"] = te
            for k, y in enumerate(self.noisy_labels or []):
                arrays[f"noisy_{k}"] = y
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except OSError as e:
            raise cache_write_error(e, path.parent, "the drawn splits") from e
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> "FederatedSplit":
        """Read a saved split; a damaged file (truncated, missing arrays, inconsistent) is a DataError that says
        what is wrong and to delete it (``prepare`` draws a damaged split again by itself)."""
        path = Path(path)
        try:
            with np.load(path) as z:
                n = int(z["class_counts"].shape[0])
                split = cls(
                    lt_indices=z["lt_indices"], class_counts=z["class_counts"], global_counts=z["global_counts"],
                    client_train=[z[f"train_{k}"] for k in range(n)], client_test=[z[f"test_{k}"] for k in range(n)],
                    local_test_split=str(z["local_test_split"]) if "local_test_split" in z.files else "test",
                    noisy_labels=[z[f"noisy_{k}"] for k in range(n)] if "noisy_0" in z.files else None,
                    server_indices=(z["server_indices"] if "server_indices" in z.files
                                    else np.zeros(0, dtype=np.int64)),
                )
        except FileNotFoundError as e:
            raise DataError(f"the split file {path} is missing; run again (fedlt draws it again)") from e
        except (OSError, ValueError, KeyError, EOFError, IndexError, zipfile.BadZipFile, zlib.error) as e:
            what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise DataError(f"the split file {path} is damaged ({what}); delete {path} and run again (fedlt draws "
                            f"the same split again)") from e
        problem = split.problem()
        if problem:
            raise DataError(f"the split file {path} is damaged ({problem}); delete {path} and run again (fedlt draws "
                            f"the same split again)")
        return split

    def problem(self) -> str | None:
        """Why the arrays do not form a split (None when they do)."""
        n = len(self.client_train)
        if self.class_counts.ndim != 2 or self.class_counts.shape[0] != n:
            return f"class_counts has shape {list(self.class_counts.shape)} for {n} clients"
        if self.global_counts.shape != (self.class_counts.shape[1],):
            return f"global_counts has shape {list(self.global_counts.shape)} for {self.class_counts.shape[1]} classes"
        arrays = [self.lt_indices, *self.client_train, *self.client_test, self.server_indices]
        if any(a.ndim != 1 or a.dtype.kind not in "iu" for a in arrays):
            return "an index array is not a list of integers"
        if self.local_test_split not in ("test", "train"):
            return f"local_test_split is {self.local_test_split!r}"
        if self.noisy_labels is not None and (len(self.noisy_labels) != n or any(
                y.ndim != 1 or y.dtype.kind not in "iu" or y.shape != t.shape
                for y, t in zip(self.noisy_labels, self.client_train, strict=False))):
            return "the noisy label arrays do not match the clients' training indices"
        return None


SPLIT_VERSION = 2  # part of the split cache key: bump when the way a split is drawn changes
SOURCE_ONLY_KEYS = ("augment", "mean", "std", "download", "download_url", "sha256")  # do not change the split


def split_key(source: SourceArrays, cfg: dict, server_per_class: int = 0) -> str:
    d, p, e = cfg["dataset"], cfg["partition"], cfg["eval"]
    # label_noise enters the key only when it is on: splits of clean runs keep the keys they had before it existed
    dataset = {k: v for k, v in d.items() if k not in SOURCE_ONLY_KEYS and k != "label_noise"}
    if noise_config(d):
        dataset["label_noise"] = noise_config(d)
    relevant = {
        "source": source.cache_dir, "labels": source.label_suffix,
        "dataset": dataset,
        "partition": p, "clients": cfg["num_clients"], "seed": cfg["seed"],
        "local_test": e["local_test"], "holdout_fraction": e.get("holdout_fraction"), "version": SPLIT_VERSION,
    }
    if server_per_class:  # only then: a run without a server set keeps its split file (and its key)
        relevant["server_per_class"] = int(server_per_class)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:20]


def profile_counts(source: SourceArrays, d: dict) -> np.ndarray:
    """Per-class counts of the long-tailed training set, checked against the images available."""
    k = source.num_classes
    available = np.bincount(np.asarray(source.train_y), minlength=k)
    if d["profile"] == "natural":
        return available.astype(np.int64)
    n_max = int(d.get("n_max") or available.max())
    counts = longtail_counts(k, n_max, float(d["imbalance_factor"]), d["profile"])
    short = np.where(counts > available)[0]
    if len(short):
        c = int(short[0])
        raise DataError(
            f"dataset={d['name']} with n_max={n_max}, imbalance_factor={d['imbalance_factor']}, profile={d['profile']} "
            f"asks for {int(counts[c])} training images of class {c} ({source.classes[c]!r}) but the data has only "
            f"{int(available[c])}; lower dataset.n_max or use dataset.profile=natural (keep every image)")
    return counts


# ----------------------------------------------------------------------------------- the server-held set
SERVER_SET_AUTO_KEY = "server_per_class"  # the strategy option that asks for a server set when per_class is null
SERVER_SET_DRAWN_FROM = "the long-tailed training set, held out before the partition (no client holds them)"


def server_set_size(cfg: dict, counts) -> int:
    """Images per class of the server-held balanced set (``server_data.per_class``) for the long-tailed training
    counts ``counts``; 0 = no server set. An explicit N must leave every class at least one image for the clients
    (N <= n_min - 1), else a DataError names the class and the largest N possible. ``null`` (the default) gives 0,
    unless the strategy asks for a set (its option ``strategy.server_per_class``, e.g. Ratio Loss): then
    min(that, floor(n_min / 2)) -- balanced, and never more than half of the smallest class."""
    counts = np.asarray(counts)
    per_class = (cfg.get("server_data") or {}).get("per_class")
    n_min = int(counts.min()) if len(counts) else 0
    c = int(np.argmin(counts)) if len(counts) else 0
    d = cfg["dataset"]
    where = (f"dataset={d.get('name')} (imbalance_factor={d.get('imbalance_factor')}, n_max={d.get('n_max')}): "
             f"its smallest class, {c}, has {n_min} long-tailed training images")
    if per_class is None:
        wanted = int((cfg.get("strategy") or {}).get(SERVER_SET_AUTO_KEY) or 0)
        size = min(wanted, n_min // 2)
        if wanted and size < 1:
            raise DataError(
                f"strategy={cfg['strategy']['name']} needs a server-held set of training images of every class, but "
                f"{where}, so none can be held out without taking half of it (server_data.per_class=null takes "
                f"min(strategy.server_per_class={wanted}, n_min // 2)); use a smaller imbalance factor or a larger "
                f"dataset.n_max.")
        return size
    if int(per_class) > 0 and int(per_class) >= n_min:
        raise DataError(
            f"invalid value server_data.per_class={per_class}: the server set takes that many training images of "
            f"every class from the long-tailed training set and every class must keep at least one for the clients, "
            f"but {where}; use at most {max(n_min - 1, 0)}, 0 (no server set), or null (the strategy's own size).")
    return int(per_class)


def draw_server_set(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Positions (into ``labels``) of ``per_class`` images of every class, drawn with the run's seed (its own
    stream), sorted."""
    rng = numpy_rng(seed, SERVER_SET)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(int(labels.max()) + 1)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def build_split(source: SourceArrays, cfg: dict) -> FederatedSplit:
    d, p = cfg["dataset"], cfg["partition"]
    k = source.num_classes
    counts = profile_counts(source, d)
    lt_idx = select_longtail(np.asarray(source.train_y), counts, seed=int(d.get("longtail_seed", 0)))
    lt_labels = np.asarray(source.train_y)[lt_idx]
    server_idx = np.zeros(0, dtype=np.int64)
    pool = lt_idx
    per_class = server_set_size(cfg, counts)
    if per_class:  # held out before the partition; without a server set nothing here changes
        held = draw_server_set(lt_labels, per_class, int(cfg["seed"]))
        server_idx = lt_idx[held]
        keep = np.ones(len(lt_idx), dtype=bool)
        keep[held] = False
        pool, lt_labels = lt_idx[keep], lt_labels[keep]
    params = {key: v for key, v in p.items() if key not in GUARD_PARAMS}
    parts = partition(lt_labels, int(cfg["num_clients"]), p["name"], seed=int(cfg["seed"]),
                      min_samples_per_client=int(p.get("min_samples_per_client", 0)),
                      max_attempts=int(p.get("max_attempts", 100)), **params)
    client_train = [pool[part] for part in parts]
    rule = cfg["eval"]["local_test"]
    train_y = np.asarray(source.train_y)
    if rule == "holdout":
        client_train, client_test = holdout_local_tests(client_train, float(cfg["eval"]["holdout_fraction"]),
                                                        seed=int(cfg["seed"]))
        class_counts = np.stack([np.bincount(train_y[t], minlength=k) for t in client_train])
        split = FederatedSplit(lt_idx, client_train, client_test, class_counts, counts, local_test_split="train",
                               server_indices=server_idx)
    else:
        class_counts = np.stack([np.bincount(train_y[t], minlength=k) for t in client_train])
        client_test = proportional_local_tests(class_counts, np.asarray(source.test_y), seed=int(cfg["seed"]))
        split = FederatedSplit(lt_idx, client_train, client_test, class_counts, counts, server_indices=server_idx)
    return add_label_noise(split, train_y, k, cfg)


def add_label_noise(split: FederatedSplit, train_y: np.ndarray, num_classes: int, cfg: dict) -> FederatedSplit:
    """``dataset.label_noise`` (fedlt.data.noise): the clients' training labels flipped, seeded by the run seed,
    after the split and its local tests are drawn from the clean labels; ``class_counts`` become the noisy counts
    (what clients train on). Off (the default): the split is returned unchanged."""
    noise = noise_config(cfg["dataset"])
    if noise is None:
        return split
    clean = [train_y[t].astype(np.int64) for t in split.client_train]
    clean_counts = split.class_counts.sum(axis=0)
    if noise["kind"] == "tail_to_head" and not head_tail(clean_counts)[1]:
        log.warning("dataset.label_noise.kind=tail_to_head: the clients' class counts have no tail class (cumulative "
                    "75/95 % rule), so no label is flipped")
    split.noisy_labels = flip_labels(clean, num_classes, noise["kind"], noise["rate"], int(cfg["seed"]), clean_counts)
    split.class_counts = np.stack([np.bincount(y, minlength=num_classes) for y in split.noisy_labels]) \
        if split.noisy_labels else split.class_counts
    return split


def prepare(cfg: dict) -> tuple[DataPlan, FederatedSplit, SourceArrays]:
    """Load (or reuse) the source and the split for a validated run config."""
    source = load_source(cfg["dataset"], cfg.get("data_root"), cfg["cache_dir"])
    cache = Path(os.path.expanduser(str(cfg["cache_dir"]))) / "splits"
    key = split_key(source, cfg, server_set_size(cfg, profile_counts(source, cfg["dataset"])))
    path = cache / f"{key}.npz"
    split, _ = _cached_split(path, int(cfg["num_clients"]))
    if split is None:  # absent or damaged: draw it (seeded, so a damaged file is replaced by the same split)
        with cache_lock(cache, key, "the drawn splits"):
            remove_stale_temps(cache, key, old_style=r"\.split-[a-z0-9_]{8}\.npz")
            split, damage = _cached_split(path, int(cfg["num_clients"]))  # another process may have drawn it
            if split is None:
                if damage:
                    log.warning("%s; drawing the split again", damage)
                    discard(path, key)
                split = build_split(source, cfg)
                split.save(path)
    aug = cfg["dataset"].get("augment") or {}
    plan = DataPlan(
        source_name=source.name, source_cache=source.cache_dir, split_path=str(path), mean=tuple(source.mean),
        std=tuple(source.std), num_classes=source.num_classes, num_clients=int(cfg["num_clients"]),
        augment_padding=int(aug.get("crop_padding", 0)), augment_hflip=bool(aug.get("hflip", False)),
        label_suffix=source.label_suffix, local_test_split=split.local_test_split,
    )
    return plan, split, source


def _cached_split(path: Path, num_clients: int) -> tuple[FederatedSplit | None, str | None]:
    """The split saved at ``path``, or (None, why not): absent, or damaged (the reason)."""
    if not path.exists():
        return None, None
    try:
        split = FederatedSplit.load(path)
    except DataError as e:
        return None, str(e).split("; delete")[0]
    if len(split.client_train) != num_clients:
        return None, f"the split file {path} holds {len(split.client_train)} clients, not {num_clients}"
    return split, None


def summary(split: FederatedSplit, source: SourceArrays, cfg: dict) -> dict:
    """The ``partition.json`` content (also what ``fedlt-data`` prints): what a user needs to check the split
    without training."""
    from fedlt.eval.groups import SHOT_RULES, shot_groups

    d, e = cfg["dataset"], cfg["eval"]
    test_labels = np.asarray(source.train_y if split.local_test_split == "train" else source.test_y)
    client_test_counts = [np.bincount(test_labels[t], minlength=source.num_classes).tolist()
                          for t in split.client_test]
    groups = {rule: shot_groups(split.global_counts, rule) for rule in SHOT_RULES}
    local = {"rule": e["local_test"], "drawn_from": "test split" if split.local_test_split == "test"
             else "each client's own training share (held out, removed from its training data)"}
    if e["local_test"] == "holdout":
        local["holdout_fraction"] = float(e["holdout_fraction"])
    out = {
        "dataset": d["name"], "source": source.name,
        "source_info": {k: v for k, v in source.meta.items() if k in (
            "source_path", "layout", "sha256", "known_copy", "label_type", "fingerprint")},
        "classes": list(source.classes), "num_classes": source.num_classes,
        "image_shape": list(source.image_shape), "mean": list(source.mean), "std": list(source.std),
        "num_clients": len(split.client_train),
        "imbalance_factor": float(d["imbalance_factor"]), "imbalance_convention": IF_CONVENTION,
        "profile": d["profile"], "n_max": int(split.global_counts.max()) if len(split.global_counts) else 0,
        "partition": dict(cfg["partition"]), "seed": int(cfg["seed"]),
        "global_class_counts": split.global_counts.tolist(), "train_size": int(split.global_counts.sum()),
        "client_train_sizes": [int(len(t)) for t in split.client_train],
        "client_num_classes": [int((row > 0).sum()) for row in clean_class_counts(split, source)],
        "client_class_counts": split.class_counts.tolist(),
        "local_test": local,
        "client_test_sizes": [int(len(t)) for t in split.client_test],
        "client_test_class_counts": client_test_counts,
        "local_test_overlap": local_test_overlap(split.client_test),
        "test_size": int(len(source.test_y)),
        "test_class_counts": np.bincount(np.asarray(source.test_y), minlength=source.num_classes).tolist(),
        "shot_groups": groups,
        "shot_group_sizes": {rule: {g: len(v) for g, v in gr.items()} for rule, gr in groups.items()},
        **({"server_data": server_set_summary(split, source)} if len(split.server_indices) else {}),
    }
    out.update(regime_summary(split, cfg, source))
    noise = noise_config(d)
    if noise is not None and split.noisy_labels is not None:
        train_y = np.asarray(source.train_y)
        clean = [train_y[t].astype(np.int64) for t in split.client_train]
        clean_counts = np.stack([np.bincount(y, minlength=source.num_classes) for y in clean])
        out["client_clean_class_counts"] = clean_counts.tolist()  # client_class_counts: the noisy labels
        out["label_noise"] = noise_report(clean, split.noisy_labels, source.num_classes, noise["kind"],
                                          noise["rate"], clean_counts.sum(axis=0))
    return out


def server_set_summary(split: FederatedSplit, source: SourceArrays) -> dict:
    """What partition.json and results.json record about the server-held set (``server_data.per_class``)."""
    counts = np.bincount(np.asarray(source.train_y)[split.server_indices], minlength=source.num_classes)
    return {"per_class": int(counts.max()) if len(counts) else 0, "class_counts": counts.tolist(),
            "size": int(counts.sum()), "drawn_from": SERVER_SET_DRAWN_FROM}


def clean_class_counts(split: FederatedSplit, source: SourceArrays) -> np.ndarray:
    """clients x classes counts of the clients' TRUE labels (``split.class_counts`` holds the labels they train
    on, noisy under ``dataset.label_noise``): what the partition itself is."""
    if split.noisy_labels is None:
        return split.class_counts
    train_y = np.asarray(source.train_y)
    return np.stack([np.bincount(train_y[t].astype(np.int64), minlength=source.num_classes)
                     for t in split.client_train]) if split.client_train else split.class_counts


def regime_summary(split: FederatedSplit, cfg: dict, source: SourceArrays) -> dict:
    """Which global-vs-local long-tail regime the split is (``partition.regime``, also partition.png's title)
    and each client's realised imbalance factor (largest / smallest non-zero class count of the classes it holds,
    from the true labels; 1 for a client with one class)."""
    from fedlt.data.partition import regime

    factors = []
    for row in clean_class_counts(split, source):
        held = row[row > 0]
        factors.append(round(float(held.max() / held.min()), 4) if held.size else None)
    used = int(sum(len(t) for t in split.client_train)) + len(getattr(split, "server_indices", ())) + (
        int(sum(len(t) for t in split.client_test)) if split.local_test_split == "train" else 0)
    return {"regime": regime(dict(cfg["partition"]), float(cfg["dataset"]["imbalance_factor"]),
                             cfg["dataset"]["profile"]),
            "client_imbalance_factors": factors,
            "unassigned_train_images": int(split.global_counts.sum()) - used}


# ------------------------------------------------------------------------------------------- client side
@dataclass
class ClientData:
    """One client's view: raw uint8 training images (augmented per batch), normalised test images."""

    client_id: int
    train_x: torch.Tensor  # uint8 N,H,W,C
    train_y: torch.Tensor
    test_x: torch.Tensor  # float N,C,H,W normalised
    test_y: torch.Tensor
    train_counts: torch.Tensor  # per-class training counts (num_classes)
    test_counts: torch.Tensor  # per-class local test counts
    plan: DataPlan
    # how local training batches are drawn (a fedlt.train.samplers.SamplerSpec; None = uniform shuffles); set on
    # the client context's view from the run's ``sampler=`` (fedlt.api.client.ClientContext), never here
    sampler: Any = None
    # dataset.label_noise on: the clean training labels, for analysis only (train_y holds the noisy ones the client
    # trains on); None when the labels are clean
    train_y_clean: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.train_y.numel())

    def normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return to_float(x_uint8, self.plan.mean, self.plan.std)


@lru_cache(maxsize=4)
def open_plan(plan: DataPlan) -> tuple[SourceArrays, FederatedSplit]:
    source = open_cached_source(plan.source_cache, plan.source_name, plan.mean, plan.std, plan.label_suffix)
    return source, FederatedSplit.load(plan.split_path)


def client_data(plan: DataPlan, client_id: int) -> ClientData:
    """Open (once per process) and slice one client's data."""
    source, split = open_plan(plan)
    tr, te = split.client_train[client_id], split.client_test[client_id]
    k = plan.num_classes
    test_x_all, test_y_all = ((source.train_x, source.train_y) if split.local_test_split == "train"
                              else (source.test_x, source.test_y))
    train_y = torch.from_numpy(np.array(source.train_y[tr], dtype=np.int64))
    clean_y = None
    if split.noisy_labels is not None:  # dataset.label_noise: train on the noisy labels, keep the clean ones
        clean_y, train_y = train_y, torch.from_numpy(np.array(split.noisy_labels[client_id], dtype=np.int64))
    test_y = torch.from_numpy(np.array(test_y_all[te], dtype=np.int64))  # always the clean labels
    return ClientData(
        client_id=client_id,
        train_x=torch.from_numpy(np.array(source.train_x[tr])),
        train_y=train_y,
        test_x=to_float(torch.from_numpy(np.array(test_x_all[te])), plan.mean, plan.std),
        test_y=test_y,
        train_counts=torch.bincount(train_y, minlength=k),
        test_counts=torch.bincount(test_y, minlength=k),
        plan=plan,
        train_y_clean=clean_y,
    )


def server_data(plan: DataPlan) -> ClientData | None:
    """The server-held balanced set (``server_data.per_class``) as a data view like a client's (``client_id`` -1,
    raw uint8 training images augmented per batch as a client's, no test images), or None without one."""
    source, split = open_plan(plan)
    idx = split.server_indices
    if not len(idx):
        return None
    y = torch.from_numpy(np.array(source.train_y[idx], dtype=np.int64))
    x0 = torch.from_numpy(np.array(source.train_x[idx[:0]]))
    return ClientData(client_id=-1, train_x=torch.from_numpy(np.array(source.train_x[idx])), train_y=y,
                      test_x=to_float(x0, plan.mean, plan.std), test_y=torch.zeros(0, dtype=torch.int64),
                      train_counts=torch.bincount(y, minlength=plan.num_classes),
                      test_counts=torch.zeros(plan.num_classes, dtype=torch.int64), plan=plan)


def global_test(plan: DataPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced test split, normalised (server-side generic evaluation)."""
    source, _ = open_plan(plan)
    x = to_float(torch.from_numpy(np.array(source.test_x)), plan.mean, plan.std)
    return x, torch.from_numpy(np.array(source.test_y, dtype=np.int64))


def plan_dict(plan: DataPlan) -> dict:
    return asdict(plan)
