#!/usr/bin/env bash
# Prepare a bare GPU machine's run of launch/gpu_check.sh through a remote-run tool that copies the working tree
# plus named gitignored folders, at most 64 MiB per call, to a machine without network:
#
#   .whl/     Python 3.12 wheels (manylinux x86_64) of what fedlt needs that a plain CUDA + PyTorch image lacks:
#             flwr, hydra-core, ... (the set an earlier run found missing on such an image), what Flower's
#             simulation imports beyond that, Ray (the venv's version, repacked without ray/jars/ -- 31.8 MB of
#             Java workers --, the dashboard's web page and Ray's libraries above Ray Core, LZMA-compressed: 25 MB
#             instead of 74) and Ray's runtime requirements; every wheel is repacked (launch/repack_wheel.py);
#             gpu_check.sh installs fedlt's own (flwr, ray, hydra-core, ...) always, the rest only where missing
#   .gpudata/cifar10-lt.zip   CIFAR-10-LT (IF 100) for the official-curve check: the 12,406 long-tailed training
#             images and the 10,000 test images of the JPEG copy, byte for byte (21 MB), rebuilt on the machine
#             into a zip fedlt reads like the original (same images, same official split;
#             launch/cifar10_lt_subset.py)
#
# It prints the total (working tree + .whl + .gpudata) and fails if it is over LIMIT_MIB (default 60). Then:
#
#   bash launch/gpu_check.sh      # on the GPU machine, carrying .whl and .gpudata
#
# Usage: bash launch/gpu_check_prepare.sh [--no-test]   (--no-test: skip the install test of the Ray wheel)
# Environment: CIFAR10_ZIP (default $FEDLT_DATA_ROOT/cifar10-jpeg.zip), EXTRA_WHEELS ("name ..." more packages
# of the venv's versions, e.g. "tensorboard pillow" if the image lacks them and the budget allows),
# PY312 (a Python 3.12 for the install test; default: pyenv's, if any), PYVER (the GPU machine's Python, default
# 3.12), WHL_DIR (default .whl).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
LIMIT_MIB=${LIMIT_MIB:-60}
TEST=1; [ "${1:-}" = "--no-test" ] && TEST=0
PYVER=${PYVER:-3.12}        # the GPU machine's Python
WHL=${WHL_DIR:-.whl}
rm -rf "$WHL" && mkdir -p "$WHL" .gpudata
get() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
          --abi abi3 --abi "cp${PYVER/./}" --abi none -d "$WHL" "$@"; }
# a dependency: its pure-Python wheel where one exists (SQLAlchemy: 2.1 MB instead of 4.0), else the platform's
dep() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation py \
          --platform any --abi none -d "$WHL" "$@" 2>/dev/null || get "$@"; }
v() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

# fedlt's own needs missing on a plain CUDA + PyTorch image (what an earlier run of this check found missing)
for p in flwr hydra-core omegaconf iterators grpcio-health-checking dill pycparser cryptography cffi pycryptodome \
         ${EXTRA_WHEELS:-}; do
  get "$p==$(v "$p")"
done
"$PY" -m pip wheel -q --no-deps -w "$WHL" "antlr4-python3-runtime==$(v antlr4-python3-runtime)"
# Ray, for the fractional-GPU Flower run and the official-curve runs
RAY=$(v ray)
get "ray==$RAY"
# Ray's runtime requirements (pip show ray: click, filelock, jsonschema, msgpack, packaging, protobuf, pyyaml,
# requests) and theirs, except those every PyTorch image has (numpy, filelock, packaging, pyyaml, jinja2 come with
# torch). We cannot see the image: gpu_check.sh installs these only where the image lacks the package.
for p in click jsonschema attrs jsonschema-specifications referencing rpds-py msgpack protobuf requests certifi \
         charset-normalizer idna urllib3; do
  dep "$p==$(v "$p")"
done
# What Flower's simulation imports beyond `import flwr` (its in-memory SuperLink state, run config parsing):
# found by importing every Flower module fedlt uses under Python 3.12 next to the earlier list (a CUDA + PyTorch
# image with grpcio, protobuf, rich, typer, httpx, scipy); installed only where the image lacks them.
for p in tomli tomli-w pathspec sqlalchemy alembic mako fastapi starlette; do
  dep "$p==$(v "$p")"
done
# TensorBoard: fedlt writes every run's events with torch.utils.tensorboard, which needs the tensorboard package
# (not a torch dependency); carried without its web page (webfiles.zip, the projector's JS: 4.8 of 5.5 MB),
# installed only where the image lacks it
for p in tensorboard absl-py; do
  dep "$p==$(v "$p")"
