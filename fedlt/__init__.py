"""fedlt: a federated long-tailed learning simulator (Flower + Ray + Hydra + PyTorch)."""

import os as _os

# Quiet, offline-friendly defaults for Flower and Ray, set before either is imported: no telemetry, update check or
# usage stats, no run-time dependency installation by `flwr run` (it would otherwise `uv sync` the project's
# dependencies), no Ray accelerator-env FutureWarning, no Hugging Face hub access.
for _k, _v in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}.items():
    _os.environ.setdefault(_k, _v)

__version__ = "0.1.0"
