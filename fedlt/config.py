"""The one place that knows what a valid run is. ``validate(cfg)`` checks a resolved Hydra config (as a plain
dict) and raises :class:`ConfigError` with one paragraph naming the bad value and what is allowed -- before
any data is loaded and before Ray starts."""

from __future__ import annotations

import numbers


class ConfigError(ValueError):
    """A user error in the configuration (printed as one paragraph, exit code 2, no traceback)."""


def _get(cfg: dict, path: str):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"missing config value `{path}`; add it to the config or pass `{path}=...`")
        node = node[part]
    return node


def _fail(path: str, value, allowed: str) -> None:
    raise ConfigError(f"invalid value {path}={value!r}: {allowed}.")


def check_int(cfg: dict, path: str, lo: int | None = None, hi: int | None = None) -> int:
    v = _get(cfg, path)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        _fail(path, v, "expected an integer" + (f" >= {lo}" if lo is not None else ""))
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        _fail(path, v, f"must be an integer {rng}")
    return int(v)


def check_float(cfg: dict, path: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False) -> float:
    v = _get(cfg, path)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        _fail(path, v, "expected a number")
    v = float(v)
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad or v != v:
        left = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        right = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
        _fail(path, _get(cfg, path), "must be a number " + " and ".join(s for s in (left, right) if s))
    return v


def check_choice(cfg: dict, path: str, allowed) -> str:
    v = _get(cfg, path)
    if v not in allowed:
        _fail(path, v, "allowed values are " + ", ".join(str(a) for a in allowed))
    return v


def check_bool(cfg: dict, path: str) -> bool:
    v = _get(cfg, path)
    if not isinstance(v, bool):
        _fail(path, v, "expected true or false")
    return v


def validate(cfg: dict) -> dict:
    """Check every value a run uses; return the config unchanged. Strategy-specific options are checked by
    the strategy's ``validate_config`` hook when it has one."""
    from fedlt.data.longtail import PROFILES
    from fedlt.data.partition import PARTITIONERS
    from fedlt.data.sources import SOURCES
    from fedlt.models import MODELS
    from fedlt.train.losses import validate_loss
    from strategies import STRATEGIES, get_strategy

    check_int(cfg, "seed", 0, 2**32 - 1)
    check_int(cfg, "num_clients", 1)
    check_int(cfg, "num_rounds", 1)
    check_float(cfg, "participation", 0.0, 1.0, lo_open=True)
    check_int(cfg, "local_epochs", 0)
    check_int(cfg, "batch_size", 1)
    check_float(cfg, "optimizer.lr", 0.0, lo_open=True)
    check_float(cfg, "optimizer.momentum", 0.0, 1.0, hi_open=True)
    check_float(cfg, "optimizer.weight_decay", 0.0)
    check_int(cfg, "eval.every", 0)
    check_int(cfg, "eval.batch_size", 1)
    check_bool(cfg, "eval.mask_absent_classes")
    check_choice(cfg, "eval.local_test", ("proportional",))
    check_choice(cfg, "dataset.source", sorted(SOURCES))
    check_float(cfg, "dataset.imbalance_factor", 1.0)
    check_choice(cfg, "dataset.profile", PROFILES)
    check_choice(cfg, "partition.name", sorted(PARTITIONERS))
    if "alpha" in cfg["partition"]:
        check_float(cfg, "partition.alpha", 0.0, lo_open=True)
    check_int(cfg, "partition.min_samples_per_client", 0)
    check_choice(cfg, "model.name", MODELS)
    check_choice(cfg, "strategy.name", sorted(STRATEGIES))
    validate_loss(cfg)
    b = "backend"
    check_float(cfg, f"{b}.num_cpus_per_client", 0.0, lo_open=True)
    check_float(cfg, f"{b}.num_gpus_per_client", 0.0)
    check_int(cfg, f"{b}.torch_threads", 1)
    check_float(cfg, f"{b}.round_timeout_s", 0.0, lo_open=True)
    check_int(cfg, f"{b}.min_clients_per_round", 1)
    fi = cfg.get("fault_injection") or {}
    if fi:
        check_float(cfg, "fault_injection.probability", 0.0, 1.0)
    strategy = get_strategy(cfg["strategy"]["name"])
    hook = getattr(strategy, "validate_config", None)
    if hook is not None:
        hook(cfg)
    return cfg


def validate_data_size(cfg: dict, train_size: int) -> None:
    """After the long-tail profile is known: every client needs at least one training sample on average."""
    n = int(cfg["num_clients"])
    if n > train_size:
        raise ConfigError(
            f"invalid value num_clients={n}: the long-tailed training set of dataset={cfg['dataset']['name']} "
            f"(imbalance_factor={cfg['dataset']['imbalance_factor']}) has only {train_size} samples, so at most "
            f"{train_size} clients are possible; lower num_clients or the imbalance factor."
        )
