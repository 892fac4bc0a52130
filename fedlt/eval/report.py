"""``fedlt-report RUN_DIR [RUN_DIR ...] [--out DIR]``: compare runs in a Markdown and a CSV table and PNG plots.

Works on finished runs (results.json) and on interrupted ones (only metrics.jsonl, whose last line may be
half-written, and eval_detail.json, the per-class / per-client detail of the last evaluated round). A folder
that is not itself a run but holds runs at any depth (``runs/``, a day's folder, a Hydra multirun folder) stands
for all of them.

What cannot be read is said, never skipped silently: a path that does not exist, a broken config.yaml or an
output folder that cannot be written is an error (one paragraph, exit code 2); a damaged metrics.jsonl line
(named with its line number), a garbage results.json, partition.json or eval_detail.json is a warning on stderr
and in report.md, and the rest of the run is still reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedlt.eval.groups import GROUPS, SHOT_RULES

RUN_FILES = ("config.yaml", "metrics.jsonl", "partition.json", "results.json")


class ReportError(ValueError):
    """A user error (a path that is not a run, an unreadable file); printed as one paragraph, exit code 2."""


@dataclass
class RunData:
    path: Path
    label: str
    config: dict = field(default_factory=dict)
    partition: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    results: dict | None = None
    detail: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what could not be read (warnings, one sentence each)

    @property
    def finished(self) -> bool:
        return self.results is not None

    @property
    def final(self) -> dict:
        """The last evaluated round's metrics (results.json if the run finished, else metrics.jsonl)."""
        if self.results is not None:
            return self.results
        return self.rows[-1] if self.rows else {}

    @property
    def mask_absent_classes(self) -> bool:
        return bool((self.config.get("eval") or {}).get("mask_absent_classes", False))

    def train_counts(self) -> list[int] | None:
        counts = self.partition.get("global_class_counts") or (self.detail.get("generic") or {}).get("train_counts")
        return counts if _numbers(counts, allow_none=False) else None

    def class_names(self) -> list[str] | None:
        """The dataset's class names (partition.json), when there is one per class."""
        names, counts = self.partition.get("classes"), self.train_counts()
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names) and (
                counts is None or len(names) == len(counts)):
            return names
        return None

    def per_class_accuracy(self) -> list | None:
        gen = self.detail.get("generic") or {}
        key = next((k for k in gen if k.endswith("/per_class_accuracy")), None)  # first = primary predictor
        return gen[key] if key and _numbers(gen[key]) else None

    def per_client_accuracy(self) -> list | None:
        pers = self.detail.get("personalized") or {}
        keys = [k for k in pers if k.endswith("/per_client_accuracy")]
        if not keys:
            return None
        primary = keys[0].rsplit("/", 2)[0]
        values = pers.get(f"{primary}/{self.mask_variant}/per_client_accuracy", pers[keys[0]])
        return values if _numbers(values) else None

    @property
    def mask_variant(self) -> str:
        """Which personalized variant the run reports as ``personalized/accuracy``."""
        return "masked" if self.mask_absent_classes else "unmasked"


def _numbers(values, allow_none: bool = True) -> bool:
    """A non-empty list of finite numbers (and None where values are missing)."""
    return isinstance(values, list) and bool(values) and all(
        (v is None and allow_none) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        for v in values)


def _location(e: json.JSONDecodeError) -> str:
    return f"{e.msg} at line {e.lineno}, column {e.colno}"


def read_jsonl_tolerant(path: Path, problems: list[str] | None = None) -> list[dict]:
    """One dict per complete metrics line. A line that cannot be used is skipped and described in ``problems``
    (with its line number): a cut-short last line is what a killed run leaves, anything else is damage."""
    rows: list[dict] = []
    if not path.exists():
        return rows
    problems = [] if problems is None else problems
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise ReportError(f"{path} cannot be read ({e.strerror or e}); check its permissions") from e
    lines = text.split("\n")  # not splitlines(): its extra separators would shift the line numbers
    last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == last and not text.endswith("\n"):
                problems.append(f"{path} line {number} is cut short (the run was stopped while writing it); "
                                f"it was left out")
            else:
                problems.append(f"{path} line {number} is not valid JSON ({e.msg} at column {e.colno}); it was left "
                                f"out")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("round"), int) or isinstance(row.get("round"), bool):
            problems.append(f"{path} line {number} is not a metrics row (an object with an integer \"round\"); "
                            f"it was left out")
            continue
        if rows and row["round"] <= rows[-1]["round"]:
            problems.append(f"{path} line {number} goes back to round {row['round']} after round {rows[-1]['round']}: "
                            f"two runs may have written into this folder")
        rows.append(row)
    return rows


