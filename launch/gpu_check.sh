#!/usr/bin/env bash
# GPU check for issue #8 (a few minutes): client updates per second of the one-client-at-a-time loop vs
# backend.client_batching (vmap over the sampled clients), their weight difference, and a fedlt run through
# Flower + Ray with fractional GPUs (4 clients per GPU). Prints one JSON line per cohort size (COHORTS).
#
#   bash launch/gpu_check.sh                 # on a GPU machine (device cuda)
#   bash launch/gpu_check.sh --device cpu    # anywhere: the same code on the CPU (what the tests run)
#   bash launch/gpu_check.sh --device cuda num_clients=200 participation=0.2   # extra Hydra overrides
#
# Python packages missing on a bare GPU image (flwr, hydra-core, ...) are installed from ./.whl if that folder
# exists (launch/gpu_check_prepare.sh fills it, and .gpudata/ with Fashion-MNIST); without Ray the
# fractional-GPU run is reported as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=$2; shift 2; fi

if ! "$PY" -c "import flwr, hydra" 2>/dev/null && [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fedlt-site .whl/*.whl
  export PYTHONPATH=/tmp/fedlt-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0

# a small model and many small clients: the regime client batching is for
dataset=fmnist_lt
[ -f configs/dataset/synthetic_lt.yaml ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
  && [ -z "${FEDLT_DATA_ROOT:-}" ] && dataset=synthetic_lt
# cohort sizes (num_clients:participation): 20, 100, 200 and 400 clients trained per vectorised call
for cohort in ${COHORTS:-40:0.5 200:0.5 400:0.5 400:1.0}; do
  "$PY" -m fedlt.bench --mode gpu-check --device "$DEVICE" strategy=fedavg dataset=$dataset model=cnn \
    model.width=16 model.feature_dim=64 num_clients=${cohort%%:*} participation=${cohort##*:} local_epochs=1 \
    batch_size=32 num_rounds=3 partition.min_samples_per_client=0 "$@"
done
