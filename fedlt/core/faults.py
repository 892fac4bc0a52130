"""Seeded fault injection (``fault_injection.*``): tests and demos that runs survive client failures. The fault a
client suffers is a pure function of (seed, round, client, phase), so it does not depend on scheduling."""

from __future__ import annotations

import os
import sys

import torch

from fedlt.seeding import FAULT, numpy_rng

FAULT_MODES = ("raise", "oom", "exit", "nan")
FAULT_PHASES = ("train", "evaluate", "any")


def fault_modes(fi: dict) -> list:
    """``fault_injection.mode`` as a list (Hydra reads a bare ``nan`` on the command line as a float)."""
    modes = fi.get("mode", "raise")
    modes = list(modes) if isinstance(modes, (list, tuple)) else [modes]
    return ["nan" if isinstance(m, float) and m != m else m for m in modes]


def injected_fault(cfg: dict, cid: int, rnd: int, phase: str) -> str | None:
    """The fault ``fault_injection`` injects into client ``cid`` in round ``rnd`` ("train" or "evaluate"), or
    None. ``mode`` may be a list: each fault then draws one of them (``nan`` only for training)."""
    fi = cfg.get("fault_injection") or {}
    p = float(fi.get("probability", 0.0))
    if p <= 0 or fi.get("phase", "train") not in (phase, "any"):
        return None
    keys = (FAULT, rnd, cid) if phase == "train" else (FAULT, rnd, cid, 1)
    rng = numpy_rng(int(cfg["seed"]), *keys)
    if rng.random() >= p:
        return None
    modes = fault_modes(fi)
    if phase != "train":
        modes = [m for m in modes if m != "nan"] or ["raise"]
    return str(modes[int(rng.integers(len(modes)))]) if len(modes) > 1 else str(modes[0])


def act_out_fault(cfg: dict, cid: int, rnd: int, phase: str, device: str) -> str | None:
    """Act out :func:`injected_fault`. ``raise``: the client raises; ``oom``: a real allocator failure (an
    impossible allocation; nothing is allocated); ``exit``: the client's process dies (``os._exit``), as when the
    OOM killer strikes; ``nan``: returned to the caller, which poisons the update with NaN."""
    mode = injected_fault(cfg, cid, rnd, phase)
    if mode is None:
        return None
    what = f"injected fault (fault_injection.mode={mode}) in client {cid}, round {rnd}, {phase}"
    if mode == "raise":
        raise RuntimeError(what)
    if mode == "oom":
        torch.empty(1 << 62, dtype=torch.uint8, device=device)  # raises: can't allocate memory
    if mode == "exit":
        print(what, file=sys.stderr, flush=True)
        os._exit(70)
    return mode