def _read_json(path: Path, problems: list[str] | None = None, consequence: str = "it was left out") -> dict | None:
    """A JSON object from ``path``; None when the file is absent, or damaged (described in ``problems``)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        why = f"is not valid JSON ({_location(e)})"
    except UnicodeDecodeError as e:
        why = f"is not text ({e.reason} at byte {e.start})"
    except OSError as e:
        why = f"cannot be read ({e.strerror or e})"
    else:
        if isinstance(data, dict):
            return data
        why = f"holds a JSON {type(data).__name__}, not an object"
    if problems is not None:
        problems.append(f"{path} {why}; {consequence}")
    return None


def _read_config(path: Path) -> dict:
    import yaml

    if not path.exists():
        return {}
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ReportError(f"{path} is not valid YAML ({problem}{where}); it is the run's resolved configuration "
                          f"(written by fedlt): restore it, or move it out of the folder to report the run "
                          f"without it") from e
    except UnicodeDecodeError as e:
        raise ReportError(f"{path} is not a text file ({e.reason} at byte {e.start}); restore it, or move it out "
                          f"of the folder to report the run without it") from e
    except OSError as e:
        raise ReportError(f"{path} cannot be read ({e.strerror or e}); check its permissions") from e
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ReportError(f"{path} holds a YAML {type(config).__name__}, not the mapping of options fedlt writes; "
                          f"restore it, or move it out of the folder to report the run without it")
    return config


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def load_run(path: str | Path, label: str | None = None) -> RunData:
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path} is not a fedlt run directory: it does not exist. Pass the folder a run printed "
                          f"as `run_dir:`")
    if not is_run(path):
        raise ReportError(f"{path} is not a fedlt run directory (none of {', '.join(RUN_FILES)} is there)")
    problems: list[str] = []
    config = _read_config(path / "config.yaml")
    results = _read_json(path / "results.json", problems,
                         "the run is reported from metrics.jsonl as if it had been interrupted")
    detail = (results or {}).get("detail")
    if not isinstance(detail, dict) or not detail:
        detail = _read_json(path / "eval_detail.json", problems,
                            "per-class and per-client values are missing from the figures") or {}
    partition = _read_json(path / "partition.json", problems,
                           "class counts and the partition figure are missing") or {}
    rows = read_jsonl_tolerant(path / "metrics.jsonl", problems)
    if not rows and results is None:
        problems.append(f"{path} has no evaluated round yet (metrics.jsonl is empty or absent)")
    return RunData(path=path, label=label or path.name, config=config, partition=partition, rows=rows,
                   results=results, detail=detail, problems=problems)


def find_runs(folder: Path) -> list[Path]:
    """Every run directory at any depth below ``folder`` (a run's own sub-folders are not searched), sorted."""
    found: list[Path] = []
    for root, dirs, _files in os.walk(folder):
        here = Path(root)
        if here != folder and is_run(here):
            found.append(here)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def expand_runs(paths: list[str]) -> list[Path]:
    """Run folders, or folders holding runs (at any depth), in the order given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p} is not a fedlt run directory: it does not exist. Pass the folder a run printed "
                              f"as `run_dir:`, or a folder holding runs at any depth (e.g. runs/)")
        if p.is_file():
            raise ReportError(f"{p} is a file, not a run directory; pass the folder that holds it ({p.parent})")
        if is_run(p):
            out.append(p)
        elif subs := find_runs(p):
            out.extend(subs)
        else:
            raise ReportError(f"{p} is not a fedlt run directory (none of {', '.join(RUN_FILES)} is there) and no "
                              f"folder below it is one; pass the folder a run printed as `run_dir:`")
    return list(dict.fromkeys(out))


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


def section(d: dict, key: str) -> dict:
    """``d[key]`` when it is a mapping, else {} (a hand-edited config must not crash the report)."""
    v = d.get(key)
    return v if isinstance(v, dict) else {}


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def run_info(run: RunData) -> dict:
    """The identifying columns of a run."""
    cfg, part, final = run.config, run.partition, run.final
    strategy = section(cfg, "strategy").get("name") or final.get("strategy")
    dataset = section(cfg, "dataset").get("name") or part.get("dataset") or final.get("dataset")
    p = section(cfg, "partition") or section(part, "partition")
    partition = str(p.get("name", ""))
    if "alpha" in p:
        partition += f" α={p['alpha']}"
    wall = _number(final.get("time/wall_s") if run.finished else final.get("time/elapsed_s"))
    done = _number(final.get("rounds_completed", final.get("round", 0))) or 0
    return {
        "run": run.label,
        "strategy": strategy,
        "dataset": dataset,
        "IF": section(cfg, "dataset").get("imbalance_factor", part.get("imbalance_factor")),
        "partition": partition,
        "clients": cfg.get("num_clients", part.get("num_clients")),
        "seed": cfg.get("seed", part.get("seed")),
        "status": "finished" if run.finished else "interrupted",
        "rounds": f"{int(done)}/{cfg.get('num_rounds', '?')}",
        "wall_s": round(wall, 1) if wall is not None else None,
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
    problems = [msg for r in runs for msg in r.problems]
    if problems:
        lines += ["", "## Problems found while reading the runs", ""]
        lines += [f"- {msg}" for msg in problems]
    lines += ["", "## Figures", ""]
    from fedlt.eval.plots import run_labels

    legend = run_labels(runs)
    if any(lab != r.label for lab, r in zip(legend, runs, strict=True)):
        lines += ["In the figures the runs are labelled by what tells them apart:", ""]
        lines.append(markdown_table(["figure label", "run"], [[lab, r.label] for lab, r in zip(legend, runs,
                                                                                                  strict=True)]))
        lines.append("")
    md_path = out / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


# ------------------------------------------------------------------------------------------------- figures
def save(fig, path: Path) -> Path:
    """Write a figure as PNG (a plain file: 0644 under the usual umask, like every other file of a report)."""
    fig.savefig(path, dpi=110)
    return path


def write_figures(runs: list[RunData], out: Path) -> list[Path]:
    from fedlt.eval import plots

    paths = [save(plots.accuracy_over_rounds(runs), out / "accuracy_over_rounds.png"),
             save(plots.per_class_vs_frequency(runs), out / "per_class_accuracy.png"),
             save(plots.per_client_distribution(runs), out / "per_client_accuracy.png")]
    for i, run in enumerate(runs):
        if plots.count_matrix(run) is not None:
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run.label)
            paths.append(save(plots.partition_heatmap(run), out / f"partition_{i}_{safe}.png"))
    return paths


def report(run_dirs: list[str], out: str | Path) -> dict:
    """Read the runs, then write report.md, report.csv and the figures to ``out``. Raises ReportError for a path
    that is not a run, a broken config.yaml or an output folder that cannot be written; what else could not be
    read is in the returned ``problems`` (and in report.md)."""
    paths = expand_runs(run_dirs)
    runs = [load_run(p, lab) for p, lab in zip(paths, unique_labels(paths), strict=True)]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        md, csv_path = write_tables(runs, out)
        figures = write_figures(runs, out)
        with open(md, "a") as f:
            f.writelines(f"![{p.stem}]({p.name})\n\n" for p in figures)
    except OSError as e:
        what = e.strerror or str(e)
        if isinstance(e, FileExistsError) or (out.exists() and not out.is_dir()):
            what = "it is a file, not a folder"
        elif isinstance(e, NotADirectoryError):
            what = "a part of the path is a file, not a folder"
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""
        raise ReportError(f"cannot write the report to {out}: {what}{where}; choose a writable folder with "
                          f"--out DIR") from e
    return {"markdown": md, "csv": csv_path, "figures": figures,
            "problems": [msg for r in runs for msg in r.problems]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedlt-report", description="Compare fedlt runs: a Markdown and a CSV table plus PNG plots. "
        "Finished and interrupted runs both work.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories, or folders holding runs at any depth (e.g. runs/ or a multirun "
                             "folder)")
    parser.add_argument("--out", default="report", metavar="DIR", help="output folder (default: ./report)")
    args = parser.parse_args(argv)
    try:
        written = report(args.run_dirs, args.out)
    except ReportError as e:
        print(f"fedlt-report: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    for msg in written["problems"]:
        print(f"fedlt-report: warning: {msg}", file=sys.stderr)
    print(f"wrote {written['markdown']}, {written['csv']} and {len(written['figures'])} figures to "
          f"{Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
