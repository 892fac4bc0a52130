"""Checkpoints and resume: everything a run needs to continue after round k exactly as if it had never stopped.

A checkpoint (``<run_dir>/checkpoints/round-000k.pt``) holds: the global arrays, every client's persistent
state (:mod:`fedlt.core.client_state`), the strategy's ``server_state()``, the privacy accountant's state (the
inputs epsilon is recomputed from: noise multiplier, rounds, clipping norm, uploads per client; empty without
DP), the round number, the metrics rows, failures and per-client detail logged so far, the elapsed time, and
the driver's global RNG states (the algorithms' randomness is derived statelessly from (seed, purpose, round,
client) -- see :mod:`fedlt.seeding` -- and the driver's global generators are re-seeded from (seed, round) at the
start of every round, so nothing random depends on history). It is written to a temporary file, fsync'ed and
renamed into place (a kill at any moment leaves either the old or the new checkpoint, never half of one), loaded
with ``torch.load(weights_only=True)`` (no code from the file is executed: only tensors, numbers, strings and
plain containers), and old ones are pruned to ``checkpoint.keep``.

A checkpoint records a fingerprint of the configuration (minus :data:`RESUME_OVERRIDABLE`); resuming it under
a different configuration is refused, naming the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedlt.config import RESUME_OVERRIDABLE, overridable

FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^round-(\d{6,})\.pt$")



class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be resumed (a user error: one paragraph, exit 2)."""


# ------------------------------------------------------------------------------------------- the state
@dataclass
class RunState:
    """The state of a run after ``round`` completed rounds."""

    round: int
    arrays: dict[str, torch.Tensor]  # the global (shared) arrays
    clients: dict  # ClientStateStore.state_dict(): client id -> record name -> tensors
    server_state: dict  # strategy.server_state()
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl rows so far
    failures: list[dict] = field(default_factory=list)
    detail: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    rng: dict = field(default_factory=dict)
    privacy: dict = field(default_factory=dict)  # fedlt.privacy.server.RunPrivacy.state_dict() (empty: no DP)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "python" in state:
        random.setstate(state["python"])


def seed_round(seed: int, rnd: int) -> None:
    """Re-seed the driver's global generators from (seed, round): server-side randomness (e.g. a strategy's
    server step) never depends on what ran before, so a resumed run draws the same numbers."""
    from fedlt.seeding import SERVER, derive_seed

    s = derive_seed(seed, SERVER, rnd)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


