"""``fedlt-bench``: how much the simulator costs on top of the learning itself.

One invocation, the same run config three times, each in a fresh child process of its own (so that no path's
memory figure carries what an earlier path left in the heap, and each is measured on its own process tree):

* **flower** -- fedlt's real path (``fedlt.experiment.run``: Flower ServerApp/ClientApp, Ray actors,
  messages, run directory, TensorBoard);
* **bare** -- the same round loop and client step in one process (``fedlt.core.inprocess``): no Flower
  transport, no Ray, no run directory. The messages are the same objects, the client step the same function;
* **plain** -- a deliberately minimal plain-PyTorch loop (``fedlt.bench_plain``) doing the same training work.

Flower and bare do the same arithmetic, so their metrics must agree (``results_match``); their timing ratio
then measures only the simulator: messaging, serialization, actor start-up, Ray. Memory is the peak over time of
the whole tree's PSS (driver, Ray's daemons, actors): PSS splits pages that several processes share (libraries,
the memory-mapped dataset) between them, where RSS would count them once per process. One JSON line goes to
stdout.

Usage::

    fedlt-bench [--bare-threads N] [--keep DIR] [hydra overrides ...]
    fedlt-bench --mode flower [overrides]                         # the Flower path alone (e.g. 1,000 clients)
    fedlt-bench --mode updates [--device cpu|cuda] [overrides]   # client updates/s: sequential vs client_batching
    fedlt-bench --mode gpu-check [--device cuda]                  # updates/s + a fractional-GPU Flower run

Without overrides it benchmarks the reduced FedLoGe preset on CIFAR-10-LT where those exist (see
``DEFAULTS``), else FedAvg on Fashion-MNIST-LT.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedlt.config import clients_per_round

# The benchmark's preferred workload, used for every key the user does not override: FedLoGe on CIFAR-10-LT,
# 40 clients, 30 % participation, the reduced CPU preset (issue #8). Entries whose config files do not exist
# (yet) are dropped, with FedAvg on Fashion-MNIST-LT as the fallback.
DEFAULTS = [("strategy", "fedloge"), ("dataset", "cifar10_lt"), ("experiment", "cifar10_lt_cpu"),
            ("num_clients", "40"), ("participation", "0.3"), ("num_rounds", "20")]
FALLBACK = [("strategy", "fedavg"), ("dataset", "fmnist_lt")]


# --------------------------------------------------------------------------------------------- config
def _config_dir() -> Path:
    from fedlt.compose import CONFIG_DIR

    return Path(CONFIG_DIR)


def default_overrides(user: list[str]) -> list[str]:
    """The benchmark's defaults for the keys the user did not set, restricted to what this checkout has."""
    root = _config_dir()
    given = {o.split("=", 1)[0].lstrip("+~") for o in user}

    def exists(key: str, value: str) -> bool:
        if key in ("strategy", "dataset", "experiment"):
            return (root / key / f"{value}.yaml").exists()
        return True

    preferred = [(k, v) for k, v in DEFAULTS if exists(k, v)]
    if user:  # the preset (and its round count) only for a bare `fedlt-bench`: it would clash with e.g. model.*
        preferred = [(k, v) for k, v in preferred if k not in ("experiment", "num_rounds")]
    have = {k for k, _ in preferred}
    if not {"strategy", "dataset"} <= have:  # the FedLoGe/CIFAR workload is not in this checkout yet
        preferred = [(k, v) for k, v in preferred if k not in ("strategy", "dataset", "experiment")] + FALLBACK
    return [f"{k}={v}" for k, v in preferred if k not in given] + list(user)


def compose(overrides: list[str]) -> dict:
    """Hydra-compose ``configs/`` with the overrides and validate it, exactly as ``fedlt`` would."""
    from fedlt.compose import compose as compose_validated

    return compose_validated(overrides, job_name="fedlt-bench")


