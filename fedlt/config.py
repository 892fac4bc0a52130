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
    from fedlt.data.local_test import LOCAL_TESTS
    from fedlt.data.longtail import PROFILES
    from fedlt.data.partition import PARTITIONERS
    from fedlt.data.sources import SOURCES
    from fedlt.data.validate import validate_data
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
    check_choice(cfg, "eval.local_test", LOCAL_TESTS)
    if "test_agnostic" in cfg["eval"]:
        check_bool(cfg, "eval.test_agnostic.enabled")
        ifs = _get(cfg, "eval.test_agnostic.imbalance_factors")
        if not isinstance(ifs, list) or not all(isinstance(f, numbers.Real) and not isinstance(f, bool) and f >= 1
                                                for f in ifs):
            _fail("eval.test_agnostic.imbalance_factors", ifs, "expected a list of numbers >= 1, e.g. [10, 50]")
    check_choice(cfg, "dataset.source", sorted(SOURCES))
    check_float(cfg, "dataset.imbalance_factor", 1.0)
    check_choice(cfg, "dataset.profile", PROFILES)
    check_choice(cfg, "partition.name", sorted(PARTITIONERS))
    if "alpha" in cfg["partition"]:
        check_float(cfg, "partition.alpha", 0.0, lo_open=True)
    check_int(cfg, "partition.min_samples_per_client", 0)
    validate_data(cfg)  # the remaining dataset.* / partition.* / holdout options (fedlt/data/validate.py)
    check_choice(cfg, "model.name", MODELS)
    check_choice(cfg, "strategy.name", sorted(STRATEGIES))
    validate_loss(cfg)
    b = "backend"
    check_float(cfg, f"{b}.num_cpus_per_client", 0.0, lo_open=True)
    check_float(cfg, f"{b}.num_gpus_per_client", 0.0)
    check_int(cfg, f"{b}.torch_threads", 1)
    check_float(cfg, f"{b}.round_timeout_s", 0.0, lo_open=True)
    check_int(cfg, f"{b}.min_clients_per_round", 1)
    from fedlt.federation.engine import validate_backend

    validate_backend(cfg)
    fi = cfg.get("fault_injection") or {}
    if fi:
        check_float(cfg, "fault_injection.probability", 0.0, 1.0)
    validate_reliability(cfg)
    strategy = get_strategy(cfg["strategy"]["name"])
    hook = getattr(strategy, "validate_config", None)
    if hook is not None:
        hook(cfg)
    return cfg


def validate_reliability(cfg: dict) -> None:
    """Checkpoint, fault-injection and backend options (fedlt.federation.checkpoint / ray_backend), including
    combinations Ray or the round loop would only fail on after start-up."""
    import os

    from fedlt.federation.client_app import FAULT_MODES, FAULT_PHASES, fault_modes
    from fedlt.federation.ray_backend import address_problem

    if "checkpoint" in cfg:
        check_int(cfg, "checkpoint.every", 0)
        check_int(cfg, "checkpoint.keep", 0)
        check_bool(cfg, "checkpoint.on_signal")
    if cfg.get("resume") is not None and not isinstance(cfg["resume"], str):
        _fail("resume", cfg["resume"], "expected the path of a run directory")
    fi = cfg.get("fault_injection") or {}
    if "phase" in fi:
        check_choice(cfg, "fault_injection.phase", FAULT_PHASES)
    if "mode" in fi:
        modes = fault_modes(fi)
        if not modes or any(m not in FAULT_MODES for m in modes):
            _fail("fault_injection.mode", fi["mode"], f"allowed values are {', '.join(FAULT_MODES)} or a list")
        if modes == ["nan"] and fi.get("phase", "train") != "train":
            _fail("fault_injection.phase", fi["phase"], "fault_injection.mode=nan poisons a training update, so "
                  "the phase must be train")
    b = cfg["backend"]
    if "deterministic" in b:
        check_bool(cfg, "backend.deterministic")
    if b.get("startup_timeout_s") is not None:
        check_float(cfg, "backend.startup_timeout_s", 0.0, lo_open=True)
    for key in ("actor_max_restarts", "actor_task_retries"):
        if b.get(key) is not None:
            check_int(cfg, f"backend.{key}", -1)
    if b.get("num_cpus") is not None:
        check_int(cfg, "backend.num_cpus", 1)
    if b.get("num_gpus") is not None:
        check_float(cfg, "backend.num_gpus", 0.0)
    problem = address_problem(b.get("address"))
    if problem:
        _fail("backend.address", b["address"], problem)
    init_args = b.get("init_args") or {}
    if not isinstance(init_args, dict):
        _fail("backend.init_args", init_args, "expected a mapping of ray.init keyword arguments")
    if b.get("address") or init_args.get("address"):
        clash = [k for k in ("num_cpus", "num_gpus") if b.get(k) is not None or k in init_args]
        if clash:
            raise ConfigError(
                f"invalid combination backend.address={b.get('address') or init_args.get('address')!r} with "
                f"backend.{clash[0]}={b.get(clash[0], init_args.get(clash[0]))!r}: Ray refuses CPU/GPU counts when "
                f"attaching to a running cluster (the cluster's own resources are used); set backend.{clash[0]}=null.")
    else:
        cpus = int(b.get("num_cpus") or os.cpu_count() or 1)
        if float(b["num_cpus_per_client"]) > cpus:
            raise ConfigError(
                f"invalid value backend.num_cpus_per_client={b['num_cpus_per_client']!r}: Ray will have {cpus} CPUs "
                f"(backend.num_cpus={b.get('num_cpus')!r}), so no client actor would ever start; use at most {cpus}.")
        if float(b["num_gpus_per_client"]) > 0:
            import torch

            gpus = b.get("num_gpus")
            gpus = float(torch.cuda.device_count() if gpus is None else gpus)
            if gpus < float(b["num_gpus_per_client"]):
                raise ConfigError(
                    f"invalid value backend.num_gpus_per_client={b['num_gpus_per_client']!r}: Ray will have "
                    f"{gpus:g} GPUs, so no client actor would ever start; use 0 on a machine without a GPU.")
    n = int(cfg["num_clients"])
    sampled = max(int(float(cfg["participation"]) * n), 1)
    if int(b["min_clients_per_round"]) > sampled:
        raise ConfigError(
            f"invalid combination backend.min_clients_per_round={b['min_clients_per_round']} with "
            f"participation={cfg['participation']} and num_clients={n}: only {sampled} clients are sampled per "
            f"round, so the global model would never change; lower min_clients_per_round to at most {sampled}.")


def validate_data_size(cfg: dict, train_size: int) -> None:
    """After the long-tail profile is known: every client needs at least one training sample on average."""
    n = int(cfg["num_clients"])
    if n > train_size:
        raise ConfigError(
            f"invalid value num_clients={n}: the long-tailed training set of dataset={cfg['dataset']['name']} "
            f"(imbalance_factor={cfg['dataset']['imbalance_factor']}) has only {train_size} samples, so at most "
            f"{train_size} clients are possible; lower num_clients or the imbalance factor."
        )


def validate_strategy_data(cfg: dict, num_classes: int) -> None:
    """After the data are loaded (still before Ray starts): the strategy's data-dependent checks, through its
    optional ``validate_data(cfg, num_classes)`` staticmethod (e.g. FedLoGe's d x K ETF needs d >= K)."""
    from strategies import get_strategy

    hook = getattr(get_strategy(cfg["strategy"]["name"]), "validate_data", None)
    if hook is not None:
        hook(cfg, num_classes)
