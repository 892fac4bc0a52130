"""Checks of the data options (``dataset.*``, ``partition.*``, ``eval.local_test`` / ``eval.holdout_fraction``),
called by :func:`fedlt.validate.validate` so bad values are refused before anything is decoded or Ray starts."""

from __future__ import annotations

import inspect
import numbers
import re

from fedlt.config import ConfigError, check_bool, check_choice, check_float, check_int, fail


def _present(node: dict, key: str) -> bool:
    return key in node and node[key] is not None


def _check_stats(cfg: dict, key: str) -> None:
    v = cfg["dataset"].get(key)
    if v is None:
        return
    if not isinstance(v, list | tuple) or not v or not all(
            isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v):
        fail(f"dataset.{key}", v, "expected a list of numbers, one per image channel (or null: statistics of the "
                                   "decoded training images)")
    if key == "std" and min(v) <= 0:
        fail("dataset.std", v, "every value must be > 0")


def _check_image_size(cfg: dict) -> None:
    v = cfg["dataset"].get("image_size")
    ok = v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (
        isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int) and x >= 1 for x in v))
    if not ok:
        fail("dataset.image_size", v, "expected null (keep the size), an integer >= 1 (square) or [height, width]")


def validate_data(cfg: dict) -> None:
    d = cfg["dataset"]
    source = d["source"]
    if _present(d, "n_max"):
        check_int(cfg, "dataset.n_max", 1)
    if _present(d, "longtail_seed"):
        check_int(cfg, "dataset.longtail_seed", 0, 2**32 - 1)
    if _present(d, "download"):
        check_bool(cfg, "dataset.download")
    if _present(d, "sha256") and not re.fullmatch(r"[0-9a-fA-F]{64}", str(d["sha256"])):
        fail("dataset.sha256", d["sha256"], "expected null or the 64 hex digits of the source file's SHA-256")
    if _present(d, "label_type"):
        check_choice(cfg, "dataset.label_type", ("fine", "coarse") if source == "cifar100" else ("fine",))
    _check_stats(cfg, "mean")
    _check_stats(cfg, "std")
    if _present(d, "mean") and _present(d, "std") and len(d["mean"]) != len(d["std"]):
        fail("dataset.std", d["std"], f"must have as many values as dataset.mean ({len(d['mean'])})")
    aug = d.get("augment") or {}
    if "crop_padding" in aug:
        check_int(cfg, "dataset.augment.crop_padding", 0)
    if "hflip" in aug:
        check_bool(cfg, "dataset.augment.hflip")
    if source == "imagefolder":
        if not d.get("path"):
            fail("dataset.path", d.get("path"), "dataset=imagefolder needs the folder or .zip holding "
                                                 "{train,test}/<class>/<image> or <class>/<image>")
        _check_image_size(cfg)
        if _present(d, "channels"):
            check_choice(cfg, "dataset.channels", (1, 3))
        if _present(d, "test_fraction"):
            check_float(cfg, "dataset.test_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
        if _present(d, "split_seed"):
            check_int(cfg, "dataset.split_seed", 0, 2**32 - 1)
    if source == "synthetic":
        for key, lo in (("num_classes", 2), ("train_per_class", 1), ("test_per_class", 1), ("image_size", 4),
                        ("prototype_grid", 1), ("data_seed", 0)):
            if _present(d, key):
                check_int(cfg, f"dataset.{key}", lo)
        if _present(d, "channels"):
            check_choice(cfg, "dataset.channels", (1, 3))
        if _present(d, "noise"):
            check_float(cfg, "dataset.noise", 0.0)
        if _present(d, "contrast"):
            check_float(cfg, "dataset.contrast", 0.0, lo_open=True)
    if cfg["eval"]["local_test"] == "holdout":
        check_float(cfg, "eval.holdout_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
    _validate_partition(cfg)


def _validate_partition(cfg: dict) -> None:
    from fedlt.data.partition import GUARD_PARAMS, partitioner_params

    p = cfg["partition"]
    name = p["name"]
    known = partitioner_params(name)
    unknown = sorted(set(p) - set(known) - set(GUARD_PARAMS))
    if unknown:
        raise ConfigError(f"partition={name} has no option {', '.join('partition.' + u for u in unknown)}; its options "
                          f"are {', '.join('partition.' + k for k in sorted([*known, *GUARD_PARAMS[1:]]))}.")
    missing = sorted(k for k, v in known.items() if v is inspect.Parameter.empty and k not in p)
    if missing:
        raise ConfigError(f"partition={name} needs {', '.join('partition.' + m + '=...' for m in missing)}.")
    if "max_attempts" in p:
        check_int(cfg, "partition.max_attempts", 1)
    for key in ("classes_per_client", "group_size", "max_redraws"):
        if key in p:
            check_int(cfg, f"partition.{key}", 1)
    _validate_regime(cfg)


def _validate_regime(cfg: dict) -> None:
    """Options of the global-vs-local long-tail partitioners (local_lt, global_local_lt) and of quantity_skew."""
    from fedlt.data.partition import ORDERINGS, SIZE_DISTRIBUTIONS

    p, d = cfg["partition"], cfg["dataset"]
    name = p["name"]
    if "imbalance_factor_min" in p:
        lo = check_float(cfg, "partition.imbalance_factor_min", 1.0)
        if "imbalance_factor_max" in p and check_float(cfg, "partition.imbalance_factor_max", 1.0) < lo:
            fail("partition.imbalance_factor_max", p["imbalance_factor_max"], f"must be >= partition."
                 f"imbalance_factor_min={p['imbalance_factor_min']!r} (each client's factor is drawn between them)")
    if "ordering" in p:
        check_choice(cfg, "partition.ordering", ORDERINGS)
    if "distribution" in p:
        check_choice(cfg, "partition.distribution", SIZE_DISTRIBUTIONS)
    if "sigma" in p:
        check_float(cfg, "partition.sigma", 0.0)
    if "size_alpha" in p:
        check_float(cfg, "partition.size_alpha", 0.0, lo_open=True)
    if name == "local_lt" and d.get("profile") != "natural" and float(d["imbalance_factor"]) != 1:
        raise ConfigError(
            f"invalid combination partition=local_lt with dataset.imbalance_factor={d['imbalance_factor']!r}: local_lt "
            f"is balanced global data with a long tail per client, so the pool must be balanced; add "
            f"dataset.imbalance_factor=1, or use partition=global_local_lt for a global long tail and per-client long "
            f"tails together.")
