"""``fedlt-report RUN_DIR [RUN_DIR ...] [--out DIR]``: compare runs in a Markdown and a CSV table and PNG plots.

Works on finished runs (results.json) and on interrupted ones (only metrics.jsonl, whose last line may be
half-written, and eval_detail.json, the per-class / per-client detail of the last evaluated round). A folder
that is not itself a run but holds runs (e.g. a Hydra multirun folder) stands for all of them.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedlt.eval.groups import GROUPS, SHOT_RULES

RUN_FILES = ("config.yaml", "metrics.jsonl", "partition.json", "results.json")


class ReportError(ValueError):
    """A user error (a path that is not a run); printed as one paragraph, exit code 2."""


@dataclass
class RunData:
    path: Path
    label: str
    config: dict = field(default_factory=dict)
    partition: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    results: dict | None = None
    detail: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.results is not None

    @property
    def final(self) -> dict:
        """The last evaluated round's metrics (results.json if the run finished, else metrics.jsonl)."""
        if self.results is not None:
            return self.results
        return self.rows[-1] if self.rows else {}

    def train_counts(self) -> list[int] | None:
        return self.partition.get("global_class_counts") or (self.detail.get("generic") or {}).get("train_counts")

    def per_class_accuracy(self) -> list | None:
        gen = self.detail.get("generic") or {}
        key = next((k for k in gen if k.endswith("/per_class_accuracy")), None)  # first = primary predictor
        return gen.get(key) if key else None

    def per_client_accuracy(self) -> list | None:
        pers = self.detail.get("personalized") or {}
        keys = [k for k in pers if k.endswith("/per_client_accuracy")]
        if not keys:
            return None
        mask = bool((self.config.get("eval") or {}).get("mask_absent_classes", False))
        primary = keys[0].rsplit("/", 2)[0]
        return pers.get(f"{primary}/{'masked' if mask else 'unmasked'}/per_client_accuracy", pers[keys[0]])


def read_jsonl_tolerant(path: Path) -> list[dict]:
    """One dict per complete line; a line that is not valid JSON (a write cut short by a kill) is skipped."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "round" in row:
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def load_run(path: str | Path, label: str | None = None) -> RunData:
    import yaml

    path = Path(path)
    if not is_run(path):
        raise ReportError(f"{path} is not a fedlt run directory (none of {', '.join(RUN_FILES)} is there)")
    config = {}
    if (path / "config.yaml").exists():
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    results = _read_json(path / "results.json")
    detail = (results or {}).get("detail") or {}
    if not detail:
        detail = _read_json(path / "eval_detail.json") or {}
    return RunData(path=path, label=label or path.name, config=config,
                   partition=_read_json(path / "partition.json") or {},
                   rows=read_jsonl_tolerant(path / "metrics.jsonl"), results=results, detail=detail)


def expand_runs(paths: list[str]) -> list[Path]:
    """Run folders, or folders holding runs (one level down), in the order given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if is_run(p):
            out.append(p)
        elif p.is_dir() and (subs := sorted(s for s in p.iterdir() if is_run(s))):
            out.extend(subs)
        else:
            raise ReportError(f"{p} is not a fedlt run directory (none of {', '.join(RUN_FILES)} is there) and "
                              f"holds no run directories; pass the folder a run printed as `run_dir:`")
    return out


def unique_labels(paths: list[Path]) -> list[str]:
    """Folder names; the parent's name is prefixed where names clash, then #1, #2, ... if they still do."""
    names = [p.name for p in paths]
    labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(f"{lab}#{seen[lab]}" if labels.count(lab) > 1 else lab)
    return out


# ------------------------------------------------------------------------------------------------- tables
KEY_METRICS = [
    ("generic acc", "generic/accuracy"),
    ("generic bal. acc", "generic/balanced_accuracy"),
    ("generic macro-F1", "generic/macro_f1"),
    ("generic worst-class", "generic/worst_class_accuracy"),
    ("generic head", "generic/cumulative_75_95/head_accuracy"),
    ("generic mid", "generic/cumulative_75_95/mid_accuracy"),
    ("generic tail", "generic/cumulative_75_95/tail_accuracy"),
    ("generic ECE", "generic/ece"),
    ("pers. acc", "personalized/accuracy"),
    ("pers. acc (weighted)", "personalized/accuracy_weighted"),
    ("pers. std", "personalized/accuracy_std"),
    ("pers. p10", "personalized/accuracy_p10"),
    ("pers. head", "personalized/cumulative_75_95/head_accuracy"),
    ("pers. mid", "personalized/cumulative_75_95/mid_accuracy"),
    ("pers. tail", "personalized/cumulative_75_95/tail_accuracy"),
]


