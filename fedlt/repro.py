"""``fedlt-repro``: FedLoGe and FedAvg at the official CIFAR-10-LT setting for R rounds, compared round by round with
the authors' logged curves (``fedlt.eval.reference_curves``: the official repository's ``log/b_ours.log`` and
``log/b_fedavg.log``).

Each method is one ordinary ``fedlt`` run (Flower + Ray) of the preset ``fedloge_cifar10_a0.5_if100_p0.2``
(ResNet-18, IF 100, Dirichlet alpha 0.5, 40 clients, participation 0.2, 5 local epochs, batch 8, SGD 0.03 / 0.5,
seed 3407, the official split) with ``num_rounds=R eval.every=5``, in ``OUT/runs/<method>/``. Then a table of
fedlt's generic accuracy (FedLoGe: the SSE-C model, ``generic/sse_c/accuracy``, the number the authors log;
FedAvg: ``generic/accuracy``) against the authors' at rounds 5/10/15/20/30/60/100/200 (those <= R), with the
difference, goes to stdout, ``OUT/curves.json`` and ``OUT/curves.csv``.

Usage::

    fedlt-repro --rounds 20 [--out DIR] [--parallel] [--time-limit S] [hydra overrides for every run ...]
    fedlt-repro --rounds 100 backend.num_gpus_per_client=0.25          # on a GPU (4 client actors per GPU)
    fedlt-repro --table-only --out DIR                                  # only the table, from DIR/runs/*/

An override ``METHOD:key=value`` applies to that method only (``fedloge:strategy.gamma=1``).

``--time-limit S`` stops a run after S seconds the way ``fedlt`` stops on SIGTERM (it finishes the round, saves a
checkpoint and exits); the table then holds the rounds it evaluated. Overrides that change the setting (a
dataset, a model, fewer clients: e.g. a small CPU check) are allowed; the table then says it is not the official
setting.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedlt.eval.reference_curves import CURVES, LABELS, METRIC_KEYS, PRESET, SOURCE

METHODS = ("fedloge", "fedavg")
EVAL_EVERY = 5
STOP = threading.Event()  # set by SIGTERM / SIGINT: stop the runs as at the time limit, then write the table
# the fedlt console script, also where fedlt is only on PYTHONPATH (not installed), e.g. a bare GPU machine
FEDLT = [sys.executable, "-c", "import sys; from fedlt.cli import main; sys.argv[0] = 'fedlt'; sys.exit(main())"]


# ------------------------------------------------------------------------------------------------- runs
def for_method(method: str, overrides: list[str]) -> list[str]:
    """The overrides for one method: ``METHOD:key=value`` applies to that method only (e.g.
    ``fedloge:strategy.refine_steps=100``), every other override to all."""
    out = []
    for o in overrides:
        head, sep, rest = o.partition(":")
        if sep and head in METHODS and "=" in rest and "=" not in head:
            if head == method:
                out.append(rest)
        else:
            out.append(o)
    return out


def run_args(method: str, rounds: int, run_dir: Path, overrides: list[str]) -> list[str]:
    return [*FEDLT, f"experiment={PRESET}", f"strategy={method}", f"num_rounds={rounds}", f"eval.every={EVAL_EVERY}",
            *for_method(method, overrides), f"hydra.run.dir={run_dir}"]


def start(method: str, rounds: int, run_dir: Path, overrides: list[str], log_path: Path) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 -- the child holds it; ours closes when this process exits
    return subprocess.Popen(run_args(method, rounds, run_dir, overrides), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait(procs: dict[str, subprocess.Popen], time_limit: float | None, grace: float = 90.0) -> dict[str, dict]:
    """Wait for every run; past ``time_limit`` seconds (or once :data:`STOP` is set) send SIGTERM (fedlt finishes
    the round, saves a checkpoint and exits), past ``grace`` more SIGKILL the run's process group. Returns each
    run's exit status."""
    t0 = time.monotonic()
    status = {m: {"returncode": None, "stopped_at_time_limit": False} for m in procs}
    termed: dict[str, float] = {}
    while any(p.poll() is None for p in procs.values()):
        now = time.monotonic() - t0
        for m, p in procs.items():
            if p.poll() is not None:
                status[m].setdefault("wall_s", round(now, 1))
                continue
            if (STOP.is_set() or (time_limit is not None and now > time_limit)) and m not in termed:
                status[m]["stopped_at_time_limit"] = True
                termed[m] = now
                _signal(p, signal.SIGTERM)
            elif m in termed and now > termed[m] + grace:
                _signal(p, signal.SIGKILL)
        time.sleep(0.5)
    for m, p in procs.items():
        _signal(p, signal.SIGKILL)  # what the run left in its session (a Ray daemon)
        status[m]["returncode"] = p.returncode
        status[m].setdefault("wall_s", round(time.monotonic() - t0, 1))
    return status


