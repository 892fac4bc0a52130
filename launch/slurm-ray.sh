#!/usr/bin/env bash
# Run fedlt on a SLURM allocation: one Ray head on the first node, one Ray worker per other node, then fedlt
# attached to that cluster (backend=ray_cluster). Submit with e.g.
#
#   sbatch --nodes=3 --gpus-per-node=4 --cpus-per-task=32 launch/slurm-ray.sh \
#          strategy=fedloge dataset=cifar10_lt num_clients=100 backend.num_gpus_per_client=0.25
#
# Everything after the script name is passed to `fedlt` as Hydra overrides. The job stops exactly the Ray
# processes it started (by PID, through srun), never other users' Ray.
#SBATCH --job-name=fedlt
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=fedlt-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
VENV=${FEDLT_VENV:-$PWD/.venv}
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export RAY_USAGE_STATS_ENABLED=0 FLWR_TELEMETRY_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{print $1}')
port=${RAY_PORT:-6379}
cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
gpus=$(srun --nodes=1 --ntasks=1 -w "$head_node" bash -c 'nvidia-smi -L 2>/dev/null | wc -l')
tmp=${RAY_TMPDIR:-/tmp/ray-$SLURM_JOB_ID}   # short path: Ray's unix sockets live below it

echo "fedlt: Ray head on $head_node ($head_ip:$port), ${#nodes[@]} node(s), $cpus CPUs and $gpus GPUs each"
srun --nodes=1 --ntasks=1 -w "$head_node" \
  ray start --head --node-ip-address="$head_ip" --port="$port" --num-cpus="$cpus" --num-gpus="$gpus" \
            --include-dashboard=false --disable-usage-stats --temp-dir="$tmp" --block &
pids=($!)
sleep 15
for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" \
    ray start --address="$head_ip:$port" --num-cpus="$cpus" --num-gpus="$gpus" --disable-usage-stats --block &
  pids+=($!)
done
sleep 10

status=0
fedlt backend=ray_cluster backend.address="$head_ip:$port" "$@" || status=$?

# `ray start --block` exits and stops its node's Ray processes when its srun step is terminated
kill "${pids[@]}" 2>/dev/null || true
wait "${pids[@]}" 2>/dev/null || true
exit $status
