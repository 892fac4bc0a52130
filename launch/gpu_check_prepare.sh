#!/usr/bin/env bash
# Prepare a bare GPU machine's run of launch/gpu_check.sh (e.g. through a remote-run tool that copies the
# working tree): the Python packages fedlt needs that a plain CUDA+PyTorch image lacks, as Python 3.12 wheels in
# .whl/, and the Fashion-MNIST files in .gpudata/fashion-mnist/ (both gitignored, ~40 MB). Then on the GPU machine:
#
#   FEDLT_DATA_ROOT=$PWD/.gpudata FEDLT_CACHE_DIR=/tmp/fedlt-cache PYTHON=python3 bash launch/gpu_check.sh
#
# Ray (for the fractional-GPU Flower run) is too large to carry this way; that part is then reported as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
mkdir -p .whl .gpudata/fashion-mnist
get() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
          --abi abi3 --abi cp312 --abi none -d .whl "$@"; }
v() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
for p in flwr hydra-core omegaconf iterators grpcio-health-checking dill pycparser cryptography cffi pycryptodome; do
  get "$p==$(v "$p")"
done
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(v antlr4-python3-runtime)"
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpudata/fashion-mnist/ 2>/dev/null \
  || echo "gpu_check_prepare: Fashion-MNIST not found in /usr/share/datasets/fashion-mnist; copy the four IDX files to .gpudata/fashion-mnist/" >&2
du -sh .whl .gpudata
