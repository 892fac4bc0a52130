"""Algorithms, one file each. A file defines a client side (``fedlt.api.client.ClientAlgorithm``
subclass) and a server side (``fedlt.api.server.ServerAlgorithm`` subclass)
and exposes the server class as ``Server``; ``Server.client_cls`` is its client side. No algorithm imports Ray
or knows how it is run. A new file here is picked up automatically as ``strategy=<file name>`` (add its
``configs/strategy/<name>.yaml`` too)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

STRATEGIES = tuple(sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                          if not m.name.startswith("_")))


def get_strategy(name: str):
    """The server class of strategy ``name`` (its client side is ``.client_cls``)."""
    if name not in STRATEGIES:
        raise KeyError(f"unknown strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
    return importlib.import_module(f"strategies.{name}").Server
