"""glibc malloc settings for fedlt's processes (``backend.malloc_arena_max``).

Why: glibc gives every thread that contends for the heap its own arena (up to 8 per core) and keeps what is
freed inside each one. A Ray actor or the driver runs a dozen threads (Ray's core worker, gRPC, Flower, torch),
so the tensors of one client's step end up spread over several arenas that each hold on to their high-water
mark. Measured on CIFAR-10-LT (FedLoGe, ResNet-8, 40 clients, one actor): peak PSS of the whole process tree
2,218 MB with glibc's defaults, 1,842 MB with two arenas per process; the actor alone 1,092 -> 750 MB, the
driver 889 -> 738 MB. Same numbers, the arithmetic is untouched. Off (0) keeps glibc's defaults.

Where it applies: ``MALLOC_ARENA_MAX`` in the environment of every Ray process fedlt starts (read by glibc when
a process starts: the daemons and actors inherit it, and a cluster's actors get it through the runtime
environment), and ``mallopt(M_ARENA_MAX)`` in the running driver (limits the arenas it creates from then on).
Other C libraries (musl, macOS) ignore both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # glibc malloc.h
M_TRIM_THRESHOLD = -1


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def env(backend: dict) -> dict[str, str]:
    """Environment variables that give a new process the configured malloc settings (empty when off)."""
    arenas = int(backend.get("malloc_arena_max") or 0)
    return {"MALLOC_ARENA_MAX": str(arenas)} if arenas > 0 else {}


def apply_here(backend: dict) -> bool:
    """Limit this running process's malloc arenas as configured; True when glibc took the setting."""
    arenas = int(backend.get("malloc_arena_max") or 0)
    if arenas <= 0:
        return False
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, arenas) == 1)


def export(backend: dict) -> dict[str, str]:
    """Put :func:`env` into ``os.environ`` (processes started from now on inherit it) and return it; a value the
    user already exported wins."""
    values = env(backend)
    for k, v in values.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in values}