done
# Ray without what fedlt never loads: the Java workers (ray/jars/, 31.8 MB), the dashboard's web page, and Ray's
# libraries on top of Ray Core (nothing in Ray Core, Flower or fedlt imports them; fedlt's runs use Ray Core only)
RAY_LIBRARIES=(rllib/ tune/ train/ serve/ data/ llm/ air/)
for w in "$WHL"/*.whl; do
  case $(basename "$w") in
    ray-*) extra=(--drop ray/jars/ --drop ray/dashboard/client/build/ "${RAY_LIBRARIES[@]/#/--drop=ray/}") ;;
    tensorboard-*) extra=(--drop tensorboard/webfiles.zip --drop tensorboard/plugins/projector/tf_projector_plugin/) ;;
    *) extra=() ;;
  esac
  nice -n 10 "$PY" launch/repack_wheel.py "$w" "${extra[@]}" >/dev/null
done

# CIFAR-10-LT (the long-tailed training images and the test set of the JPEG copy)
CIFAR10_ZIP=${CIFAR10_ZIP:-${FEDLT_DATA_ROOT:-/work/shared/data}/cifar10-jpeg.zip}
if [ -f "$CIFAR10_ZIP" ]; then
  "$PY" launch/cifar10_lt_subset.py pack "$CIFAR10_ZIP" .gpudata/cifar10-lt.zip
else
  echo "gpu_check_prepare: $CIFAR10_ZIP not found (set CIFAR10_ZIP): the official-curve check will fail" >&2
fi

# The install test: the repacked Ray wheel installs with pip (RECORD consistent), imports and runs an actor under
# Python 3.12, next to what every PyTorch image has (torch needs them; not carried) and every carried wheel
test_ray() {
  nice -n 15 "$PY312" -m pip install -q --no-cache-dir --target "$1/image" filelock packaging pyyaml \
    typing_extensions 2>/dev/null \
  && nice -n 15 "$PY312" -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --target "$1/site" \
    "$WHL"/*.whl \
  && PYTHONPATH=$1/site:$1/image RAY_USAGE_STATS_ENABLED=0 nice -n 15 "$PY312" -c "
import sys, ray
ray.init(num_cpus=1, include_dashboard=False, runtime_env={'env_vars': {'FEDLT_CHECK': '1'}})
@ray.remote(num_cpus=1)
class A:
    def f(self):
        import os
        return os.environ.get('FEDLT_CHECK')
assert ray.get(A.remote().f.remote()) == '1'
from ray.util.actor_pool import ActorPool
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.shutdown()
print('gpu_check_prepare: the repacked Ray', ray.__version__, 'installs with pip, imports and runs an actor (runtime_env'
      ' env_vars) under Python', sys.version.split()[0])"
}
FAIL=0
PY312=${PY312:-$(ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1 || true)}
if [ "$TEST" = 1 ] && [ -n "$PY312" ] && [ "$PYVER" = 3.12 ]; then
  t=$(mktemp -d)
  test_ray "$t" || { echo "gpu_check_prepare: ERROR: the carried Ray wheel failed its install test (above)" >&2; FAIL=1; }
  rm -rf "$t"
elif [ "$TEST" = 1 ]; then
  echo "gpu_check_prepare: no Python 3.12 here (set PY312): the Ray wheel's install test was skipped" >&2
fi

# What travels: the working tree (tracked + untracked, not ignored) and the two folders
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
whl=$(du -sb "$WHL" | cut -f1); data=$(du -sb .gpudata | cut -f1)
total=$((tree + whl + data))
ls -l "$WHL" .gpudata | awk 'NR>1 && NF>5 {printf "  %10d  %s\n", $5, $NF}'
awk -v t="$tree" -v w="$whl" -v d="$data" -v s="$total" -v lim="$LIMIT_MIB" 'BEGIN {
  printf "gpu_check_prepare: working tree %.1f MiB + .whl %.1f MiB + .gpudata %.1f MiB = %.1f MiB (limit %d MiB)\n",
         t/2^20, w/2^20, d/2^20, s/2^20, lim }'
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "gpu_check_prepare: ERROR: $((total / 1048576)) MiB is over the $LIMIT_MIB MiB limit (the transfer takes 64 MiB in all):" \
       "drop EXTRA_WHEELS or data" >&2
  exit 1
fi
exit $FAIL