def _signal(p: subprocess.Popen, sig: int) -> None:
    try:
        if sig == signal.SIGKILL:
            os.killpg(p.pid, sig)  # the run's own session: fedlt and the Ray processes it started
        else:
            p.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------------ table
def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a kill
            continue
    return rows


def fedlt_curve(rows: list[dict], keys: tuple[str, ...]) -> dict[int, float]:
    """round -> the first of ``keys`` present in that round's metrics.jsonl row."""
    out = {}
    for r in rows:
        for k in keys:
            if isinstance(r.get(k), (int, float)):
                out[int(r["round"])] = float(r[k])
                break
    return out


def compare(run_dirs: dict[str, Path], rounds: int, official: bool = True) -> dict:
    """The comparison as a dict: one row per reference round <= ``rounds``, with the authors' and fedlt's
    accuracy (fractions) and fedlt minus authors, per method; plus what each run reached."""
    curves = {m: fedlt_curve(read_rows(d), METRIC_KEYS[m]) for m, d in run_dirs.items()}
    extra = {m: fedlt_curve(read_rows(d), ("generic/accuracy",)) for m, d in run_dirs.items() if m == "fedloge"}
    ref_rounds = sorted({r for m in run_dirs for r in CURVES[m] if r <= rounds})
    rows = []
    for r in ref_rounds:
        row: dict = {"round": r}
        for m in run_dirs:
            ref, got = CURVES[m].get(r), curves[m].get(r)
            row[f"{m}_authors"] = ref
            row[f"{m}_fedlt"] = got
            row[f"{m}_diff"] = None if ref is None or got is None else round(got - ref, 4)
        if "fedloge" in extra:
            row["fedloge_fedlt_psi_realigned"] = extra["fedloge"].get(r)
        rows.append(row)
    return {"preset": PRESET, "official_setting": official, "source": SOURCE, "rounds_requested": rounds,
            "metric": {m: METRIC_KEYS[m][0] for m in run_dirs}, "rows": rows,
            "rounds_evaluated": {m: sorted(curves[m]) for m in run_dirs},
            "fedlt_curves": {m: {str(k): v for k, v in sorted(curves[m].items())} for m in run_dirs},
            "run_dirs": {m: str(d) for m, d in run_dirs.items()}}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _diff(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}"


def format_table(result: dict) -> str:
    methods = list(result["metric"])
    head = ["round"]
    for m in methods:
        head += [f"{LABELS[m]} authors", "fedlt", "diff"]
    if "fedloge" in methods:
        head.append("FedLoGe psi' fedlt")
    lines = [head]
    for row in result["rows"]:
        cells = [str(row["round"])]
        for m in methods:
            cells += [_pct(row[f"{m}_authors"]), _pct(row[f"{m}_fedlt"]), _diff(row[f"{m}_diff"])]
        if "fedloge" in methods:
            cells.append(_pct(row.get("fedloge_fedlt_psi_realigned")))
        lines.append(cells)
    width = [max(len(c[i]) for c in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(cells, width, strict=True)) for cells in lines]
    note = (f"generic accuracy (%) on the balanced test set, {PRESET}; authors: {SOURCE}; "
            f"fedlt: {', '.join(f'{LABELS[m]} {k}' for m, k in result['metric'].items())}")
    if not result["official_setting"]:
        note += "\nNOT the official setting (overrides changed it): the authors' numbers are only a reference"
    if not result["rows"]:
        note += (f"\nno reference round <= {result['rounds_requested']} (the authors' rounds: "
                 f"{sorted(CURVES['fedavg'])})")
    return note + "\n" + "\n".join(text)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(result, indent=1))
    with open(out / "curves.csv", "w", newline="") as f:
        cols = list(result["rows"][0]) if result["rows"] else ["round"]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(result["rows"])


