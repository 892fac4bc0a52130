"""The vocabulary of a run config, with no dependency on the rest of fedlt (a leaf: everything may import it).

* :class:`ConfigError` -- a user error in the configuration, printed as one paragraph (exit code 2, no traceback).
* ``check_*`` -- read one value at a dotted path of a plain-dict config, check its type and range, return it.
* :func:`param` / :func:`check_params` -- a config section as a typed dataclass: each option's default, type,
  range and doc live in one field declaration (strategies declare their hyper-parameters this way).
* :func:`clients_per_round` -- the sampling-size rule, written once.

Which checks a run needs, and in which order, is :mod:`fedlt.validate`'s business (it imports this module and
the modules whose options it checks; nothing below it imports it)."""

from __future__ import annotations

import dataclasses
import numbers
import typing
from typing import Any, NoReturn


class ConfigError(ValueError):
    """A user error in the configuration (printed as one paragraph, exit code 2, no traceback)."""


def get(cfg: dict, path: str):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"missing config value `{path}`; add it to the config or pass `{path}=...`")
        node = node[part]
    return node


def fail(path: str, value, allowed: str) -> NoReturn:
    raise ConfigError(f"invalid value {path}={value!r}: {allowed}.")


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    left = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
    right = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
    return " and ".join(s for s in (left, right) if s)


def check_int(cfg: dict, path: str, lo: int | None = None, hi: int | None = None) -> int:
    v = get(cfg, path)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        fail(path, v, "expected an integer" + (f" >= {lo}" if lo is not None else ""))
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        fail(path, v, f"must be an integer {rng}")
    return int(v)


def check_float(cfg: dict, path: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False) -> float:
    v = get(cfg, path)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        fail(path, v, "expected a number")
    f = float(v)
    bad = (lo is not None and (f <= lo if lo_open else f < lo)) or (hi is not None and (f >= hi if hi_open else f > hi))
    if bad or f != f or f in (float("inf"), float("-inf")):
        fail(path, v, "must be a finite number " + _range_text(lo, hi, lo_open, hi_open))
    return f


def check_choice(cfg: dict, path: str, allowed) -> Any:
    v = get(cfg, path)
    if v not in allowed:
        fail(path, v, "allowed values are " + ", ".join(str(a) for a in allowed))
    return v


def check_bool(cfg: dict, path: str) -> bool:
    v = get(cfg, path)
    if not isinstance(v, bool):
        fail(path, v, "expected true or false")
    return v


# Options that may change when a run is resumed: they do not change what the run computes (the determinism
# tests show results do not depend on actors or CPUs per client), only how long it runs and where/how fast.
RESUME_OVERRIDABLE = (
    "num_rounds", "log_level", "data_root", "cache_dir",
    "checkpoint.every", "checkpoint.keep", "checkpoint.on_signal",
    "backend.address", "backend.num_cpus", "backend.num_gpus", "backend.num_cpus_per_client",
    "backend.round_timeout_s", "backend.startup_timeout_s", "backend.log_to_driver", "backend.init_args",
)


def overridable(key: str) -> bool:
    """May ``key`` change when a run is resumed (:data:`RESUME_OVERRIDABLE`, or a key below one)?"""
    return any(key == k or key.startswith(k + ".") for k in RESUME_OVERRIDABLE)


def clients_per_round(num_clients: int, participation: float) -> int:
    """How many clients a round samples: max(int(participation * N), 1) (FedLoGe's and Flower's rule)."""
    return max(int(float(participation) * int(num_clients)), 1)


# ------------------------------------------------------------------------------------ typed sections
def param(default, doc: str, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
          choices: tuple | None = None):
    """One option of a typed config section: its default, range or choices and doc, in one place. The type is
    the dataclass field's annotation (int, float, bool or str)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open,
                                                        "hi_open": hi_open, "choices": choices})


def _check_field(cfg: dict, path: str, kind, meta: dict):
    args = typing.get_args(kind)
    if type(None) in args:  # Optional[X]: null is allowed
        if get(cfg, path) is None:
            return None
        kind = next(a for a in args if a is not type(None))
    if meta.get("choices") is not None:
        return check_choice(cfg, path, meta["choices"])
    if kind is bool:
        return check_bool(cfg, path)
    if kind is int:
        v = check_int(cfg, path, meta.get("lo"), meta.get("hi"))
        if meta.get("lo_open") and meta.get("lo") is not None and v <= meta["lo"]:
            fail(path, v, f"must be an integer > {meta['lo']}")
        return v
    if kind is float:
        return check_float(cfg, path, meta.get("lo"), meta.get("hi"), meta.get("lo_open", False),
                           meta.get("hi_open", False))
    v = get(cfg, path)
    if kind is str and not isinstance(v, str):
        fail(path, v, "expected a string")
    return v


def check_params(cfg: dict, section: str, params_cls, ignore: tuple[str, ...] = ("name",)):
    """Check ``cfg[section]`` against the dataclass ``params_cls`` (unknown keys refused, every field present,
    typed and in range) and return it as an instance."""
    node = get(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(node) - set(fields) - set(ignore))
    if unknown:
        known = ", ".join(f"{section}.{k}" for k in fields) or "none"
        raise ConfigError(f"unknown option {section}.{unknown[0]}{_owner(cfg, section)}: its options are {known}.")
    hints = typing.get_type_hints(params_cls)
    values = {}
    for name, f in fields.items():
        if name not in node:
            raise ConfigError(f"missing option {section}.{name}{_owner(cfg, section)} ({f.metadata.get('doc', '')}); "
                              f"pass {section}.{name}=... (default {f.default!r}).")
        values[name] = _check_field(cfg, f"{section}.{name}", hints[name], dict(f.metadata))
    return params_cls(**values)


def _owner(cfg: dict, section: str) -> str:
    name = (cfg.get(section) or {}).get("name") if isinstance(cfg.get(section), dict) else None
    return f" of {section}={name}" if name else ""


def param_defaults(params_cls) -> dict:
    """``{option: default}`` of a typed section (what its YAML file must hold)."""
    return {f.name: f.default for f in dataclasses.fields(params_cls)}


def param_docs(params_cls) -> dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(params_cls)}
