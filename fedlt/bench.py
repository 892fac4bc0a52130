"""``fedlt-bench``: how much the simulator costs on top of the learning itself.

One invocation, one process, the same run config twice:

* **flower** -- fedlt's real path (``fedlt.federation.simulation.run``: Flower ServerApp/ClientApp, Ray actors,
  messages, run directory, TensorBoard);
* **bare** -- a plain PyTorch loop written here, with no Flower messaging and no Ray: the same split, the same
  sampled clients per round, the same client-side code (the strategy's ``train`` / ``predictors`` called
  in-process on one model, with the same per-(seed, round, client) generators), the same server-side hooks
  (``aggregate_train`` / ``merge`` / ``after_aggregate`` on in-process replies) and the same evaluation.

Both paths do the same arithmetic, so their metrics must agree (``results_match``); the timing ratio then
measures only the simulator: messaging, serialization, actor start-up, Ray. One JSON line goes to stdout.

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

# The benchmark's preferred workload, used for every key the user does not override: FedLoGe on CIFAR-10-LT,
# 40 clients, 30 % participation, the reduced CPU preset (issue #8). Entries whose config files do not exist
# (yet) are dropped, with FedAvg on Fashion-MNIST-LT as the fallback.
DEFAULTS = [("strategy", "fedloge"), ("dataset", "cifar10_lt"), ("experiment", "cifar10_lt_cpu"),
            ("num_clients", "40"), ("participation", "0.3"), ("num_rounds", "20")]
FALLBACK = [("strategy", "fedavg"), ("dataset", "fmnist_lt")]


# --------------------------------------------------------------------------------------------- config
def _config_dir() -> Path:
    from fedlt.cli import CONFIG_DIR

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
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from fedlt.config import validate

    with initialize_config_dir(config_dir=str(_config_dir()), version_base="1.3", job_name="fedlt-bench"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return validate(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))


# --------------------------------------------------------------------------------------------- memory
def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def process_tree(root: int | None = None) -> list[int]:
    """``root`` and all its descendants (Ray's GCS, raylet and actor processes are children of the driver)."""
    root = os.getpid() if root is None else root
    children, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


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

    def __init__(self, interval: float = 1.0):  # reading smaps of every Ray process costs ~10 % of a core at 0.25 s
        self.interval, self.peak_rss, self.peak_pss = interval, 0.0, 0.0
        self._cpu_start = tree_cpu_s([os.getpid()])
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = process_tree()
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


# ----------------------------------------------------------------------------------------- bare loop
class _Reply:
    """An in-process stand-in for a reply Message: what the strategy's server hooks read (no messaging)."""

    def __init__(self, content):
        self.content = content

    def has_error(self) -> bool:
        return False


def _client_glue():
    """The ClientApp's per-message steps, without Flower: reset -> frozen -> global -> personal, call the
    algorithm, keep personal state. Mirrors fedlt.federation.client_app (kept in step by results_match)."""
    import torch

    from fedlt.federation.algorithm import ClientContext
    from fedlt.federation.client_app import client_view
    from fedlt.seeding import derive_seed, torch_generator

    def context(model, init_state, frozen, global_sd, personal, state, plan, cfg, cid, rnd, purpose, device):
        model.load_state_dict(init_state)
        for sd in (frozen, global_sd, personal.get(cid)):
            if sd:
                model.load_state_dict(sd, strict=False)
        torch.manual_seed(derive_seed(int(cfg["seed"]), purpose, rnd, cid))
        data = client_view(plan, cid, float(cfg["backend"].get("client_data_cache_mb", 512)))
        return ClientContext(model=model, data=data, cfg=cfg, round=rnd,
                             generator=torch_generator(int(cfg["seed"]), purpose, rnd, cid),
                             state=dict(state.get(cid, {})), device=device)

    return context


def bare_run(cfg: dict, threads: int | None = None) -> dict:
    """The same run as fedlt's Flower path, as a plain loop in this process. Returns timings and metrics."""
    import torch
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from fedlt.data.federated import global_test, prepare
    from fedlt.eval.predict import absent_class_mask, apply_mask, class_counts, predict_logits
    from fedlt.federation.client_app import configure_torch, device_for
    from fedlt.federation.model import build_run_model
    from fedlt.federation.server_app import is_eval_round
    from fedlt.federation.strategy import has_prefix
    from fedlt.seeding import EVAL, INIT, TRAIN, derive_seed
    from strategies import get_strategy

    t0 = time.monotonic()
    b = cfg["backend"]
    client_threads = int(threads or b.get("torch_threads") or 1)
    server_threads = int(b.get("server_threads") or 1)
    plan, _split, _source = prepare(cfg)
    server_cls = get_strategy(cfg["strategy"]["name"])
    strategy = server_cls(cfg)
    algo_cls = server_cls.client_cls
    algo = algo_cls(cfg)
    device = device_for(b)
    configure_torch({**b, "torch_threads": server_threads})
    torch.manual_seed(derive_seed(int(cfg["seed"]), INIT))
    server_model = build_run_model(cfg, plan, algo_cls)
    arrays = strategy.initial_arrays(server_model)
    frozen = {k: v.clone() for k, v in strategy.frozen.items()}
    test_x, test_y = global_test(plan)
    torch.manual_seed(derive_seed(int(cfg["seed"]), INIT))
    model = build_run_model(cfg, plan, algo_cls).to(device)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    personal: dict[int, dict] = {}
    state: dict[int, dict] = {}
    context = _client_glue()
    k_cls = plan.num_classes
    rounds, rows = [], []
    t_setup = time.monotonic() - t0
    for rnd in range(1, int(cfg["num_rounds"]) + 1):
        t_round = time.monotonic()
        configure_torch({**b, "torch_threads": client_threads})
        global_sd = arrays.to_torch_state_dict()
        replies = []
        for cid in strategy.sample_clients(rnd):
            ctx = context(model, init_state, frozen, global_sd, personal, state, plan, cfg, cid, rnd, TRAIN, device)
            metrics = algo.train(ctx)
            sd = model.state_dict()
            shared = {k: v.detach().cpu().clone() for k, v in sd.items()
                      if not has_prefix(k, algo.personal_prefixes) and not has_prefix(k, algo.frozen_prefixes)}
            mine = {k: v.detach().cpu().clone() for k, v in sd.items() if has_prefix(k, algo.personal_prefixes)}
            if mine:
                personal[cid] = mine
            if ctx.state:
                state[cid] = {k: v.detach().cpu().clone() for k, v in ctx.state.items()}
            record = {k: float(v) for k, v in metrics.items()}
            record.update({"num-examples": ctx.data.num_train, "client-id": cid})
            replies.append(_Reply(RecordDict({"arrays": ArrayRecord(shared), "metrics": MetricRecord(record)})))
        configure_torch({**b, "torch_threads": server_threads})
        agg, _ = strategy.aggregate_train(rnd, replies)
        arrays = strategy.after_aggregate(rnd, strategy.merge(arrays, agg), replies)
        row: dict = {"round": rnd}
        if is_eval_round(rnd, cfg):
            server_model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            if strategy.frozen:
                server_model.load_state_dict(strategy.frozen, strict=False)
            gen, _ = strategy.generic_metrics(server_model, test_x, test_y, k_cls, int(cfg["eval"]["batch_size"]))
            row.update(gen)
            configure_torch({**b, "torch_threads": client_threads})
            global_sd = arrays.to_torch_state_dict()
            ev = []
            for cid in range(int(cfg["num_clients"])):
                ctx = context(model, init_state, frozen, global_sd, personal, state, plan, cfg, cid, rnd, EVAL,
                              device)
                data = ctx.data
                mask = absent_class_mask(data.test_counts)
                record = {"num-examples": int(data.test_y.numel()), "client-id": cid,
                          "total": data.test_counts.tolist()}
                for name, fn in algo.predictors(ctx).items():
                    logits = predict_logits(fn, data.test_x, int(cfg["eval"]["batch_size"]), device)
                    for variant, lg in (("unmasked", logits), ("masked", apply_mask(logits, mask))):
                        counts = class_counts(lg, data.test_y, k_cls)
                        record[f"{name}/{variant}/correct"] = counts["correct"]
                        record[f"{name}/{variant}/predicted"] = counts["predicted"]
                ev.append(_Reply(RecordDict({"metrics": MetricRecord(record)})))
            pers, _ = strategy.personalized_metrics(ev, bool(cfg["eval"]["mask_absent_classes"]))
            row.update(pers)
            rows.append(row)
        rounds.append(time.monotonic() - t_round)
    return {"round_s": rounds, "end_to_end_s": time.monotonic() - t0, "setup_s": t_setup, "rows": rows,
            "final_arrays": arrays}


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
    from fedlt.federation.simulation import run

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


def compare(cfg: dict, bare_threads: int | None, keep: str | None) -> dict:
    from fedlt.federation.simulation import quiet_flower

    quiet_flower("ERROR")
    with MemorySampler() as bare_mem:
        bare = bare_run(cfg, bare_threads)
    run_dir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="fedlt-bench-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    with MemorySampler() as flower_mem:
        flower = flower_run(cfg, run_dir)
    match, diff = compare_rows(flower["rows"], bare["rows"])
    f_steady, b_steady = statistics.median(steady(flower["round_s"])), statistics.median(steady(bare["round_s"]))
    b = cfg["backend"]
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
        "bare_peak_rss_mb": round(bare_mem.peak_rss),
        "flower_cpu_s": round(flower_mem.cpu_s, 1), "bare_cpu_s": round(bare_mem.cpu_s, 1),
        "cpu_ratio": round(flower_mem.cpu_s / max(bare_mem.cpu_s, 1e-9), 3),
        "results_match": match, "max_metric_diff": diff,
        "generic_accuracy": flower["rows"][-1].get("generic/accuracy") if flower["rows"] else None,
        "personalized_accuracy": flower["rows"][-1].get("personalized/accuracy") if flower["rows"] else None,
        "strategy": cfg["strategy"]["name"], "dataset": cfg["dataset"]["name"], "model": cfg["model"]["name"],
        "clients": int(cfg["num_clients"]),
        "sampled_per_round": max(int(float(cfg["participation"]) * int(cfg["num_clients"])), 1),
        "rounds": int(cfg["num_rounds"]), "eval_every": int(cfg["eval"]["every"]),
        "num_cpus_per_client": float(b["num_cpus_per_client"]), "torch_threads": int(b.get("torch_threads") or 1),
        "bare_threads": int(bare_threads or b.get("torch_threads") or 1),
        "device": _device_name(cfg),
        "machine": machine_info(),
    }
    if keep:
        out["run_dir"] = str(run_dir)
    else:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def flower_only(cfg: dict, keep: str | None) -> dict:
    """Only fedlt's Flower path (scale checks: many clients), with per-round times and whole-tree memory."""
    from fedlt.federation.simulation import quiet_flower

    quiet_flower("ERROR")
    run_dir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="fedlt-bench-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    with MemorySampler() as mem:
        flower = flower_run(cfg, run_dir)
    train_s = _tb_scalar(run_dir, "time/train_s")
    rounds = flower["round_s"]
    out = {
        "mode": "flower", "clients": int(cfg["num_clients"]),
        "sampled_per_round": max(int(float(cfg["participation"]) * int(cfg["num_clients"])), 1),
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
    from fedlt.federation.client_app import device_for

    return device_for(cfg["backend"])


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
        if args.mode == "compare":
            out = compare(cfg, args.bare_threads, args.keep)
        elif args.mode == "flower":
            out = flower_only(cfg, args.keep)
        else:
            from fedlt.federation import batched

            out = batched.updates_benchmark(cfg, fractional=args.mode == "gpu-check")
            out["machine"] = machine_info()
    except user_errors() as e:
        print(f"fedlt-bench: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(json.dumps(out), flush=True)
    os._exit(0)  # Ray/Flower can leave non-daemon threads behind (flower-notes.md pitfall 5)


if __name__ == "__main__":
    main()
