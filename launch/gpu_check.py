"""The sections of launch/gpu_check.sh (read its header first): data, env, (a) fractional-GPU run, (b) client
updates/s table, (c) official curves. Each runs in its own process group under a time box; its figures go to
JSON under --out, its output to --out/logs/<section>.log; a failed or timed-out section is recorded as such and
the next one runs. Ends with a summary table (stdout, summary.txt) and summary.json.

    python launch/gpu_check.py --device cuda|cpu --out DIR [--started EPOCH_S]    (what gpu_check.sh runs)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEDLT = [sys.executable, "-c", "import sys; from fedlt.cli import main; sys.argv[0] = 'fedlt'; sys.exit(main())"]
FEDLT_DATA = [sys.executable, "-c", "import sys; from fedlt.data_cli import main; sys.argv[0] = 'fedlt-data'; main()"]
OFFICIAL_SPLIT_HEAD = [215, 141, 207, 171, 243]  # the official FedLoGe split's first client sizes (README "Datasets")
PRESET = "fedloge_cifar10_a0.5_if100_p0.2"


# -------------------------------------------------------------------------------------------- sizes
def sizes(device: str, cifar: Path | None) -> dict:
    """What each section runs: the GPU sizes, or a tiny CPU version of the same path."""
    gpu = device != "cpu"
    if not gpu:
        data = ["dataset=synthetic_lt", "dataset.num_classes=10", "dataset.train_per_class=60",
                "dataset.test_per_class=10"]
    elif cifar is not None:
        data = ["dataset=cifar10_lt", f"dataset.path={cifar}"]
    else:
        data = ["dataset=synthetic_lt"]
    small = ["model=cnn", "model.width=8", "model.feature_dim=32"] if not gpu else []
    frac = [f"backend.device={device}", f"backend.num_gpus_per_client={0.25 if gpu else 0}"]
    a = ["strategy=fedavg", *data, "partition.min_samples_per_client=0", "local_epochs=1", "batch_size=32",
         "eval.every=0", "checkpoint.every=0", *frac,
         *(["model=resnet8", "num_clients=40", "participation=0.5", "num_rounds=4", "backend.server_threads=8"] if gpu
           else [*small, "num_clients=4", "participation=0.5", "num_rounds=1"])]
    cohorts = [(40, 0.5), (200, 0.5), (400, 1.0)] if gpu else [(4, 0.5), (10, 0.5), (20, 1.0)]
    partitions = [("iid", ["partition=iid"]),
                  ("dirichlet0.5", ["partition=dirichlet", "partition.alpha=0.5",
                                    "partition.min_samples_per_client=0"])]
    width = ["model.width=16", "model.feature_dim=64"] if gpu else small[1:]
    b_base = ["strategy=fedavg", *data, "model=cnn", *width, "local_epochs=1", "batch_size=32", "num_rounds=3",
              f"backend.device={device}"]
    b = [{"label": f"{int(n * p)} of {n}, {name}", "num_clients": n, "participation": p, "partition": name,
          "overrides": [*b_base, f"num_clients={n}", f"participation={p}", *pov]}
         for name, pov in partitions for n, p in cohorts]
    n, p = cohorts[-1]  # the largest IID cohort once more, its vectorised step under bf16 autocast (fp32 weights)
    b.append({"label": f"{int(n * p)} of {n}, iid, bf16 autocast", "num_clients": n, "participation": p,
              "partition": "iid", "overrides": [*b_base, f"num_clients={n}", f"participation={p}", "partition=iid",
                                                "backend.client_batching=true", "backend.batched_autocast=bf16"]})
    if gpu:
        c = [f"dataset.path={cifar}"] if cifar is not None else []
        c += [*frac, "backend.num_cpus=8", "backend.server_threads=8"]  # the server evaluates on the CPU
    else:
        c = [*data, *small, "num_clients=4", "participation=0.5", "local_epochs=1", "batch_size=32",
             "fedloge:strategy.refine_steps=100", *frac]
    rounds = int(os.environ.get("ROUNDS") or (100 if gpu else 5))
    return {"a": a, "b": b, "c": c, "rounds": rounds}


# ------------------------------------------------------------------------------------ process helpers
class Section:
    """One time-boxed step: its status, wall time, error and figures, written to summary.json."""

    def __init__(self, name: str, title: str, out: Path):
        self.name, self.title, self.out = name, title, out
        self.status, self.error, self.wall_s, self.result = "not run", None, 0.0, {}
        self.log = out / "logs" / f"{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)

    def record(self) -> dict:
        return {"title": self.title, "status": self.status, "wall_s": round(self.wall_s, 1), "error": self.error,
                "log": str(self.log.relative_to(self.out)), **self.result}


def run_boxed(cmd: list[str], log: Path, box_s: float, term_grace_s: float = 20.0,
              env: dict | None = None) -> tuple[int | None, bool, str]:
    """Run ``cmd`` in its own session with output to ``log``; past ``box_s`` SIGTERM it, past ``term_grace_s`` more
    SIGKILL its process group. Returns (exit code, timed out, stdout+stderr tail)."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                             env={**os.environ, **(env or {})})
        timed_out = False
        try:
            p.wait(timeout=max(box_s, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _killpg(p, signal.SIGTERM)
            try:
                p.wait(timeout=term_grace_s)
            except subprocess.TimeoutExpired:
                _killpg(p, signal.SIGKILL)
                p.wait()
    _killpg(p, signal.SIGKILL)  # whatever the section left in its group (e.g. a Ray daemon)
    return p.returncode, timed_out, tail(log)


def _killpg(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class GpuSampler(threading.Thread):
    """Every ``every_s`` seconds: ``nvidia-smi --query-compute-apps=pid,used_memory`` (the processes holding a CUDA
    context -- the client actors of a fractional-GPU run -- and their memory), the GPU's memory in use and
    utilisation, and (as seen from inside a container, where nvidia-smi may list no process) the Ray actor
    processes of this machine that have the CUDA driver library mapped."""

    APPS = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    GPU = ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"]

    def __init__(self, csv_path: Path, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.csv_path, self.every_s = csv_path, every_s
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, int, int]] = []
        self.gpu: list[tuple[float, int, int]] = []
        self.cuda_actors: list[tuple[float, int]] = []
        self.names: dict[int, str] = {}
        self.error: str | None = None if shutil.which("nvidia-smi") else "nvidia-smi not found"

    def _smi(self, cmd: list[str]) -> list[list[str]]:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise OSError(f"nvidia-smi exited {r.returncode}: {(r.stderr or r.stdout).strip()[:300]}")
        return [[x.strip() for x in ln.split(",")] for ln in r.stdout.strip().splitlines() if ln.strip()]

    def run(self) -> None:
        t0 = time.monotonic()
        n = 0
        while not self.stop_event.is_set():
            t = round(time.monotonic() - t0, 1)
            if self.error is None:
                try:
                    for parts in self._smi(self.APPS):
                        if len(parts) == 2 and parts[0].isdigit():
                            pid = int(parts[0])
                            self.samples.append((t, pid, int(parts[1]) if parts[1].isdigit() else -1))
                            self.names.setdefault(pid, _proc_name(pid))
                    for parts in self._smi(self.GPU)[:1]:
                        self.gpu.append((t, *(int(x) if x.isdigit() else -1 for x in parts[:2])))
                except (OSError, subprocess.TimeoutExpired) as e:
                    self.error = str(e)
            if n % 3 == 0:
                for pid in _ray_actors_with_cuda():
                    self.cuda_actors.append((t, pid))
                    self.names.setdefault(pid, _proc_name(pid))
            n += 1
            self.stop_event.wait(self.every_s)

    def finish(self) -> dict:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=15)
        with open(self.csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t_s", "pid", "used_memory_mib", "process"])
            for t, pid, mem in self.samples:
                w.writerow([t, pid, mem, self.names.get(pid, "")])

        def most_at_once(pairs) -> int:
            per_t: dict[float, set] = {}
            for t, pid in pairs:
                per_t.setdefault(t, set()).add(pid)
            return max((len(v) for v in per_t.values()), default=0)

        procs = {}
        for _, pid, mem in self.samples:
            d = procs.setdefault(pid, {"process": self.names.get(pid, ""), "max_used_memory_mib": 0, "samples": 0})
            d["max_used_memory_mib"] = max(d["max_used_memory_mib"], mem)
            d["samples"] += 1
        return {"error": self.error, "samples": len({t for t, _, _ in self.samples}),
                "max_processes_at_once": most_at_once((t, pid) for t, pid, _ in self.samples),
                "processes": {str(k): v for k, v in procs.items()}, "csv": self.csv_path.name,
                "gpu_memory_used_mib_max": max((m for _, m, _ in self.gpu), default=None),
                "gpu_utilization_pct_max": max((u for _, _, u in self.gpu), default=None),
                "gpu_utilization_pct_mean": round(sum(u for _, _, u in self.gpu) / len(self.gpu), 1) if self.gpu
                else None,
                "ray_actors_with_cuda_at_once": most_at_once(self.cuda_actors),
                "ray_actors_with_cuda": sorted({self.names.get(pid, str(pid)) for _, pid in self.cuda_actors})[:20]}


def _ray_actors_with_cuda() -> list[int]:
    """Ray worker processes (``ray::...``) of this machine with libcuda mapped (a CUDA context)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if not (d / "cmdline").read_bytes().startswith(b"ray::"):
                continue
            with open(d / "maps", "rb") as f:
                if any(b"libcuda.so" in line for line in f):
                    out.append(int(d.name))
        except OSError:
            continue
    return out


def _proc_name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        return raw[:120]
    except OSError:
        return "(not visible from this container)"


# ---------------------------------------------------------------------------------------------- sections
def section_env(sec: Section, box: float) -> None:
    code = r"""
import importlib, importlib.metadata as md, json, platform, sys
out = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
except Exception as e:
    out["torch_error"] = repr(e)
mods = {}
for dist, mod in [("flwr", "flwr"), ("ray", "ray"), ("hydra-core", "hydra"), ("omegaconf", "omegaconf"),
                  ("numpy", "numpy"), ("pillow", "PIL"), ("tensorboard", "tensorboard"), ("rich", "rich"),
                  ("protobuf", "google.protobuf"), ("grpcio", "grpc"), ("scipy", "scipy"), ("msgpack", "msgpack"),
                  ("cryptography", "cryptography"), ("matplotlib", "matplotlib"), ("scikit-learn", "sklearn")]:
    try:
        m = importlib.import_module(mod)
        mods[dist] = {"version": md.version(dist), "from": getattr(m, "__file__", None)}
    except Exception as e:
        mods[dist] = {"error": f"{type(e).__name__}: {e}"[:200]}
out["modules"] = mods
print("ENV_JSON " + json.dumps(out))
"""
    rc, timed_out, _ = run_boxed([sys.executable, "-c", code], sec.log, box)
    lines = [ln for ln in sec.log.read_text().splitlines() if ln.startswith("ENV_JSON ")]
    if lines:
        sec.result = json.loads(lines[-1][len("ENV_JSON "):])
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        sec.result["nvidia_smi_L"] = r.stdout.strip()
    finish(sec, rc, timed_out)
    write_json(sec.out / "env.json", sec.result)


def section_data(sec: Section, box: float, work: Path) -> Path | None:
    """Rebuild the carried CIFAR-10-LT zip, decode it into the cache and check the split is the official one."""
    packed = ROOT / ".gpudata" / "cifar10-lt.zip"
    if not packed.exists():
        sec.status, sec.error = "skipped", f"{packed.relative_to(ROOT)} not carried: sections use synthetic data"
        return None
    t0 = time.monotonic()
    full = work / "cifar10-lt-full.zip"
    rc, timed_out, _ = run_boxed([sys.executable, str(ROOT / "launch" / "cifar10_lt_subset.py"), "unpack",
                                  str(packed), str(full)], sec.log, box)
    if rc != 0:
        finish(sec, rc, timed_out)
        return None
    out_json = work / "split.json"
    with open(out_json, "w") as f:
        p = subprocess.Popen([*FEDLT_DATA, f"experiment={PRESET}", f"dataset.path={full}"], stdout=f,
                             stderr=open(sec.log, "a"), cwd=ROOT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(box - (time.monotonic() - t0), 5))
            timed_out = False
        except subprocess.TimeoutExpired:
            _killpg(p, signal.SIGKILL)
            rc, timed_out = p.wait(), True
    if rc == 0:
        s = json.loads(out_json.read_text())
        sizes_ = s.get("client_train_sizes", [])
        sec.result = {"zip": str(full), "source": s.get("source_info", {}).get("sha256"),
                      "train_images": sum(sizes_), "clients": len(sizes_),
                      "official_split": sizes_[:5] == OFFICIAL_SPLIT_HEAD and sum(sizes_) == 12406,
                      "client_train_sizes_head": sizes_[:10]}
        if not sec.result["official_split"]:
            rc, sec.error = 1, f"the split is not the official one: client sizes {sizes_[:5]}, {sum(sizes_)} images"
    finish(sec, rc, timed_out)
    write_json(sec.out / "data.json", sec.result)
    return full if sec.status == "ok" else None


def section_a(sec: Section, box: float, overrides: list[str], work: Path) -> None:
    run_dir = work / "a_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    sampler = GpuSampler(sec.out / "a_nvidia_smi.csv")
    sampler.start()
    rc, timed_out, _ = run_boxed([*FEDLT, *overrides, f"hydra.run.dir={run_dir}"], sec.log, box)
    gpu = sampler.finish()
    res = _read_json(run_dir / "results.json") or {}
    frac = next((o.split("=", 1)[1] for o in overrides if o.startswith("backend.num_gpus_per_client=")), None)
    sec.result = {"num_gpus_per_client": float(frac) if frac else None, "overrides": overrides,
                  "rounds": res.get("rounds_completed"), "generic_accuracy": res.get("generic/accuracy"),
                  "personalized_accuracy": res.get("personalized/accuracy"),
                  "run_wall_s": res.get("time/total_s") or res.get("wall_s"), "nvidia_smi": gpu}
    finish(sec, rc, timed_out)
    write_json(sec.out / "a_fractional.json", sec.result)


def section_b(sec: Section, box: float, cells: list[dict]) -> None:
    lines = sec.out / "b_throughput.jsonl"
    lines.unlink(missing_ok=True)
    cells_file = sec.out / "logs" / "b_cells.json"
    write_json(cells_file, cells)
    rc, timed_out, _ = run_boxed([sys.executable, str(Path(__file__).resolve()), "_throughput", str(cells_file),
                                  str(lines)], sec.log, box, term_grace_s=5)
    rows = [json.loads(ln) for ln in lines.read_text().splitlines()] if lines.exists() else []
    sec.result = {"rows": rows, "cells_done": sum("error" not in r for r in rows), "cells": len(cells)}
    if rc == 0 and sec.result["cells_done"] < len(cells):
        rc, sec.error = 1, "; ".join(r["error"][:200] for r in rows if "error" in r) or "cells missing"
    finish(sec, rc, timed_out)
    write_json(sec.out / "b_throughput.json", sec.result)


def throughput_worker(cells_file: str, lines_file: str) -> None:
    """(b), in its own process: fedlt-bench's updates benchmark for each cell, one JSON line per cell."""
    from fedlt import bench

    for cell in json.loads(Path(cells_file).read_text()):
        t0 = time.monotonic()
        try:
            cfg = bench.compose(bench.default_overrides(list(cell["overrides"])))
            r = bench.updates_benchmark(cfg)
            row = {"label": cell["label"], "num_clients": cell["num_clients"], "participation": cell["participation"],
                   "partition": cell["partition"], **{k: v for k, v in r.items() if k != "machine"}}
        except Exception as e:  # noqa: BLE001 -- one failing cell must not lose the others
            row = {"label": cell["label"], "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        row["wall_s"] = round(time.monotonic() - t0, 1)
        with open(lines_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)


def section_c(sec: Section, box: float, overrides: list[str], rounds: int, work: Path) -> None:
    repro_out = work / "c_repro"
    shutil.rmtree(repro_out, ignore_errors=True)
    grace = 60.0 if box > 180 else 20.0
    limit = max(box - grace - 15, 10)
    sampler = GpuSampler(sec.out / "c_nvidia_smi.csv", every_s=5.0)
    sampler.start()
    rc, timed_out, _ = run_boxed([sys.executable, "-m", "fedlt.repro", "--rounds", str(rounds), "--parallel",
                                  "--time-limit", str(int(limit)), "--grace", str(int(grace - 10)),
                                  "--out", str(repro_out), *overrides], sec.log, box, term_grace_s=10)
    for pid in (_read_json(repro_out / "run_pids.json") or {}).values():  # runs left by a killed fedlt-repro
        try:
            os.killpg(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if not (repro_out / "curves.json").exists() and (repro_out / "runs").exists():  # the table from what they wrote
        run_boxed([sys.executable, "-m", "fedlt.repro", "--table-only", "--rounds", str(rounds), "--out",
                   str(repro_out), *overrides], sec.log, 60)
    gpu = sampler.finish()
    curves = _read_json(repro_out / "curves.json") or {}
    for name in ("curves.json", "curves.csv"):
        if (repro_out / name).exists():
            shutil.copy(repro_out / name, sec.out / f"c_{name}")
    for m in ("fedloge", "fedavg"):  # the runs' records (not their checkpoints: too large to bring back)
        dst = sec.out / "c_runs" / m
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "results.json", "config.yaml", "partition.json"):
            if (repro_out / "runs" / m / name).exists():
                shutil.copy(repro_out / "runs" / m / name, dst / name)
        if (repro_out / f"{m}.log").exists():
            shutil.copy(repro_out / f"{m}.log", sec.out / "logs" / f"c_{m}.log")
    runs = curves.get("runs", {})
    stopped = [m for m, s in runs.items() if s.get("stopped_at_time_limit")]
    sec.result = {"rounds_requested": rounds, "time_limit_s": int(limit), "overrides": overrides,
                  "rounds_evaluated": curves.get("rounds_evaluated"), "runs": runs, "stopped_at_time_limit": stopped,
                  "table": curves.get("rows"), "nvidia_smi": gpu}
    if rc == 0 and not any(curves.get("rounds_evaluated", {}).values()):
        rc, sec.error = 1, "no evaluated round: see logs/c_fedloge.log and logs/c_fedavg.log"
    finish(sec, rc, timed_out)
    write_json(sec.out / "c_official_curves.json", sec.result)


def finish(sec: Section, rc: int | None, timed_out: bool) -> None:
    if rc == 0 and not timed_out:
        sec.status = "ok"
        return
    text = tail(sec.log, 3000)
    last = next((ln for ln in reversed(text.splitlines()) if ln.strip() and not ln.startswith("$ ")), "")
    sec.status = "timeout" if timed_out else "failed"
    sec.error = sec.error or (f"stopped at its time box: {last}" if timed_out else f"exit code {rc}: {last}")
    sec.result["log_tail"] = text


# ------------------------------------------------------------------------------------------------ summary
def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))


def one_line(sec: Section) -> str:
    r = sec.result
    if sec.status == "skipped" and sec.name != "install":
        return (sec.error or "").splitlines()[0] if sec.error else ""
    try:
        if sec.name == "install":
            return (f"{len(r.get('installed', []))} wheels installed ({r.get('how', '')[:20]}), "
                    f"{len(r.get('skipped', {}))} already on the image" if r.get("status") == "ok" else
                    str(r.get("reason", "")))
        if sec.name == "env":
            return (f"{r.get('gpu', 'no GPU')}; torch {r.get('torch')} CUDA {r.get('torch_cuda')}; "
                    f"Python {r.get('python')}")
        if sec.name == "data":
            return (f"CIFAR-10-LT rebuilt: {r.get('train_images')} training images over {r.get('clients')} clients, "
                    f"official split: {r.get('official_split')}") if r else ""
        if sec.name == "a":
            g = r.get("nvidia_smi", {})
            mem = [p["max_used_memory_mib"] for p in g.get("processes", {}).values()]
            gpu = (f"{g.get('max_processes_at_once')} processes on the GPU at once (nvidia-smi, max {max(mem)} MiB "
                   f"each)" if mem else f"nvidia-smi: {g.get('error') or 'no process listed'}")
            gpu += f"; {g.get('ray_actors_with_cuda_at_once')} Ray actors with a CUDA context at once"
            return f"{gpu}; {r.get('rounds')} rounds, generic acc {r.get('generic_accuracy')}"
        if sec.name == "b":
            return f"{r.get('cells_done')}/{r.get('cells')} cells (table below)"
        if sec.name == "c":
            ev = r.get("rounds_evaluated") or {}
            return ", ".join(f"{m} evaluated up to round {max(v) if v else 0}" for m, v in ev.items()) + \
                (f" (stopped at the time limit: {', '.join(r['stopped_at_time_limit'])})"
                 if r.get("stopped_at_time_limit") else "")
    except Exception as e:  # noqa: BLE001 -- the summary must print whatever a section left
        return f"(summary failed: {e})"
    return ""


def b_table(rows: list[dict]) -> str:
    head = ["clients trained together (of total, partition)", "mean / max local steps", "sequential /s",
            "batched /s", "speed-up", "bound", "max |w diff|"]
    out = [head]
    for r in rows:
        if "error" in r:
            out.append([r["label"], "error: " + r["error"][:60], "", "", "", "", ""])
            continue
        diff = r.get("max_abs_weight_diff")
        bf16 = ", bf16 autocast" if r["label"].endswith("bf16 autocast") else ""
        out.append([f"{r.get('clients_per_update_batch')} of {r['num_clients']}, {r['partition']}{bf16}",
                    f"{r.get('steps_per_client_mean')} / {r.get('steps_per_client_max')}",
                    str(r.get("sequential_updates_per_s")),
                    str(r.get("batched_updates_per_s", r.get("client_batching", "-"))),
                    f"{r['batched_speedup']}x" if "batched_speedup" in r else "-",
                    f"{r['critical_path_bound']}x" if "critical_path_bound" in r else "-",
                    f"{diff:.2e}" if isinstance(diff, float) else "-"])
    w = [max(len(row[i]) for row in out) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in out)


def summary(secs: list[Section], out: Path, device: str, total_s: float) -> str:
    lines = [f"== fedlt GPU check (device {device}): {total_s:.0f} s; figures in {out} =="]
    w = max(len(s.title) for s in secs)
    lines.append(f"{'section'.ljust(w)}  {'status':8}  {'wall s':>7}  result")
    for s in secs:
        lines.append(f"{s.title.ljust(w)}  {s.status:8}  {s.wall_s:7.1f}  {one_line(s)}")
    for s in secs:
        if s.error and s.status != "skipped":
            lines.append(f"-- {s.title}: {s.status}: {s.error.strip().splitlines()[0][:300]}")
    b = next((s for s in secs if s.name == "b"), None)
    if b and b.result.get("rows"):
        lines += ["", "(b) client updates per second, best of 3 (fedlt-bench --mode updates)",
                  b_table(b.result["rows"])]
    c = next((s for s in secs if s.name == "c"), None)
    if c and (out / "c_curves.json").exists():
        from fedlt.repro import format_table

        lines += ["", "(c) official curves (fedlt-repro)",
                  format_table(json.loads((out / "c_curves.json").read_text()))]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_throughput":
        throughput_worker(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--started", type=float, default=None, help="epoch seconds the check started (gpu_check.sh)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = args.started or time.time()
    gpu = args.device == "cuda"
    budget = float(os.environ.get("BUDGET_S") or (470 if gpu else 400))
    wanted = set((os.environ.get("SECTIONS") or "a,b,c").split(","))
    work = Path(os.environ.get("GPU_CHECK_WORK") or (Path("/tmp") / f"fedlt-gpu-check-{os.getpid()}"))
    work.mkdir(parents=True, exist_ok=True)
    if gpu:
        os.environ.setdefault("FEDLT_CACHE_DIR", str(work / "cache"))

    def left() -> float:
        return budget - (time.time() - started)

    install = Section("install", "install wheels", out)
    install.result = _read_json(out / "install.json") or {"status": "not recorded"}
    install.status = {"ok": "ok", "skipped": "skipped"}.get(install.result.get("status"), "failed")
    install.wall_s = float(install.result.get("wall_s") or 0)
    secs = [install]

    def boxed(sec: Section, fn, *a) -> object:
        t0 = time.monotonic()
        print(f"gpu_check: {sec.title} (time box {a[0]:.0f} s) ...", flush=True)
        try:
            return fn(sec, *a)
        except Exception as e:  # noqa: BLE001 -- recorded; the next section runs
            sec.status, sec.error = "failed", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
        finally:
            sec.wall_s = time.monotonic() - t0
            secs.append(sec)
            print(f"gpu_check: {sec.title}: {sec.status} ({sec.wall_s:.0f} s)", flush=True)
        return None

    cifar = None
    if gpu:
        cifar = boxed(Section("data", "data (CIFAR-10-LT)", out), section_data, min(150, left() / 3), work)
    boxed(Section("env", "environment", out), section_env, 90)
    plan = sizes(args.device, cifar)
    write_json(out / "plan.json", {"device": args.device, "budget_s": budget, **plan})
    a_box = float(os.environ.get("A_TIMEOUT_S") or (90 if gpu else 120))
    b_box = float(os.environ.get("B_TIMEOUT_S") or (110 if gpu else 120))
    for name, title, fn, box, extra in [
            ("a", "(a) fractional-GPU Flower run", section_a, a_box, (plan["a"], work)),
            ("b", "(b) client updates/s", section_b, b_box, (plan["b"],)),
            ("c", "(c) official curves", section_c, None, (plan["c"], plan["rounds"], work))]:
        sec = Section(name, title, out)
        if name not in wanted:
            sec.status, sec.error = "skipped", "not in SECTIONS"
            secs.append(sec)
            continue
        box = min(box, left() - 20) if box is not None else left() - 15
        if name == "c" and gpu and cifar is None:
            sec.status, sec.error = "skipped", "no CIFAR-10-LT (carry .gpudata/cifar10-lt.zip: gpu_check_prepare.sh)"
            secs.append(sec)
            continue
        if box < 20:
            sec.status, sec.error = "skipped", f"no time left in BUDGET_S={budget:.0f}"
            secs.append(sec)
            continue
        boxed(sec, fn, box, *extra)
    total = time.time() - started
    record = {"device": args.device, "total_s": round(total, 1), "budget_s": budget,
              "sections": {s.name: s.record() for s in secs}}
    write_json(out / "summary.json", record)
    text = summary(secs, out, args.device, total)
    (out / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    if not os.environ.get("GPU_CHECK_WORK"):
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s.status in ("ok", "skipped") for s in secs) else 1


if __name__ == "__main__":
    sys.exit(main())
