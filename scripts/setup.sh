#!/usr/bin/env bash
# Idempotent setup for fedlt: a virtual environment in .venv (or $FEDLT_VENV, or the active one), PyTorch,
# the package with its test extras, and Fashion-MNIST from Debian where apt-get is available as root.
# Re-running it does nothing once pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

OWN_VENV=1
if [ -n "${VIRTUAL_ENV:-}" ] && [ -z "${FEDLT_VENV:-}" ]; then
  VENV="$VIRTUAL_ENV"                       # use the researcher's own active venv
  OWN_VENV=0
else
  VENV="${FEDLT_VENV:-.venv}"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating the virtual environment $VENV" >&2
  python3 -m venv "$VENV" 1>&2
fi
PY="$VENV/bin/python"

stamp="$VENV/.fedlt-setup-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  # PyTorch first, pinned: on the project's CI machines `torch==2.13.0` is a CPU build on local disk, while an
  # unpinned torch pulled in by a dependency would download a multi-GB CUDA build. Elsewhere pip takes it from
  # PyPI; a torch you installed yourself (any >= 2.2, e.g. a CUDA build) is kept.
  echo "setup: installing fedlt and its dependencies into $VENV (the first time takes ~2 min; later runs skip this)" >&2
  if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check "${FEDLT_TORCH_SPEC:-torch==2.13.0}" 1>&2
  fi
  "$PY" -m pip install -q --disable-pip-version-check -e ".[test]" 1>&2
  touch "$stamp"
fi

# Fashion-MNIST (the default experiment's data) from Debian's dataset-fashion-mnist package. Without apt (or
# root) the loader also finds it in $FEDLT_DATA_ROOT or downloads it with dataset.download=true.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)" >&2
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "setup: could not install dataset-fashion-mnist with apt-get; see README (Data)" >&2
fi

# The CIFAR copies beside the project (../shared/data on the project's machines) are used when present.
if [ -z "${FEDLT_DATA_ROOT:-}" ] && [ -d ../shared/data ]; then
  echo "export FEDLT_DATA_ROOT=$(cd ../shared/data && pwd)" > "$VENV/.fedlt-env"
else
  : > "$VENV/.fedlt-env"
fi
# `. .venv/bin/activate` then sees the same data location as scripts/run.sh (fedlt, fedlt-data, fedlt-report).
if [ "$OWN_VENV" = 1 ] && [ -f "$VENV/bin/activate" ] && ! grep -q "fedlt-env" "$VENV/bin/activate"; then
  printf '\n# fedlt: data location written by scripts/setup.sh\n[ -f "$VIRTUAL_ENV/.fedlt-env" ] && . "$VIRTUAL_ENV/.fedlt-env"\n' \
    >> "$VENV/bin/activate"
fi
echo "$VENV"