def run_info(run: RunData) -> dict:
    """The identifying columns of a run."""
    cfg, part, final = run.config, run.partition, run.final
    strategy = (cfg.get("strategy") or {}).get("name") or final.get("strategy")
    dataset = (cfg.get("dataset") or {}).get("name") or part.get("dataset") or final.get("dataset")
    p = cfg.get("partition") or part.get("partition") or {}
    partition = p.get("name", "")
    if "alpha" in p:
        partition += f" α={p['alpha']}"
    wall = final.get("time/wall_s") if run.finished else final.get("time/elapsed_s")
    return {
        "run": run.label,
        "strategy": strategy,
        "dataset": dataset,
        "IF": (cfg.get("dataset") or {}).get("imbalance_factor", part.get("imbalance_factor")),
        "partition": partition,
        "clients": cfg.get("num_clients", part.get("num_clients")),
        "seed": cfg.get("seed", part.get("seed")),
        "status": "finished" if run.finished else "interrupted",
        "rounds": f"{int(final.get('rounds_completed', final.get('round', 0)) or 0)}/{cfg.get('num_rounds', '?')}",
        "wall_s": round(float(wall), 1) if wall is not None else None,
        "pers. stage": (run.results or {}).get("personalized/stage", ""),
    }


def scalar_keys(run: RunData) -> list[str]:
    return [k for k, v in run.final.items()
            if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)]


def _fmt(v) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"
    return str(v)


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(out)


def write_tables(runs: list[RunData], out: Path) -> tuple[Path, Path]:
    infos = [run_info(r) for r in runs]
    info_cols = list(infos[0])
    key_cols = [k for _, k in KEY_METRICS]
    extra = sorted({k for r in runs for k in scalar_keys(r)} - set(key_cols))
    csv_path = out / "report.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(info_cols + key_cols + extra)
        for info, run in zip(infos, runs, strict=True):
            w.writerow([info[c] if info[c] is not None else "" for c in info_cols]
                       + ["" if run.final.get(k) is None else run.final.get(k) for k in key_cols + extra])

    lines = ["# fedlt report", "",
             "Final evaluated round of each run. *generic*: the primary generic predictor of the global model on the "
             "balanced test set; *pers.*: each client's primary personal predictor on its own local test set, "
             "unweighted mean over all clients (see README, Metrics and reports). Head/mid/tail: the "
             "`cumulative_75_95` rule; all three rules are in the shot-group table and in report.csv.", ""]
    ident = ["run", "strategy", "dataset", "IF", "partition", "clients", "status", "rounds", "wall_s"]
    lines.append(markdown_table(ident + [h for h, _ in KEY_METRICS],
                                [[i[c] for c in ident] + [r.final.get(k) for _, k in KEY_METRICS]
                                 for i, r in zip(infos, runs, strict=True)]))
    lines += ["", "## Shot groups (head / mid / tail accuracy under each rule)", ""]
    header, rows = ["run"], [[r.label] for r in runs]
    for side in ("generic", "personalized"):
        for rule in SHOT_RULES:
            header.append(f"{side} {rule}")
            for row, run in zip(rows, runs, strict=True):
                vals = [run.final.get(f"{side}/{rule}/{g}_accuracy") for g in GROUPS]
                row.append(" / ".join(_fmt(v) for v in vals))
    lines.append(markdown_table(header, rows))
    ta_keys = list(dict.fromkeys(k for r in runs for k in r.final if k.startswith("generic/test_agnostic/")))
    if ta_keys:
        lines += ["", "## Test-agnostic accuracy (primary generic predictor on re-sampled test sets)", ""]
        names = [k.split("/")[2] for k in ta_keys]
        lines.append(markdown_table(["run"] + names, [[r.label] + [r.final.get(k) for k in ta_keys] for r in runs]))
    lines += ["", "## Figures", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


# ------------------------------------------------------------------------------------------------- figures
def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def write_figures(runs: list[RunData], out: Path) -> list[Path]:
    from fedlt.eval import plots

    paths = [save(plots.accuracy_over_rounds(runs), out / "accuracy_over_rounds.png"),
             save(plots.per_class_vs_frequency(runs), out / "per_class_accuracy.png"),
             save(plots.per_client_distribution(runs), out / "per_client_accuracy.png")]
    for i, run in enumerate(runs):
        if run.partition.get("client_class_counts"):
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run.label)
            paths.append(save(plots.partition_heatmap(run), out / f"partition_{i}_{safe}.png"))
    return paths


def report(run_dirs: list[str], out: str | Path) -> dict[str, Path | list[Path]]:
    import matplotlib

    matplotlib.use("Agg")
    paths = expand_runs(run_dirs)
    runs = [load_run(p, lab) for p, lab in zip(paths, unique_labels(paths), strict=True)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = write_tables(runs, out)
    figures = write_figures(runs, out)
    with open(md, "a") as f:
        f.writelines(f"![{p.stem}]({p.name})\n\n" for p in figures)
    return {"markdown": md, "csv": csv_path, "figures": figures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedlt-report", description="Compare fedlt runs: a Markdown and a CSV table plus PNG plots. "
        "Finished and interrupted runs both work.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (or folders holding runs, e.g. a multirun folder)")
    parser.add_argument("--out", default="report", metavar="DIR", help="output folder (default: ./report)")
    args = parser.parse_args(argv)
    try:
        written = report(args.run_dirs, args.out)
    except ReportError as e:
        print(f"fedlt-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {written['markdown']}, {written['csv']} and {len(written['figures'])} figures to "
          f"{Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