# --------------------------------------------------------------------------------------------- memory
def process_tree(root: int | None = None) -> list[int]:
    """``root`` and all its descendants (Ray's GCS, raylet and actor processes are children of the driver)."""
    from fedlt.flower.ray_backend import descendants

    root = os.getpid() if root is None else root
    return [root, *descendants(root)]


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree_cpu_s(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each process."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, IndexError, ValueError):
            continue
    return out


def tree_memory_mb(root: int | None = None, pids: list[int] | None = None) -> tuple[float, float]:
    """(RSS, PSS) of the whole process tree in MB. RSS counts shared pages (torch libraries, memory-mapped
    data) once per process; PSS splits them, so it is the better "how much memory does this need"."""
    rss = pss = 0
    for pid in pids if pids is not None else process_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


class MemorySampler:
    """Peak RSS/PSS and CPU seconds of this process tree (Ray daemons and actors included), sampled in a
    background thread. CPU seconds barely depend on how loaded the machine is, unlike wall time, so
    ``cpu_s`` is the steadier overhead figure on a shared box."""

    def __init__(self, interval: float = 1.0, root: int | None = None):  # reading smaps of every Ray process
        # costs ~10 % of a core at 0.25 s
        self.interval, self.peak_rss, self.peak_pss, self.root = interval, 0.0, 0.0, root
        self._cpu_start = tree_cpu_s([os.getpid() if root is None else root])
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = process_tree(self.root)
        rss, pss = tree_memory_mb(pids=pids)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        for pid, c in tree_cpu_s(pids).items():
            self._cpu[pid] = max(self._cpu.get(pid, 0.0), c)

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the tree since the sampler started (processes that ended between two samples lose
        at most their last interval)."""
        return sum(self._cpu.values()) - sum(self._cpu_start.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ------------------------------------------------------------------------------------ in-process run
class _RoundTimes:
    """A run logger that only records when each round ended (the in-process run writes no files)."""

    def __init__(self) -> None:
        self.ends: dict[int, float] = {}

    def train_round(self, rnd: int, values: dict) -> None:
        self.ends[rnd] = time.monotonic()

    def eval_round(self, row: dict, detail: dict | None = None) -> None:
        self.ends[int(row["round"])] = time.monotonic()

    def close(self) -> None:
        pass


def bare_run(cfg: dict, threads: int | None = None) -> dict:
    """The same run as fedlt's Flower path, in this process: fedlt's own round loop and client step over the
    in-process grid (:mod:`fedlt.core.inprocess`), no Flower transport, no Ray. Returns timings and metrics."""
    import torch

    from fedlt.core.client_step import configure_torch, handle, runtime
    from fedlt.core.inprocess import InProcessGrid
    from fedlt.core.rounds import RunOutcome, run_rounds
    from fedlt.experiment import prepare_run
    from strategies import get_strategy

    t0 = time.monotonic()
    b = cfg["backend"]
    client_b = {**b, "torch_threads": int(threads or b.get("torch_threads") or 1)}
    server_b = {**b, "torch_threads": int(b.get("server_threads") or 1)}
    plan, _split, _source = prepare_run(cfg, None)
    server_cls = get_strategy(cfg["strategy"]["name"])
    rt = runtime(cfg, plan, server_cls.client_cls)

    def as_client(msg, context):
        configure_torch(client_b)
        try:
            return handle(rt, msg, context)
        finally:
            configure_torch(server_b)

    configure_torch(server_b)
    strategy = server_cls(cfg)
    outcome = RunOutcome(strategy=strategy)
    times = _RoundTimes()
    t_setup = time.monotonic() - t0
    t_first = time.monotonic()
    run_rounds(strategy, InProcessGrid(as_client, int(cfg["num_clients"])), cfg, plan, times, outcome)
    ends = [times.ends[r] for r in sorted(times.ends)]
    rounds = [e - s for s, e in zip([t_first, *ends[:-1]], ends, strict=True)]
    torch.set_num_threads(int(server_b["torch_threads"]))
    return {"round_s": rounds, "end_to_end_s": time.monotonic() - t0, "setup_s": t_setup, "rows": outcome.rows,
            "final_arrays": outcome.final_arrays}


# --------------------------------------------------------------------------------------- flower path
def _tb_round_ends(run_dir: Path) -> dict[int, float]:
    """Wall-clock time at which each round's last scalar was logged (train scalars every round, evaluation
    scalars on evaluated rounds): the end of that round as the user sees it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    ends: dict[int, float] = {}
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            ends[ev.step] = max(ends.get(ev.step, 0.0), ev.wall_time)
    return ends


