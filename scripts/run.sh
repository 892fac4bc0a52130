#!/usr/bin/env bash
# Set up (idempotent) and run one experiment: `bash scripts/run.sh [hydra overrides...]`.
# With no overrides this is the default experiment (Fashion-MNIST-LT, 20 clients, FedAvg, ~3 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup.sh | tail -n 1)
# shellcheck disable=SC1091
. "$VENV/.fedlt-env"
exec "$VENV/bin/fedlt" "$@"