# -------------------------------------------------------------------------------------------------- CLI
SETTING_KEYS = {"dataset", "model", "num_clients", "participation", "local_epochs", "batch_size", "optimizer", "seed",
                "partition", "loss", "sampler", "strategy", "experiment", "privacy", "feature_smote", "server_data"}


LOCATION_KEYS = {"dataset.path", "dataset.sha256", "dataset.download", "dataset.download_url"}


def official(overrides: list[str]) -> bool:
    """False when an override changes the protocol (placement options such as backend.* and where the data is
    keep it)."""
    keys = [o.split("=", 1)[0].lstrip("+~") for m in METHODS for o in for_method(m, overrides)]
    return not any(k.split(".")[0] in SETTING_KEYS and k not in LOCATION_KEYS for k in keys)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fedlt-repro", description=__doc__.split("\n\n")[0],
                                epilog="Any other argument is a Hydra override (key=value) for every run.")
    p.add_argument("--rounds", type=int, default=20, help="rounds per run (R; default 20)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/repro/<date>_<time>)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of fedloge,fedavg")
    p.add_argument("--parallel", action="store_true", help="run the methods at the same time (one Ray each)")
    p.add_argument("--time-limit", type=float, default=None, help="stop every run after this many seconds")
    p.add_argument("--grace", type=float, default=90.0,
                   help="seconds a stopped run may take to finish its round before it is killed (default 90)")
    p.add_argument("--table-only", action="store_true", help="no runs: the table from OUT/runs/<method>/")
    args, overrides = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [o for o in overrides if "=" not in o] + [m for m in methods if m not in METHODS]
    if bad or args.rounds < 1:
        print(f"fedlt-repro: error: unrecognised {bad[0]!r}" if bad else "fedlt-repro: error: --rounds must be >= 1",
              f"(methods: {', '.join(METHODS)}; other arguments are Hydra overrides key=value)", file=sys.stderr)
        sys.exit(2)
    out = args.out or Path("runs") / "repro" / time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dirs = {m: out / "runs" / m for m in methods}
    status: dict = {}
    if not args.table_only:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: STOP.set())
        if args.parallel:
            procs = {m: start(m, args.rounds, run_dirs[m], overrides, out / f"{m}.log") for m in methods}
            (out / "run_pids.json").write_text(json.dumps({m: p.pid for m, p in procs.items()}))
            status = wait(procs, args.time_limit, args.grace)
        else:
            for m in methods:
                if STOP.is_set():
                    break
                proc = start(m, args.rounds, run_dirs[m], overrides, out / f"{m}.log")
                (out / "run_pids.json").write_text(json.dumps({m: proc.pid}))
                status.update(wait({m: proc}, args.time_limit, args.grace))
    result = compare(run_dirs, args.rounds, official(overrides))
    result["overrides"] = overrides
    result["runs"] = status
    write(result, out)
    print(format_table(result), flush=True)
    for m, s in status.items():
        if s["returncode"] not in (0, None):
            log = out / f"{m}.log"
            last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
            print(f"fedlt-repro: {m} exited with {s['returncode']}"
                  f"{' (stopped at --time-limit)' if s['stopped_at_time_limit'] else ''}; its log {log} ends: "
                  f"{last[-1] if last else '(empty)'}", file=sys.stderr)
    print(f"fedlt-repro: wrote {out / 'curves.json'} and {out / 'curves.csv'}", file=sys.stderr)
    failed = [m for m, s in status.items() if s["returncode"] not in (0, None) and not s["stopped_at_time_limit"]]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
