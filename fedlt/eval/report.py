"""``fedlt-report RUN_DIR [RUN_DIR ...] [--out DIR]``: compare runs in a Markdown and a CSV table and PNG plots.

Works on finished runs (results.json) and on interrupted ones (only metrics.jsonl, whose last line may be
half-written, and eval_detail.json, the per-class / per-client detail of the last evaluated round). A folder
that is not itself a run but holds runs at any depth (``runs/``, a day's folder, a Hydra multirun folder) stands
for all of them.

Runs that differ only in ``seed`` (and in options that do not change what a run computes: where and with how many
CPUs/GPUs it ran, where data and caches live, logging, checkpointing) are repetitions of one configuration: the
tables report each metric as mean ± std (sample std, n - 1) with n, the figures draw error bars or a ±std band,
and a per-run table below keeps every run's own values (also in report.csv).

What cannot be read is said, never skipped silently: a path that does not exist, a broken config.yaml or an
output folder that cannot be written is an error (one paragraph, exit code 2); a damaged metrics.jsonl line
(named with its line number), a garbage results.json, partition.json or eval_detail.json is a warning on stderr
and in report.md, and the rest of the run is still reported.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from fedlt.eval.groups import GROUPS, SHOT_RULES
from fedlt.eval.privacy_report import write_privacy_report
from fedlt.eval.runs import (  # noqa: F401 -- also re-exported: the report's API
    ReportError, RunData, RunGroup, Stat, _fmt, _number, expand_runs, group_problems, group_runs, load_run,
    unique_labels)

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


def run_info(run: RunData) -> dict:
    """The identifying columns of a run."""
    cfg, part, final = run.config, run.partition, run.final
    strategy = section(cfg, "strategy").get("name") or final.get("strategy")
    dataset = section(cfg, "dataset").get("name") or part.get("dataset") or final.get("dataset")
    p = section(cfg, "partition") or section(part, "partition")
    partition = str(p.get("name", ""))
    if "alpha" in p:
        partition += f" α={p['alpha']}"
    noise = section(part, "label_noise")  # dataset.label_noise: the request, realised and per-client rates
    if noise.get("rate"):
        rates = [r for r in noise.get("client_noise_rates") or [] if isinstance(r, int | float)]
        partition += (f", noise {noise.get('kind')} {noise['rate']:g} (realised {noise.get('realised_rate', 0):.3f}"
                      + (f", clients {min(rates):.2f}-{max(rates):.2f})" if rates else ")"))
    wall = _number(final.get("time/wall_s") if run.finished else final.get("time/elapsed_s"))
    return {
        "run": run.label,
        "strategy": strategy,
        "dataset": dataset,
        "IF": section(cfg, "dataset").get("imbalance_factor", part.get("imbalance_factor")),
        "partition": partition,
        "clients": cfg.get("num_clients", part.get("num_clients")),
        "seed": cfg.get("seed", part.get("seed")),
        "status": "finished" if run.finished else "interrupted",
        "rounds": f"{run.rounds_done}/{cfg.get('num_rounds', '?')}",
        "wall_s": round(wall, 1) if wall is not None else None,
        "pers. stage": (run.results or {}).get("personalized/stage", ""),
    }


def scalar_keys(run: RunData) -> list[str]:
    return [k for k, v in run.final.items()
            if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)]


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(out)


IDENT = ["strategy", "dataset", "IF", "partition", "clients", "status", "rounds", "wall_s"]


def group_info(group: RunGroup) -> dict:
    """:func:`run_info` of a group: each column's value where its runs agree, else their values joined; the wall
    time as mean ± std."""
    infos = [run_info(r) for r in group.runs]
    if group.n == 1:
        return infos[0]
    out = {}
    for col in infos[0]:
        values = list({repr(i[col]): i[col] for i in infos}.values())
        out[col] = values[0] if len(values) == 1 else ", ".join(_fmt(v) for v in values)
    out["wall_s"] = Stat(tuple(v for i in infos if (v := _number(i["wall_s"])) is not None), group.n)
    return out


def seeds_text(group: RunGroup) -> str:
    return ", ".join(_fmt(s) for s in group.seeds)


def key_table(first_header: list[str], first_cols: list[list], groups: list[RunGroup]) -> str:
    """The key-metric table, a row per group (a run is a group of one): identifying columns, then each metric."""
    infos = [group_info(g) for g in groups]
    return markdown_table(first_header + IDENT + [h for h, _ in KEY_METRICS],
                          [first + [i[c] for c in IDENT] + [g.stat(k) for _, k in KEY_METRICS]
                           for first, i, g in zip(first_cols, infos, groups, strict=True)])


def write_group_csv(groups: list[RunGroup], labels: list[str], keys: list[str], path: Path) -> Path:
    """report_groups.csv: a row per group; mean, std and n of the wall time and of every final scalar."""
    cols = [c for c in run_info(groups[0].first) if c not in ("run", "seed", "wall_s")]
    stats = ["wall_s"] + keys
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n", "seeds", "runs"] + cols + [f"{k} {s}" for k in stats for s in ("mean", "std", "n")])
        for g, label in zip(groups, labels, strict=True):
            info = group_info(g)
            row = [label, g.n, " ".join(str(s) for s in g.seeds), " ".join(r.label for r in g.runs)]
            row += ["" if info[c] is None else info[c] for c in cols]
            for k in stats:
                st = info["wall_s"] if k == "wall_s" else g.stat(k)
                if not isinstance(st, Stat):  # a group of one: run_info's rounded wall time
                    st = Stat(() if st is None else (st,), 1)
                numeric = st.n and all(_number(v) is not None for v in st.values)
                row += [st.mean if numeric else "", "" if st.std is None else st.std, st.n]
            w.writerow(row)
    return path


def write_tables(runs: list[RunData], out: Path, groups: list[RunGroup] | None = None,
                 sections: list[str] | None = None) -> tuple[Path, Path, Path]:
    """report.md, report.csv (a row per run) and report_groups.csv (a row per group of repetitions); ``sections``:
    report.md lines placed before the figures (the privacy cost section)."""
    groups = group_runs(runs) if groups is None else groups
    grouped = any(g.n > 1 for g in groups)
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
    from fedlt.eval.plots import run_labels

    legend = run_labels(groups)
    groups_csv = write_group_csv(groups, legend, key_cols + extra, out / "report_groups.csv")

    lines = ["# fedlt report", "",
             "Final evaluated round of each run. *generic*: the primary generic predictor of the global model on the "
             "balanced test set; *pers.*: each client's primary personal predictor on its own local test set, "
             "unweighted mean over all clients (see README, Metrics and reports). Head/mid/tail: the "
             "`cumulative_75_95` rule; all three rules are in the shot-group table and in report.csv.", ""]
    if grouped:
        lines += ["Runs that differ only in `seed` (and in options that do not change what a run computes: "
                  "placement, data and cache folders, logging, checkpointing) form a group: each value is "
                  "**mean ± std** over the group's runs (sample std, n − 1), n the number of runs; `(n=k)` marks a "
                  "value that fewer runs have; a group of one shows its run's value. Each run's own values are in "
                  "the per-run table below and in report.csv; report_groups.csv has mean, std and n of every "
                  "scalar.", ""]
        lines.append(key_table(["group", "n", "seeds"], [[lab, g.n, seeds_text(g)]
                                                         for lab, g in zip(legend, groups, strict=True)], groups))
        lines += ["", "## Per run", ""]
        members = [r for g in groups for r in g.runs]  # group by group
        lines.append(key_table(["run", "seed"], [[r.label, run_info(r)["seed"]] for r in members],
                               [RunGroup([r]) for r in members]))
        rows_of, first = groups, [[lab] for lab in legend]
    else:
        lines.append(key_table(["run"], [[r.label] for r in runs], groups))
        rows_of, first = groups, [[g.first.label] for g in groups]
    what = "group" if grouped else "run"
    lines += ["", "## Shot groups (head / mid / tail accuracy under each rule)", ""]
    header, rows = [what], [list(f) for f in first]
    for side in ("generic", "personalized"):
        for rule in SHOT_RULES:
            header.append(f"{side} {rule}")
            for row, g in zip(rows, rows_of, strict=True):
                row.append(" / ".join(_fmt(g.stat(f"{side}/{rule}/{grp}_accuracy")) for grp in GROUPS))
    lines.append(markdown_table(header, rows))
    lines += personalization_section(what, first, rows_of)
    ta_keys = list(dict.fromkeys(k for r in runs for k in r.final if k.startswith("generic/test_agnostic/")))
    if ta_keys:
        lines += ["", "## Test-agnostic accuracy (primary generic predictor on re-sampled test sets)", ""]
        names = [k.split("/")[2] for k in ta_keys]
        lines.append(markdown_table([what] + names, [f + [g.stat(k) for k in ta_keys]
                                                     for f, g in zip(first, rows_of, strict=True)]))
    lines += sections or []
    problems = [msg for r in runs for msg in r.problems] + group_problems(groups)
    if problems:
        lines += ["", "## Problems found while reading the runs", ""]
        lines += [f"- {msg}" for msg in problems]
    lines += ["", "## Figures", ""]
    if grouped:
        lines += ["In the figures a group is one colour: its mean, with error bars (or a band) of ± one std over "
                  "its runs. The labels stand for:", ""]
        lines.append(markdown_table(["figure label", "runs"], [[lab, ", ".join(r.label for r in g.runs)]
                                                               for lab, g in zip(legend, groups, strict=True)]))
        lines.append("")
    elif any(lab != g.first.label for lab, g in zip(legend, groups, strict=True)):
        lines += ["In the figures the runs are labelled by what tells them apart:", ""]
        lines.append(markdown_table(["figure label", "run"], [[lab, g.first.label]
                                                              for lab, g in zip(legend, groups, strict=True)]))
        lines.append("")
    md_path = out / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path, groups_csv


def budget_text(run: RunData) -> str:
    """A run's personalization step in a few words, from results.json's ``personalized/budget``."""
    b = (run.results or {}).get("personalized/budget")
    if not isinstance(b, dict):
        return "–"
    step = str(b.get("step", "–"))
    if step.startswith("shared"):
        return f"shared FT: {b.get('epochs')} ep, lr {b.get('lr')}, {b.get('parts')}, {b.get('loss')}"
    return "own step" if step.startswith("the method") else step


def personalization_section(what: str, first: list[list], groups: list[RunGroup]) -> list[str]:
    """As trained vs after the shared fine-tuning (README "Personalization"): for methods without a
    personalization step of their own, the unchanged model and the `finetuned` predictor side by side; methods
    with their own step show that step's result (their primary predictor)."""
    rows, shown = [], False
    for f, g in zip(first, groups, strict=True):
        run = g.first
        budget = budget_text(run)
        mask = "masked" if run.mask_absent_classes else "unmasked"  # as personalized/accuracy (the config)
        shared = budget.startswith("shared")
        shown |= shared
        ft = (lambda k: g.stat(f"personalized/finetuned/{mask}/{k}")) if shared else (lambda k: "–")
        rows.append(list(f) + [run_info(run)["pers. stage"], budget,
                               g.stat("personalized/accuracy"), ft("accuracy"),
                               g.stat("personalized/cumulative_75_95/tail_accuracy"),
                               ft("cumulative_75_95/tail_accuracy")])
    if not shown and not any(budget_text(g.first) == "own step" for g in groups):
        return []
    return ["", "## Personalized: as trained and after the same fine-tuning", "",
            "*as trained*: the primary personal predictor (for methods with a personalization step of their own, "
            "that step's result; for the others the received global model, or the method's primary predictor: "
            "CCVR's calibrated head, CReFF's re-trained head). *shared FT*: the same fine-tuning for every method "
            "without its own step (`personalization.*`), a copy of the received global model (for CCVR and CReFF "
            "the model with its uncalibrated FedAvg head) trained on the client's data, logged beside it as the "
            "`finetuned` predictor. Tail: the `cumulative_75_95` rule.", "",
            markdown_table([what, "pers. stage", "personalization", "pers. acc (as trained)", "pers. acc (shared FT)",
                            "pers. tail (as trained)", "pers. tail (shared FT)"], rows)]


