"""Hydra composition of ``configs/`` outside the ``fedlt`` command (``fedlt-bench``, ``fedlt-data``, ``flwr run``,
tests): the same config folder, overrides and validation as ``fedlt`` itself."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = os.environ.get("FEDLT_CONFIG_DIR") or str(Path(__file__).resolve().parent.parent / "configs")


def compose_resolved(overrides: list[str], job_name: str = "fedlt") -> dict:
    """The resolved config (a plain dict) `fedlt` would build from these command-line overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name=job_name):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def compose(overrides: list[str], job_name: str = "fedlt") -> dict:
    """:func:`compose_resolved`, validated exactly as ``fedlt`` validates it."""
    from fedlt.validate import validate

    return validate(compose_resolved(overrides, job_name))
