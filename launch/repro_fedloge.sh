#!/usr/bin/env bash
# FedLoGe and FedAvg at the official CIFAR-10-LT setting (preset fedloge_cifar10_a0.5_if100_p0.2: ResNet-18, IF 100,
# Dirichlet alpha 0.5, 40 clients, participation 0.2, 5 local epochs, batch 8, SGD 0.03 / 0.5, seed 3407, the
# official split) for R rounds with eval.every=5, then fedlt's generic accuracy against the authors' logged curve
# (official repository ZackZikaiXiao/FedLoGe, log/b_ours.log and log/b_fedavg.log) at rounds 5/10/15/20/30/60/100/200
# (those <= R): a table on stdout, OUT/curves.json and OUT/curves.csv, the runs in OUT/runs/<method>/.
#
#   bash launch/repro_fedloge.sh --rounds 100 --parallel backend.num_gpus_per_client=0.25   # on a GPU
#   bash launch/repro_fedloge.sh --rounds 20 --out runs/repro/r20    # CPU: hours (ResNet-18, ~500 s a round on 2 cores)
#   bash launch/repro_fedloge.sh --table-only --out runs/repro/r20                           # the table again
#
# Options: see `python -m fedlt.repro --help` (the same as the fedlt-repro command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" -m fedlt.repro "$@"
