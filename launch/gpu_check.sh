#!/usr/bin/env bash
# The GPU check (issue #16), one call of at most ~8 minutes on a machine with one GPU and no network:
#
#   (a) a fractional-GPU Flower + Ray fedlt run (backend.num_gpus_per_client=0.25: four client actors share the
#       GPU), with `nvidia-smi --query-compute-apps=pid,used_memory` sampled while it runs (the actors' processes);
#   (b) client updates/s, one client at a time vs backend.client_batching, for 20 / 100 / 400 clients trained
#       together, IID and Dirichlet alpha 0.5 (fedlt-bench --mode updates: the gpu-check mode minus its Flower run);
#   (c) FedLoGe and FedAvg at the official CIFAR-10-LT setting (fedlt-repro) for as many rounds as fit, against
#       the authors' logged curves.
#
# Every section is time-boxed (a slow one cannot eat the others), a failing one is recorded with its error and
# the check goes on. Every figure is written as JSON under $OUT (default ./gpu_check_out); a summary table ends
# the output. launch/gpu_check_prepare.sh fills .whl/ (wheels the image lacks, Ray included) and .gpudata/
# (CIFAR-10-LT); carry both.
#
#   bash launch/gpu_check.sh                 # on the GPU machine
#   bash launch/gpu_check.sh --device cpu    # anywhere: the same path at a tiny size (what the test runs)
#
# Environment: OUT, BUDGET_S (whole check, default 470 s on cuda), ROUNDS (section c's cap, default 100 on cuda:
# the time box decides how many are done), SECTIONS (default a,b,c), A_TIMEOUT_S, B_TIMEOUT_S, PYTHON (default
# .venv/bin/python, else python3), WHL_DIR (default .whl), FEDLT_SITE (where wheels go, default /tmp/fedlt-site).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=$2; shift 2; fi
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0

# Install the carried wheels the image lacks (fedlt's own and Ray always, their dependencies only where missing)
SITE=${FEDLT_SITE:-/tmp/fedlt-site}
WHL=${WHL_DIR:-.whl}
if [ ! -d "$WHL" ]; then
  echo '{"status": "skipped", "reason": "no .whl folder (launch/gpu_check_prepare.sh makes it)"}' > "$OUT/install.json"
elif "$PY" -c "import flwr, hydra, ray" 2>/dev/null; then
  echo '{"status": "skipped", "reason": "flwr, hydra and ray import already"}' > "$OUT/install.json"
else
  timeout 180 "$PY" - "$SITE" "$OUT/install.json" "$WHL" <<'EOF' || echo "gpu_check: installing the wheels failed (see $OUT/install.json)" >&2
import importlib.metadata as md, json, subprocess, sys, time, zipfile
from pathlib import Path
site, out, whl = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
PRIMARY = {"flwr", "ray", "hydra_core", "omegaconf", "antlr4_python3_runtime", "iterators", "grpcio_health_checking"}
t0, chosen, skipped = time.time(), [], {}
for w in sorted(whl.glob("*.whl")):
    dist, version = w.name.split("-")[:2]
    try:
        have = md.version(dist.replace("_", "-"))
    except md.PackageNotFoundError:
        have = None
    if dist.lower() in PRIMARY or have is None:
        chosen.append(w)
    else:
        skipped[w.name] = f"the image has {dist} {have}"
site.mkdir(parents=True, exist_ok=True)
r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, chosen)], capture_output=True, text=True)
how = "pip"
if r.returncode != 0:  # no pip on the image: a wheel is a zip of what goes into site-packages
    how = f"zipfile (pip failed: {(r.stderr or r.stdout).strip()[-300:]})"
    for w in chosen:
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
    for exe in site.glob("ray/core/src/ray/*/*"):
        if exe.is_file() and exe.suffix == "":
            exe.chmod(0o755)
json.dump({"status": "ok", "how": how, "site": str(site), "installed": [w.name for w in chosen],
           "skipped": skipped, "wall_s": round(time.time() - t0, 1)}, open(out, "w"), indent=1)
print(f"gpu_check: installed {len(chosen)} wheels into {site} ({how.split(' ')[0]}), {len(skipped)} already on the image")
EOF
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" launch/gpu_check.py --device "$DEVICE" --out "$OUT" --started "$T0" "$@"