# ------------------------------------------------------------------------------------------------- figures
def save(fig, path: Path) -> Path:
    """Write a figure as PNG (a plain file: 0644 under the usual umask, like every other file of a report)."""
    fig.savefig(path, dpi=110)
    return path


def write_figures(runs: list[RunData], out: Path, groups: list[RunGroup] | None = None) -> list[Path]:
    """The comparison figures (a colour per group of repetitions, with ± std where a group has several runs) and
    each run's partition heatmap."""
    from fedlt.eval import plots

    groups = group_runs(runs) if groups is None else groups
    paths = [save(plots.accuracy_over_rounds(groups), out / "accuracy_over_rounds.png"),
             save(plots.per_class_vs_frequency(groups), out / "per_class_accuracy.png"),
             save(plots.per_client_distribution(groups), out / "per_client_accuracy.png")]
    for i, run in enumerate(runs):
        if plots.count_matrix(run) is not None:
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run.label)
            paths.append(save(plots.partition_heatmap(run), out / f"partition_{i}_{safe}.png"))
    return paths


def report(run_dirs: list[str], out: str | Path) -> dict:
    """Read the runs, group repetitions (:func:`group_runs`), then write report.md, report.csv,
    report_groups.csv and the figures to ``out``, and, when runs used DP, the privacy cost tables and figures
    (:mod:`fedlt.eval.privacy_report`; ``privacy`` in the returned dict, else None). Raises ReportError for a path
    that is not a run, a broken config.yaml or an output folder that cannot be written; what else could not be
    read is in the returned ``problems`` (and in report.md)."""
    paths = expand_runs(run_dirs)
    runs = [load_run(p, lab) for p, lab in zip(paths, unique_labels(paths), strict=True)]
    groups = group_runs(runs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        privacy = write_privacy_report(runs, out)
        md, csv_path, groups_csv = write_tables(runs, out, groups, privacy["markdown"] if privacy else None)
        figures = write_figures(runs, out, groups) + (privacy["figures"] if privacy else [])
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
    return {"markdown": md, "csv": csv_path, "groups_csv": groups_csv, "figures": figures, "groups": groups,
            "privacy": privacy, "problems": [msg for r in runs for msg in r.problems] + group_problems(groups)
            + (privacy["problems"] if privacy else [])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedlt-report", description="Compare fedlt runs: a Markdown and a CSV table plus PNG plots. "
        "Finished and interrupted runs both work. Runs that differ only in seed are grouped: mean ± std (n).")
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
    groups = written["groups"]
    repeated = sum(g.n > 1 for g in groups)
    note = f" ({repeated} of {len(groups)} configurations repeated over seeds: mean ± std)" if repeated else ""
    privacy = written["privacy"]
    tables = ", ".join(str(p) for p in [written["csv"], written["groups_csv"]] + (privacy["files"] if privacy else []))
    print(f"wrote {written['markdown']}, {tables} and {len(written['figures'])} "
          f"figures to {Path(args.out).resolve()}{note}")
    if privacy:  # also in report.md
        print("\n".join(["privacy cost (DP vs the same runs without DP; drop = no-DP - DP accuracy):"]
                        + ([privacy["note"]] if privacy["note"] else []) + [privacy["table"]]))


if __name__ == "__main__":  # python -m fedlt.eval.report: run the imported module, whose classes plots.py shares
    from fedlt.eval.report import main as _main

    _main()
