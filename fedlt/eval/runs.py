"""The runs a report reads: loading a run folder (tolerating damaged files, saying what was damaged), finding
runs at any depth below a folder, and grouping runs that differ only in ``seed`` (mean ± std, n). Shared by
``fedlt-report``'s tables (:mod:`fedlt.eval.report`) and its figures (:mod:`fedlt.eval.plots`)."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

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
    def rounds_done(self) -> int:
        """The round the final values come from (completed rounds of a finished run, else the last evaluated)."""
        final = self.final
        return int(_number(final.get("rounds_completed", final.get("round", 0))) or 0)

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


# ------------------------------------------------------------------------------------------------- seeds
# Options that do not change what a run computes, besides `seed`: those a resumed run may change
# (fedlt.config.RESUME_OVERRIDABLE: where and with how many CPUs/GPUs it runs, where data and caches live,
# logging, checkpointing) except num_rounds, which does change it; `resume`; and the preset's name.
NOT_COMPUTING_EXTRA = ("seed", "resume", "experiment", "preset")


def not_computing() -> tuple[str, ...]:
    from fedlt.config import RESUME_OVERRIDABLE

    return tuple(k for k in RESUME_OVERRIDABLE if k != "num_rounds") + NOT_COMPUTING_EXTRA


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config as {"a.b.c": value}; lists become tuples (hashable, comparable)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, list) else tuple(v)
    return out


def repetition_key(run: RunData, ignored: tuple[str, ...]) -> str | None:
    """What a run computes: its config.yaml without the ``ignored`` options, and the round its final values come
    from (an interrupted run is not averaged with finished ones). None without a config.yaml (never grouped)."""
    if not run.config:
        return None
    flat = {k: v for k, v in flatten(run.config).items()
            if not any(k == p or k.startswith(p + ".") for p in ignored)}
    return json.dumps([flat, run.rounds_done], sort_keys=True, default=repr)


@dataclass(frozen=True)
class Stat:
    """A metric over a group's runs: the values that exist (a run may lack one), and the group's size."""

    values: tuple
    of: int

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self):
        """The mean; a single value as it is."""
        return self.values[0] if self.n == 1 else statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1); None for a single value."""
        return statistics.stdev(self.values) if self.n > 1 else None

    def text(self) -> str:
        if self.n == 0:
            return _fmt(None)
        if self.n == 1:  # one run: its value as it is, no ±
            text = _fmt(self.mean)
        else:
            text = f"{_fmt(self.mean)} ± {_fmt(self.std)}"
        return text + (f" (n={self.n})" if self.of > 1 and self.n != self.of else "")


@dataclass
class RunGroup:
    """Runs of one configuration that differ only in ``seed`` (and in options that do not change what a run
    computes): repetitions, reported as mean ± std. A run on its own is a group of one."""

    runs: list[RunData]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def first(self) -> RunData:
        return self.runs[0]

    @property
    def seeds(self) -> list:
        return [r.config.get("seed", r.partition.get("seed")) for r in self.runs]

    def stat(self, key: str) -> Stat:
        raw = [r.final.get(key) for r in self.runs]
        if self.n == 1:  # the value as it is (an int stays an int), as the per-run table has always shown it
            return Stat(tuple(v for v in raw if v is not None and v != ""), 1)
        return Stat(tuple(v for v in map(_number, raw) if v is not None), self.n)


def as_groups(items: list) -> list[RunGroup]:
    """Runs and groups as groups (a run on its own is a group of one): what the figures draw."""
    return [x if isinstance(x, RunGroup) else RunGroup([x]) for x in items]


def group_runs(runs: list[RunData]) -> list[RunGroup]:
    """Runs grouped by :func:`repetition_key`, in the order of each group's first run."""
    ignored = not_computing()
    groups: dict[str, RunGroup] = {}
    for i, run in enumerate(runs):
        key = repetition_key(run, ignored)
        groups.setdefault(f"#{i}" if key is None else key, RunGroup([])).runs.append(run)
    return list(groups.values())


def group_problems(groups: list[RunGroup]) -> list[str]:
    """Repetitions that are not independent: two runs of a group with the same seed."""
    out = []
    for g in groups:
        seeds = g.seeds
        for s in dict.fromkeys(x for x in seeds if x is not None and seeds.count(x) > 1):
            same = [r.label for r, x in zip(g.runs, seeds, strict=True) if x == s]
            out.append(f"{', '.join(same)} have the same configuration and seed {s} (copies of one run, or a run "
                       f"repeated): each counts in its group's mean ± std, which understates the seed-to-seed "
                       f"spread; leave the copies out")
    return out


# ------------------------------------------------------------------------------------------------- tables


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _fmt(v) -> str:
    if isinstance(v, Stat):
        return v.text()
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"
    return str(v)