def _tb_scalar(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {ev.step: ev.value for ev in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def flower_run(cfg: dict, run_dir: Path) -> dict:
    """fedlt's own run (the `fedlt` command minus Hydra's CLI), timed from the outside."""
    from fedlt.experiment import run

    t_wall, t0 = time.time(), time.monotonic()
    results = run(cfg, run_dir)
    e2e = time.monotonic() - t0
    ends = _tb_round_ends(run_dir)
    train_s = _tb_scalar(run_dir, "time/train_s")
    rounds = sorted(ends)
    # round r (r >= 2) lasts from the end of round r-1 to its own end; round 1 starts when its training starts
    first_start = ends[rounds[0]] - train_s.get(rounds[0], 0.0) if rounds else t_wall
    round_s = [ends[r] - (ends[r - 1] if r - 1 in ends else first_start) for r in rounds]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"round_s": round_s, "end_to_end_s": e2e, "time_to_first_round_s": first_start - t_wall,
            "time_to_first_update_s": (ends[rounds[0]] - t_wall) if rounds else float("nan"), "rows": rows,
            "results": results}


# ------------------------------------------------------------------------------------------ reporting
def machine_info() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    import torch

    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def steady(values: list[float]) -> list[float]:
    """Rounds after the first (the first pays actor start-up and imports)."""
    return values[1:] if len(values) > 1 else values


def compare_rows(flower_rows: list[dict], bare_rows: list[dict],
                 keys=("generic/accuracy", "personalized/accuracy")) -> tuple[bool, float]:
    """Same metrics on every evaluated round? Returns (match, largest absolute difference)."""
    worst = 0.0
    if [r["round"] for r in flower_rows] != [r["round"] for r in bare_rows]:
        return False, float("inf")
    for fr, br in zip(flower_rows, bare_rows, strict=True):
        for k in keys:
            if k in fr or k in br:
                if fr.get(k) is None or br.get(k) is None:
                    return False, float("inf")
                worst = max(worst, abs(float(fr[k]) - float(br[k])))
    return worst <= 1e-6, worst


def _train_rounds(round_s: list[float], cfg: dict) -> list[float]:
    """Steady training-only rounds: after the first, without evaluated rounds."""
    from fedlt.core.rounds import is_eval_round

    rounds = [t for r, t in enumerate(round_s, start=1) if r > 1 and not is_eval_round(r, cfg)]
    return rounds or steady(round_s)


def _tb_work(run_dir: Path) -> dict[str, list[int]]:
    return {tag: [int(v) for _, v in sorted(_tb_scalar(run_dir, tag).items())]
            for tag in ("train/samples", "train/steps")}


def plain_run(cfg: dict, threads: int | None = None) -> dict | None:
    """The same rounds as a deliberately minimal plain-PyTorch loop (``fedlt.bench_plain``): fedlt only
    prepares the arrays, the split, the sampled clients and a fresh model; None for methods it does not do."""
    import numpy as np
    import torch

    from fedlt.bench_plain import plain_rounds
    from fedlt.core.model import build_run_model
    from fedlt.data.federated import open_plan
    from fedlt.experiment import prepare_run
    from strategies import get_strategy

    method = cfg["strategy"]["name"]
    if method not in ("fedavg", "fedloge"):
        return None
    plan, split, _ = prepare_run(cfg, None)
    source, _ = open_plan(plan)
    clients = [(np.array(source.train_x[idx]), np.array(source.train_y[idx], dtype=np.int64))
               for idx in split.client_train]
    server_cls = get_strategy(method)
    server = server_cls(cfg)
    model = build_run_model(cfg, plan, server_cls.client_cls)
    server.initial_arrays(model)
    if server.frozen:
        model.load_state_dict(server.frozen, strict=False)
    sampled = [server.sample_clients(r) for r in range(1, int(cfg["num_rounds"]) + 1)]
    old = torch.get_num_threads()
    torch.set_num_threads(int(threads or cfg["backend"].get("torch_threads") or 1))
    try:
        o = cfg["optimizer"]
        return plain_rounds(model, clients, sampled, method, int(cfg["local_epochs"]), int(cfg["batch_size"]),
                            float(o["lr"]), float(o["momentum"]), float(o["weight_decay"]), plan.mean, plan.std,
                            int(plan.augment_padding), bool(plan.augment_hflip), seed=int(cfg["seed"]))
    finally:
        torch.set_num_threads(old)


def one_path(path: str, cfg: dict, bare_threads: int | None, keep: str | None) -> dict | None:
    """What a child process of :func:`compare` runs and prints: one path's results, JSON-safe."""
    from fedlt.flower.simulation import quiet_flower

    quiet_flower("ERROR")
    if path == "bare":
        out = bare_run(cfg, bare_threads)
        out.pop("final_arrays", None)
        return out
    if path == "flower":
        return flower_run(cfg, Path(keep))
    return plain_run(cfg, bare_threads)


def _child(path: str, overrides: list[str], bare_threads: int | None = None,
           keep: str | None = None) -> tuple[dict | None, MemorySampler]:
    """Run one path in a fresh ``python -m fedlt.bench --one PATH`` process; sample that process tree's memory."""
    import subprocess

    cmd = [sys.executable, "-m", "fedlt.bench", "--one", path,
           *(["--bare-threads", str(bare_threads)] if bare_threads else []), *(["--keep", keep] if keep else []),
           *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with MemorySampler(root=proc.pid) as mem:
        stdout, _ = proc.communicate()
    lines = stdout.splitlines()
    for line in lines[:-1]:  # the run's own console lines
        print(line, file=sys.stderr)
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"fedlt-bench: the {path} path failed (exit {proc.returncode}); its output is above")
    return json.loads(lines[-1]), mem


def compare(cfg: dict, bare_threads: int | None, keep: str | None, overrides: list[str] | None = None) -> dict:
    """Bare, Flower and plain runs of ``cfg`` (composed from ``overrides``), each in a fresh child process."""
    overrides = list(overrides or [])
    run_dir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="fedlt-bench-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    bare, bare_mem = _child("bare", overrides, bare_threads)
    flower, flower_mem = _child("flower", overrides, keep=str(run_dir))
    plain, plain_mem = _child("plain", overrides, bare_threads)
    match, diff = compare_rows(flower["rows"], bare["rows"])
    f_steady, b_steady = statistics.median(steady(flower["round_s"])), statistics.median(steady(bare["round_s"]))
    b = cfg["backend"]
    work = _tb_work(run_dir)
    out = {
        "steady_round_ratio": round(f_steady / b_steady, 3),
        "end_to_end_ratio": round(flower["end_to_end_s"] / bare["end_to_end_s"], 3),
        "first_round_s": round(flower["round_s"][0], 2),
        "time_to_first_round_s": round(flower["time_to_first_round_s"], 2),
        "time_to_first_update_s": round(flower["time_to_first_update_s"], 2),
        "flower_steady_round_s": round(f_steady, 3),
        "bare_steady_round_s": round(b_steady, 3),
        "flower_end_to_end_s": round(flower["end_to_end_s"], 2),
        "bare_end_to_end_s": round(bare["end_to_end_s"], 2),
        "flower_round_s": [round(v, 3) for v in flower["round_s"]],
        "bare_round_s": [round(v, 3) for v in bare["round_s"]],
        "peak_rss_mb": round(flower_mem.peak_rss), "peak_pss_mb": round(flower_mem.peak_pss),
        "bare_peak_rss_mb": round(bare_mem.peak_rss), "bare_peak_pss_mb": round(bare_mem.peak_pss),
        "flower_cpu_s": round(flower_mem.cpu_s, 1), "bare_cpu_s": round(bare_mem.cpu_s, 1),
        "cpu_ratio": round(flower_mem.cpu_s / max(bare_mem.cpu_s, 1e-9), 3),
        "results_match": match, "max_metric_diff": diff,
        "generic_accuracy": flower["rows"][-1].get("generic/accuracy") if flower["rows"] else None,
        "personalized_accuracy": flower["rows"][-1].get("personalized/accuracy") if flower["rows"] else None,
        "strategy": cfg["strategy"]["name"], "dataset": cfg["dataset"]["name"], "model": cfg["model"]["name"],
        "clients": int(cfg["num_clients"]),
        "sampled_per_round": clients_per_round(cfg["num_clients"], cfg["participation"]),
        "rounds": int(cfg["num_rounds"]), "eval_every": int(cfg["eval"]["every"]),
        "num_cpus_per_client": float(b["num_cpus_per_client"]), "torch_threads": int(b.get("torch_threads") or 1),
        "bare_threads": int(bare_threads or b.get("torch_threads") or 1),
        "device": _device_name(cfg),
        "machine": machine_info(),
    }
    if plain is not None:
        p_steady = statistics.median(_train_rounds(plain["round_s"], cfg))
        f_train = statistics.median(_train_rounds(flower["round_s"], cfg))
        out.update({
            "flower_vs_plain_steady_round": round(f_train / p_steady, 3),
            "bare_vs_plain_steady_round": round(statistics.median(_train_rounds(bare["round_s"], cfg)) / p_steady, 3),
            "plain_steady_round_s": round(p_steady, 3), "flower_steady_train_round_s": round(f_train, 3),
            "plain_peak_rss_mb": round(plain_mem.peak_rss), "plain_peak_pss_mb": round(plain_mem.peak_pss),
            "plain_cpu_s": round(plain_mem.cpu_s, 1),  # includes imports and data preparation, as bare_cpu_s does
            "bare_vs_plain_cpu": round(bare_mem.cpu_s / max(plain_mem.cpu_s, 1e-9), 3),
            "flower_vs_plain_peak_pss": round(flower_mem.peak_pss / max(plain_mem.peak_pss, 1e-9), 3),
            "flower_vs_plain_peak_rss": round(flower_mem.peak_rss / max(plain_mem.peak_rss, 1e-9), 3),
            "plain_samples_per_round": plain["samples"], "plain_steps_per_round": plain["steps"],
            "flower_samples_per_round": work.get("train/samples"), "flower_steps_per_round": work.get("train/steps"),
        })
    if keep:
        out["run_dir"] = str(run_dir)
    else:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def flower_only(cfg: dict, keep: str | None) -> dict:
    """Only fedlt's Flower path (scale checks: many clients), with per-round times and whole-tree memory."""
    from fedlt.flower.simulation import quiet_flower

    quiet_flower("ERROR")
    run_dir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="fedlt-bench-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    with MemorySampler() as mem:
        flower = flower_run(cfg, run_dir)
    train_s = _tb_scalar(run_dir, "time/train_s")
    rounds = flower["round_s"]
    out = {
        "mode": "flower", "clients": int(cfg["num_clients"]),
        "sampled_per_round": clients_per_round(cfg["num_clients"], cfg["participation"]),
        "rounds": int(cfg["num_rounds"]), "eval_every": int(cfg["eval"]["every"]),
        "steady_round_s": round(statistics.median(steady(rounds)), 3),
        "train_s": [round(train_s[r], 3) for r in sorted(train_s)],
        "round_s": [round(v, 3) for v in rounds],
        "time_to_first_round_s": round(flower["time_to_first_round_s"], 2),
        "end_to_end_s": round(flower["end_to_end_s"], 2),
        "peak_rss_mb": round(mem.peak_rss), "peak_pss_mb": round(mem.peak_pss), "cpu_s": round(mem.cpu_s, 1),
        "generic_accuracy": flower["rows"][-1].get("generic/accuracy") if flower["rows"] else None,
        "personalized_accuracy": flower["rows"][-1].get("personalized/accuracy") if flower["rows"] else None,
        "strategy": cfg["strategy"]["name"], "dataset": cfg["dataset"]["name"], "model": cfg["model"]["name"],
        "device": _device_name(cfg), "machine": machine_info(),
    }
    if not keep:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def _device_name(cfg: dict) -> str:
    from fedlt.core.client_step import device_for

    return device_for(cfg["backend"])


# -------------------------------------------------------------------------------- client batching
def updates_benchmark(cfg: dict, fractional: bool = False, repeats: int = 3) -> dict:
    """Client updates per second: the sampled clients of round 1 trained one after another (what a client
    actor does per message) vs together with :func:`train_cohort`; plus, with ``fractional``, fedlt's Flower
    path with fractional GPUs per client (on a CPU-only machine: the same run on the CPU)."""
    import math

    import torch

    from fedlt.api.client import ClientContext
    from fedlt.core.client_step import client_view, configure_torch, device_for
    from fedlt.core.client_step import train_group
    from fedlt.core.cohort import unsupported_reasons
    from fedlt.core.model import build_run_model
    from fedlt.data.federated import prepare
    from fedlt.seeding import INIT, TRAIN, derive_seed, torch_generator
    from strategies import get_strategy

    reasons = unsupported_reasons(get_strategy(cfg["strategy"]["name"]), cfg)
    device = device_for(cfg["backend"])
    configure_torch(cfg["backend"])
    plan, _, _ = prepare(cfg)
    server_cls = get_strategy(cfg["strategy"]["name"])
    algo = server_cls.client_cls(cfg)
    torch.manual_seed(derive_seed(int(cfg["seed"]), INIT))
    model = build_run_model(cfg, plan, server_cls.client_cls).to(device)
    model.load_state_dict(server_cls(cfg).frozen_arrays(model), strict=False)  # e.g. FedLoGe's SSE-C
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    clients = server_cls(cfg).sample_clients(1)
    budget = float(cfg["backend"].get("client_data_cache_mb", 64))
    datas = [client_view(plan, c, budget) for c in clients]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def sequential() -> list[dict]:
        out = []
        for c, d in zip(clients, datas, strict=True):
            model.load_state_dict(start)
            ctx = ClientContext(model=model, data=d, cfg=cfg, round=1,
                                generator=torch_generator(int(cfg["seed"]), TRAIN, 1, c), device=device)
            algo.train(ctx)
            out.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        sync()
        return out

    def batched() -> list[dict]:
        gens = [torch_generator(int(cfg["seed"]), TRAIN, 1, c) for c in clients]
        states, _, _ = train_group(algo, model, start, [({}, {})] * len(clients), datas, gens, cfg, 1, device)
        sync()  # train_group: what a train.cohort message runs (the strategy's batched hooks, first round)
        return states

    result: dict = {"mode": "updates", "strategy": cfg["strategy"]["name"], "dataset": cfg["dataset"]["name"],
                    "model": cfg["model"]["name"], "device": device, "clients_per_update_batch": len(clients),
                    "steps_per_client_mean": None}
    seq_times, seq_states = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        seq_states = sequential()
        seq_times.append(time.perf_counter() - t0)
    result["sequential_updates_per_s"] = round(len(clients) / min(seq_times), 3)
    if reasons:
        result["client_batching"] = "unsupported: " + "; ".join(reasons)
    else:
        bat_times, bat_states = [], None
        for _ in range(repeats + 1):  # the first call compiles vmap's batching rules: not timed
            t0 = time.perf_counter()
            bat_states = batched()
            bat_times.append(time.perf_counter() - t0)
        best = min(bat_times[1:])
        result["batched_updates_per_s"] = round(len(clients) / best, 3)
        result["batched_speedup"] = round(min(seq_times) / best, 2)
        result["max_abs_weight_diff"] = max(float((a[k].double() - b[k].double()).abs().max())
                                            for a, b in zip(seq_states, bat_states, strict=True) for k in a)
    steps = [math.ceil(d.num_train / int(cfg["batch_size"])) * int(cfg["local_epochs"]) for d in datas]
    result["steps_per_client_mean"] = round(sum(steps) / len(steps), 1)
    # the batched run takes as many steps as its longest client: even if a step of every client cost what one
    # client's step costs, the speed-up could not exceed sum(steps) / max(steps) (the lanes' critical path)
    result["steps_per_client_max"] = max(steps, default=0)
    result["critical_path_bound"] = round(sum(steps) / max(max(steps, default=0), 1), 1)
    if fractional:
        result["fractional_gpu_run"] = _fractional_run(cfg, device)
    return result


def _fractional_run(cfg: dict, device: str) -> dict:
    """fedlt's Flower path with 4 clients per GPU (num_gpus_per_client=0.25); CPU-only: the same run on CPU."""
    import tempfile

    try:
        import ray  # noqa: F401
    except ImportError:
        return {"skipped": "ray is not installed here"}
    from fedlt.experiment import run

    b = dict(cfg["backend"])
    on_gpu = device.startswith("cuda")
    b["num_gpus_per_client"] = 0.25 if on_gpu else 0.0
    if on_gpu:
        b["num_cpus_per_client"] = min(float(b["num_cpus_per_client"]), 1.0)
    run_cfg = {**cfg, "backend": b, "eval": {**cfg["eval"], "every": 0}}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedlt-gpucheck-") as d:
        res = run(run_cfg, Path(d))
    sampled = clients_per_round(cfg["num_clients"], cfg["participation"])
    return {"num_gpus_per_client": b["num_gpus_per_client"], "device": device, "wall_s": round(time.monotonic() - t0, 2),
            "rounds": res.get("rounds_completed"), "generic_accuracy": res.get("generic/accuracy"),
            "client_updates": sampled * int(res.get("rounds_completed") or 0)}


# ------------------------------------------------------------------------------------------------ CLI
def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="fedlt-bench", description=__doc__.split("\n\n")[0],
                                epilog="Any other argument is a Hydra override (key=value), as for `fedlt`.")
    p.add_argument("--mode", choices=("compare", "flower", "updates", "gpu-check"), default="compare",
                   help="compare: Flower path vs bare loop (default); flower: the Flower path only (scale runs); "
                        "updates: client updates/s, sequential vs client_batching; gpu-check: updates plus a "
                        "fractional-GPU Flower run")
    p.add_argument("--bare-threads", type=int, default=None,
                   help="torch threads of the bare loop's clients (default: backend.torch_threads, i.e. what "
                        "each client actor uses)")
    p.add_argument("--device", default=None, help="cpu or cuda (sets backend.device)")
    p.add_argument("--keep", default=None, help="keep the Flower run's directory here")
    p.add_argument("--one", choices=("bare", "flower", "plain"), default=None, help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    for k, v in {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_DEDUP_LOGS": "0"}.items():
        os.environ.setdefault(k, v)
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        print(f"fedlt-bench: error: unrecognised argument {bad[0]!r}: expected --option or a Hydra override "
              f"key=value", file=sys.stderr)
        sys.exit(2)
    if args.device:
        overrides = [*overrides, f"backend.device={args.device}"]
    from fedlt.cli import user_errors

    try:
        cfg = compose(default_overrides(overrides))
        if args.one:  # a child process of compare(): one path, its results as JSON
            out = one_path(args.one, cfg, args.bare_threads, args.keep)
        elif args.mode == "compare":
            out = compare(cfg, args.bare_threads, args.keep, default_overrides(overrides))
        elif args.mode == "flower":
            out = flower_only(cfg, args.keep)
        else:
            out = updates_benchmark(cfg, fractional=args.mode == "gpu-check")
            out["machine"] = machine_info()
    except user_errors() as e:
        print(f"fedlt-bench: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(json.dumps(out), flush=True)
    os._exit(0)  # Ray/Flower can leave non-daemon threads behind


if __name__ == "__main__":
    main()