# ------------------------------------------------------------------ weights_only-safe encoding of state
def _encode(obj, where: str = "state"):
    """Tensors, numbers, strings, None and dict/list/tuple of them pass as they are; numpy arrays and Flower
    ArrayRecords are wrapped so that ``torch.load(weights_only=True)`` can read them back."""
    from flwr.app import ArrayRecord

    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{where}: numpy object arrays cannot be checkpointed")
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj).copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, ArrayRecord):
        return {"__arrayrecord__": {k: _encode(a.numpy(), where) for k, a in obj.items()}}
    if isinstance(obj, dict):
        return {k: _encode(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [_encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(out) if isinstance(obj, tuple) else out
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be checkpointed (use tensors, numpy arrays, "
                    f"numbers, strings and dict/list/tuple of them)")


def _decode(obj):
    from flwr.app import Array, ArrayRecord

    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        if set(obj) == {"__arrayrecord__"}:
            return ArrayRecord({k: Array(_decode(v)) for k, v in obj["__arrayrecord__"].items()})
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_decode(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------------- config identity
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def identity(cfg: dict) -> dict:
    """The part of a config that decides what a run computes (flattened)."""
    return {k: v for k, v in sorted(_flatten(cfg).items()) if not overridable(k) and k != "resume"}


def fingerprint(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()


def config_difference(a: dict, b: dict, limit: int = 6) -> str:
    ia, ib = identity(a), identity(b)
    keys = sorted(k for k in set(ia) | set(ib) if ia.get(k, "<absent>") != ib.get(k, "<absent>"))
    shown = ", ".join(f"{k}: {ia.get(k, '<absent>')!r} vs {ib.get(k, '<absent>')!r}" for k in keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------- files on disk
def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, path) of every complete checkpoint, oldest first (temporary files are ignored)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, state: RunState, cfg: dict, keep: int) -> Path:
    """Write ``state`` atomically (temp file, fsync, rename, fsync dir); prune to the newest ``keep``."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"round-{state.round:06d}.pt"
    payload = {
        "format": FORMAT, "round": state.round, "config_sha": fingerprint(cfg), "config": _encode(cfg, "config"),
        "arrays": state.arrays, "clients": state.clients,
        "server_state": _encode(state.server_state, "server_state"),
        "rows": _encode(state.rows, "rows"), "failures": _encode(state.failures, "failures"),
        "detail": _encode(state.detail, "detail"), "elapsed_s": float(state.elapsed_s),
        "rng": _encode(state.rng, "rng"), "privacy": _encode(state.privacy, "privacy"),
    }
    tmp = d / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(d)
    prune(run_dir, keep)
    return path


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0 = keep all)."""
    if keep > 0:
        for _, p in list_checkpoints(run_dir)[:-keep]:
            p.unlink(missing_ok=True)


def load(path: Path) -> tuple[RunState, dict, str]:
    """Read one checkpoint with ``torch.load(weights_only=True)``; return (state, config, config fingerprint)."""
    try:
        with warnings.catch_warnings():  # e.g. torch's "Detected pickle protocol 4" on a foreign file
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"not a fedlt checkpoint of format {FORMAT}")
        state = RunState(
            round=int(payload["round"]), arrays=dict(payload["arrays"]), clients=dict(payload["clients"]),
            server_state=_decode(payload["server_state"]), rows=_decode(payload["rows"]),
            failures=_decode(payload["failures"]), detail=_decode(payload["detail"]),
            elapsed_s=float(payload["elapsed_s"]), rng=_decode(payload["rng"]),
            privacy=_decode(payload.get("privacy", {})),
        )
        return state, _decode(payload["config"]), str(payload["config_sha"])
    except Exception as e:  # noqa: BLE001 -- any unreadable file is reported the same way
        raise CheckpointError(
            f"the checkpoint {path} cannot be read ({unreadable(e)}); it is corrupt or not a fedlt checkpoint. "
            f"Delete it to resume from an earlier checkpoint (or from the start)."
        ) from None


_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def unreadable(e: Exception) -> str:
    """Why ``torch.load`` refused a file, in full sentences: the error type and the first sentence of its
    message. For a file holding more than tensors and plain data (e.g. a pickle that would run code), torch's
    message is mostly advice to load it unsafely; only the paragraph naming what was refused is kept."""
    from fedlt.core.failures import clip

    text = str(e).strip()
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    own = [p for p in paragraphs if not p.startswith(_TORCH_ADVICE)]
    if len(own) < len(paragraphs):  # torch's weights_only refusal: what it refused is in its own paragraph
        text = " ".join(own) or "it holds objects other than tensors and plain data"
    else:
        text = re.split(r"(?<=[.!?])\s+(?=[A-Z(])", " ".join(text.split()), maxsplit=1)[0]
    if not text and isinstance(e, EOFError):
        text = "the file ends early: it is empty or truncated"
    why = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return clip(why, 300, rest="not shown")


def latest(run_dir: Path, cfg: dict) -> RunState | None:
    """The newest checkpoint of ``run_dir``, checked against ``cfg``; None when there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    rnd, path = found[-1]
    state, saved_cfg, sha = load(path)
    if sha != fingerprint(cfg):
        raise CheckpointError(
            f"the checkpoint {path} was written by a different configuration than {Path(run_dir) / 'config.yaml'} "
            f"({config_difference(saved_cfg, cfg)}); refusing to resume. Resume with the configuration that "
            f"wrote it, or start a new run."
        )
    if state.round != rnd:
        raise CheckpointError(f"the checkpoint {path} holds round {state.round}, not {rnd}; it was renamed or "
                              f"is corrupt. Delete it to resume from an earlier checkpoint.")
    return state


# ---------------------------------------------------------------------------- during a run / on resume
class Checkpointer:
    """What ``run_rounds`` needs: when to save, where, and whether a stop was requested (SIGINT/SIGTERM)."""

    def __init__(self, cfg: dict, run_dir: Path | None, resume_from: RunState | None = None,
                 stop: threading.Event | None = None):
        c = cfg.get("checkpoint") or {}
        self.cfg = cfg
        self.run_dir = run_dir
        self.every = int(c.get("every", 0))
        self.keep = int(c.get("keep", 0))
        self.resume_from = resume_from
        self.stop = stop or threading.Event()
        self.saved: list[int] = []

    def due(self, rnd: int) -> bool:
        last = rnd == int(self.cfg["num_rounds"])
        return self.run_dir is not None and self.every > 0 and (rnd % self.every == 0 or last)

    def stop_requested(self) -> bool:
        return self.stop.is_set()

    def save(self, state: RunState) -> Path | None:
        if self.run_dir is None:
            return None
        path = save(self.run_dir, state, self.cfg, self.keep)
        self.saved.append(state.round)
        return path


def write_config_yaml(run_dir: Path, cfg: dict) -> None:
    """The run's resolved config.yaml, written atomically."""
    from omegaconf import OmegaConf

    tmp = Path(run_dir) / ".config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    os.replace(tmp, Path(run_dir) / "config.yaml")


def reset_run_dir(run_dir: Path, state: RunState | None, cfg: dict | None = None) -> None:
    """Before resuming (the checkpoint was accepted): config.yaml holds the config the run continues with (e.g.
    a raised num_rounds), metrics.jsonl exactly the rows up to the checkpoint (rows a killed run wrote after it
    are dropped), results.json of an earlier end is removed (it is rewritten at the end), and without any
    checkpoint the run starts over (TensorBoard files too)."""
    from fedlt.runlog import json_safe

    run_dir = Path(run_dir)
    if cfg is not None:
        write_config_yaml(run_dir, cfg)
    for p in checkpoint_dir(run_dir).glob(".round-*.tmp-*"):  # left by a writer that was killed
        p.unlink(missing_ok=True)
    (run_dir / "results.json").unlink(missing_ok=True)
    metrics = run_dir / "metrics.jsonl"
    rows = state.rows if state is not None else []
    tmp = metrics.with_name(f".{metrics.name}.tmp")
    tmp.write_text("".join(json.dumps(json_safe(r)) + "\n" for r in rows))
    os.replace(tmp, metrics)
    if state is None:
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
