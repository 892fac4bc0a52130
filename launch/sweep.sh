#!/usr/bin/env bash
# A Hydra multirun sweep: every combination runs as its own fedlt run, one after another (Ray is started and
# stopped per run), each in runs/multirun/<date>/<time>/<n>_<strategy>_<dataset>/.
#
#   bash launch/sweep.sh                                   # the grid below
#   bash launch/sweep.sh seed=1,2,3 partition.alpha=0.1,0.5  # any other grid
#
# On a Ray cluster add backend=ray_cluster (and backend.address=HOST:PORT): every run attaches to the same cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FEDLT_VENV:-$PWD/.venv}
if [ "$#" -eq 0 ]; then
  set -- strategy=fedavg,fedprox seed=1,2,3 partition.alpha=0.5
fi
exec "$VENV/bin/fedlt" --multirun "$@"
