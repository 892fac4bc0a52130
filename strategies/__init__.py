"""Algorithms, one file each. A file defines a client side (``fedlt.federation.algorithm.ClientAlgorithm``
subclass) and a server side (``fedlt.federation.strategy.FedLTStrategy`` subclass, i.e. a Flower strategy)
and exposes the server class as ``Server``; ``Server.client_cls`` is its client side. No algorithm imports Ray
or knows how it is run."""

from __future__ import annotations

import importlib

STRATEGIES = ("fedavg", "fedprox")


def get_strategy(name: str):
    """The server class of strategy ``name`` (its client side is ``.client_cls``)."""
    if name not in STRATEGIES:
        raise KeyError(f"unknown strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
    return importlib.import_module(f"strategies.{name}").Server
