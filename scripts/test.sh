#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: `bash scripts/test.sh [pytest args...]`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup.sh | tail -n 1)
# shellcheck disable=SC1091
. "$VENV/.fedlt-env"
exec "$VENV/bin/python" -m pytest -q --durations=15 "$@"
