"""The tail-class cost of privacy, part of ``fedlt-report``: DP runs set beside the same runs without DP.

A *DP setting* is a group of DP runs (``privacy=dp_central | dp_local | dp_sgd``) that differ only in ``seed``
(:func:`fedlt.eval.runs.group_runs`). Each of its runs is matched to **the same run without the privacy group**:
the run whose config.yaml, without ``privacy.*`` and without the options that do not change what a run computes
(:func:`fedlt.eval.runs.not_computing`, minus ``seed``), is the same -- same dataset, partition, strategy,
num_rounds, model, ... and the same seed. A DP run stopped early by its budget (``on_budget=stop``) is still
matched to the full no-DP run: stopping is part of the cost.

Written next to the report (only when a run used DP):

* ``privacy_cost.csv``: a row per DP setting -- privacy mode, noise multiplier, clipping norm, achieved epsilon at
  delta; mean and std over seeds of generic / personalized / generic head / mid / tail accuracy
  (``cumulative_75_95``), the same for the matched no-DP runs, and the **drop** = no-DP minus DP, paired by seed
  (mean and std over the pairs; positive = accuracy lost to privacy); the membership-inference AUC (loss attack) of
  the global model where ``fedlt-attack`` left an ``attack.json`` in the run folder, for the DP and no-DP runs.
* ``privacy_per_class.csv``: a row per DP setting and class -- training count, head/mid/tail group, no-DP and DP
  per-class accuracy of the primary generic predictor (mean over seeds) and the paired drop.
* ``privacy_drop_vs_count.png``: per-class drop against the class's training count (log x), a series per setting.
* ``privacy_utility.png``: epsilon (log x) against generic / personalized / tail accuracy, error bars over seeds,
  the no-DP level as a dashed horizontal line (± std band).
* a "Privacy cost" section in report.md (the table, with a no-DP row per configuration).

Without any matching no-DP run the section says so in one line and still lists the DP settings' epsilon and
accuracy (the drop columns stay empty; the drop figure is not drawn).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlt.eval.groups import shot_groups
from fedlt.eval.runs import RunData, RunGroup, Stat, _fmt, _number, _read_json, flatten, group_runs, not_computing

RULE = "cumulative_75_95"
METRICS = (("generic", "generic/accuracy"), ("personalized", "personalized/accuracy"),
           ("head", f"generic/{RULE}/head_accuracy"), ("mid", f"generic/{RULE}/mid_accuracy"),
           ("tail", f"generic/{RULE}/tail_accuracy"))
ATTACK_FILE = "attack.json"  # fedlt.attack.ATTACK_FILE (not imported: it pulls in torch)
COST_CSV, PER_CLASS_CSV = "privacy_cost.csv", "privacy_per_class.csv"
DROP_PNG, UTILITY_PNG = "privacy_drop_vs_count.png", "privacy_utility.png"
NO_MATCH = ("No run without DP shares every other setting (the same run with privacy=none: same dataset, "
            "partition, strategy, rounds, seed, ...) with the DP runs, so no drop is computed; below are the DP "
            "runs' epsilon and accuracy.")


# ------------------------------------------------------------------------------------------ matching
def privacy_name(run: RunData) -> str:
    """The run's privacy mode: config.yaml's ``privacy.name``, else results.json's ``privacy.mode``; ``none``."""
    section = run.config.get("privacy")
    if isinstance(section, dict) and section.get("name"):
        return str(section["name"])
    summary = (run.results or {}).get("privacy")
    return str(summary.get("mode", "none")) if isinstance(summary, dict) else "none"


def _section(cfg: dict, key: str) -> dict:
    """``cfg[key]`` when it is a mapping, else {} (a hand-edited config.yaml must not crash the report)."""
    v = cfg.get(key)
    return v if isinstance(v, dict) else {}


def is_private(run: RunData) -> bool:
    return privacy_name(run) != "none"


def _computing(run: RunData, with_seed: bool = True) -> dict:
    """config.yaml flattened, without ``privacy.*`` and without the options that do not change the computation
    (keeping ``seed`` when ``with_seed``)."""
    ignored = tuple(k for k in not_computing() if not (with_seed and k == "seed")) + ("privacy",)
    return {k: v for k, v in flatten(run.config).items() if not any(k == p or k.startswith(p + ".") for p in ignored)}


def match_key(run: RunData, with_seed: bool = True) -> str | None:
    """What a run computes apart from its privacy group (:func:`_computing`); None without config.yaml."""
    return json.dumps(_computing(run, with_seed), sort_keys=True, default=repr) if run.config else None


def closest(settings: list[Setting], runs: list[RunData]) -> str:
    """Why DP runs found no match, in one sentence: the no-DP run that differs from an unmatched DP run in the
    fewest options, and those options ("" when every DP run is matched or there is no no-DP run)."""
    plain = [r for r in runs if not is_private(r) and r.config]
    best = None
    for run in (r for s in settings for r, b in zip(s.runs, s.baselines, strict=True) if b is None and r.config):
        mine = _computing(run)
        for other in plain:
            theirs = _computing(other)
            diff = sorted(k for k in mine.keys() | theirs.keys() if repr(mine.get(k, "<absent>")) != repr(
                theirs.get(k, "<absent>")))
            if best is None or len(diff) < len(best[2]):
                best = (run, other, diff)
    if best is None:
        return ""
    run, other, diff = best
    more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
    return f" The closest pair, {run.label} and {other.label}, differs in {', '.join(diff[:6])}{more}."


@dataclass
class Setting:
    """One DP setting: its runs over seeds, each with the matched no-DP run (or None)."""

    group: RunGroup
    baselines: list[RunData | None]
    label: str = ""
    family: int = 0  # index of the configuration without privacy (the runs' strategy, dataset, ...)
    config: str = ""  # that configuration in words, where settings differ in it

    @property
    def runs(self) -> list[RunData]:
        return self.group.runs

    @property
    def pairs(self) -> list[tuple[RunData, RunData]]:
        return [(r, b) for r, b in zip(self.runs, self.baselines, strict=True) if b is not None]

    @property
    def matched(self) -> list[RunData]:
        """The distinct no-DP runs matched to this setting's runs."""
        return list({id(b): b for b in self.baselines if b is not None}.values())


def match_settings(runs: list[RunData]) -> list[Setting]:
    """The DP settings among ``runs``, each run matched to the no-DP run of the same configuration and seed (the
    first such run when there are copies; a finished one before an interrupted one, and one without
    ``privacy.secagg`` before one with it); ordered by configuration, privacy mode and epsilon."""
    plain: dict[str, RunData] = {}

    def secagg(run: RunData) -> bool:
        return bool(_section(run.config, "privacy").get("secagg"))

    for run in sorted((r for r in runs if not is_private(r)), key=lambda r: (not r.finished, secagg(r))):
        if (key := match_key(run)) is not None:
            plain.setdefault(key, run)
    groups = group_runs([r for r in runs if is_private(r)])
    families: dict[str, int] = {}
    settings = []
    for g in groups:
        fam = match_key(g.first, with_seed=False)
        fam_index = families.setdefault(f"#{len(families)}" if fam is None else fam, len(families))
        settings.append(Setting(g, [plain.get(k) if (k := match_key(r)) is not None else None for r in g.runs],
                                family=fam_index))
    eps = {id(s): epsilon(s) for s in settings}
    settings.sort(key=lambda s: (s.family, privacy_name(s.group.first),  # then by epsilon, those without last
                                 eps[id(s)].mean if eps[id(s)].n and math.isfinite(eps[id(s)].mean) else math.inf))
    for s, (label, config) in zip(settings, setting_labels(settings), strict=True):
        s.label, s.config = label, config
    return settings


def setting_labels(settings: list[Setting]) -> list[tuple[str, str]]:
    """(label, configuration) per setting. The label: its privacy mode, the privacy options that tell it from
    settings of the same mode, then the configuration: the other options that differ between settings (the
    strategy by its name), "" when all settings share one."""
    skip = set(not_computing()) | {"hydra"}
    flats = [{k: v for k, v in flatten(s.group.first.config).items() if k.split(".")[0] not in skip}
             for s in settings]
    names = [privacy_name(s.group.first) for s in settings]

    def differing(idx: list[int], keys: list[str]) -> list[str]:
        return [k for k in keys if len({repr(flats[i].get(k)) for i in idx}) > 1]

    keys = list(dict.fromkeys(k for f in flats for k in f))
    other = differing(list(range(len(settings))), [k for k in keys if not k.startswith("privacy.")])
    labels = []
    for i, name in enumerate(names):
        same = [j for j, n in enumerate(names) if n == name]
        parts = [name] + [f"{k.removeprefix('privacy.')}={_value(flats[i][k])}"
                          for k in differing(same, [k for k in keys if k.startswith("privacy.")]) if k in flats[i]]
        config = " · ".join(str(flats[i][k]) if k == "strategy.name" else f"{k.split('.')[-1]}={_value(flats[i][k])}"
                            for k in other if k in flats[i])
        labels.append((" · ".join(parts + ([config] if config else [])), config))
    texts = [lab for lab, _ in labels]
    return [(f"{lab} · {s.group.first.label}" if texts.count(lab) > 1 else lab, config)  # e.g. no config.yaml
            for (lab, config), s in zip(labels, settings, strict=True)]


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _same(st: Stat):
    """A value every run shares (a calibrated z, the epsilon of a fixed schedule) in 4 digits, else the Stat."""
    if st.n and len(set(st.values)) == 1 and st.n == st.of and _number(st.values[0]) is not None:
        return f"{st.values[0]:.4g}"
    return st


# ------------------------------------------------------------------------------------------ values
def privacy_value(run: RunData, key: str):
    """A privacy fact of a run: results.json's ``privacy.<key>``, else the last ``privacy/<key>`` metric."""
    summary = (run.results or {}).get("privacy")
    if isinstance(summary, dict) and _number(summary.get(key)) is not None:
        return summary[key]
    return _number(run.final.get(f"privacy/{key}"))


def noise_multiplier(run: RunData) -> float | None:
    """The noise multiplier the run used (after calibration); under dp_sgd with a target, the mean of the
    clients' calibrated sigmas."""
    z = privacy_value(run, "noise_multiplier")
    if z is not None:
        return float(z)
    per_client = _section(run.results or {}, "privacy").get("client_noise_multiplier")
    values = [v for v in per_client or [] if _number(v) is not None]
    return float(np.mean(values)) if values else _number(_section(run.config, "privacy").get("noise_multiplier"))


def clip_text(run: RunData) -> str:
    p = _section(run.config, "privacy")
    clip = p.get("clip_norm", privacy_value(run, "clip_norm"))
    return f"{'–' if clip is None else _value(clip)}{' (adaptive)' if p.get('adaptive_clipping') else ''}"


def attack_auc(run: RunData, problems: list[str], model: str = "global", attack: str = "loss") -> float | None:
    """The membership-inference AUC in the run folder's attack.json (``fedlt-attack``), or None."""
    data = _read_json(run.path / ATTACK_FILE, problems, "its membership-inference AUC is left out")
    try:
        return _number(data[model][attack]["auc"]) if data else None
    except (KeyError, TypeError):
        problems.append(f"{run.path / ATTACK_FILE} has no {model}.{attack}.auc; its membership-inference AUC is "
                        f"left out")
        return None


def _stat(values, of: int) -> Stat:
    return Stat(tuple(v for v in values if v is not None), of)


def metric(setting: Setting, key: str) -> tuple[Stat, Stat, Stat]:
    """(DP over the setting's runs, no-DP over the matched runs, drop = no-DP - DP over the seed pairs)."""
    value = (lambda run: _number(run.final.get(key)))
    dp = _stat(map(value, setting.runs), setting.group.n)
    base = _stat(map(value, setting.matched), len(setting.matched))
    drops = [b - d for r, m in setting.pairs if (d := value(r)) is not None and (b := value(m)) is not None]
    return dp, base, Stat(tuple(drops), setting.group.n)


def epsilon(setting: Setting) -> Stat:
    return _stat((_number(privacy_value(r, "epsilon")) for r in setting.runs), setting.group.n)


def mia(setting: Setting, runs: list[RunData], problems: list[str]) -> Stat:
    return _stat((attack_auc(r, problems) for r in runs), len(runs))


def per_class(setting: Setting) -> list[dict] | None:
    """A row per class: training count, head/mid/tail group, no-DP and DP accuracy (means) and the paired drop.
    None when the runs recorded no per-class accuracy or no training counts."""
    counts = next((c for c in (r.train_counts() for r in setting.runs) if c is not None), None)
    if counts is None:
        return None
    k = len(counts)

    def accs(run):
        a = run.per_class_accuracy()
        return a if a is not None and len(a) == k else None

    dp = [a for a in map(accs, setting.runs) if a is not None]
    if not dp:
        return None
    base = [a for a in map(accs, setting.matched) if a is not None]
    pairs = [(a, b) for r, m in setting.pairs if (a := accs(r)) is not None and (b := accs(m)) is not None]
    names = next((n for n in (r.class_names() for r in setting.runs) if n is not None), None)
    group_of = {c: g for g, cls in shot_groups(counts, RULE).items() for c in cls}
    rows = []
    for c in range(k):
        drops = [b[c] - a[c] for a, b in pairs if a[c] is not None and b[c] is not None]
        rows.append({"class": c, "name": names[c] if names else "", "train_count": counts[c], "group": group_of[c],
                     "dp": _stat((a[c] for a in dp), len(dp)), "no_dp": _stat((b[c] for b in base), len(base)),
                     "drop": Stat(tuple(drops), len(dp))})
    return rows


# ------------------------------------------------------------------------------------------ tables
def _cells(st: Stat) -> list:
    """mean, std, n of a Stat for a CSV row ('' where there is none)."""
    return ["" if not st.n else st.mean, "" if st.std is None else st.std, st.n]


def write_cost_csv(settings: list[Setting], path: Path, problems: list[str]) -> Path:
    header = ["setting", "privacy", "strategy", "dataset", "n", "seeds", "runs", "no_dp_runs", "noise_multiplier",
              "clip_norm", "delta", "target_epsilon", "epsilon mean", "epsilon std", "epsilon n"]
    for name, _ in METRICS:
        header += [f"{name} {s}" for s in ("mean", "std", "n")]
        header += [f"{name} no_dp {s}" for s in ("mean", "std", "n")]
        header += [f"{name} drop {s}" for s in ("mean", "std", "n")]
    header += [f"mia_auc {s}" for s in ("mean", "std", "n")] + [f"mia_auc no_dp {s}" for s in ("mean", "std", "n")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for s in settings:
            first = s.group.first
            z = _stat(map(noise_multiplier, s.runs), s.group.n)
            row = [s.label, privacy_name(first), _section(first.config, "strategy").get("name", first.final.get(
                "strategy", "")), _section(first.config, "dataset").get("name", first.final.get("dataset", "")),
                   s.group.n, " ".join(str(x) for x in s.group.seeds), " ".join(r.label for r in s.runs),
                   " ".join(r.label for r in s.matched), "" if not z.n else z.mean, clip_text(first),
                   privacy_value(first, "delta") or "", _section(first.config, "privacy").get("target_epsilon") or ""]
            row += _cells(epsilon(s))
            for _, key in METRICS:
                for st in metric(s, key):
                    row += _cells(st)
            row += _cells(mia(s, s.runs, problems)) + _cells(mia(s, s.matched, problems))
            w.writerow(row)
    return path


def write_per_class_csv(settings: list[Setting], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "epsilon", "class", "name", "train_count", "group", "no_dp_accuracy",
                    "dp_accuracy", "dp_accuracy std", "drop", "drop std", "drop n"])
        for s in settings:
            eps = epsilon(s)
            for row in per_class(s) or []:
                w.writerow([s.label, "" if not eps.n else eps.mean, row["class"], row["name"], row["train_count"],
                            row["group"], _cells(row["no_dp"])[0], *_cells(row["dp"])[:2], *_cells(row["drop"])])
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    """As :func:`fedlt.eval.report.markdown_table` (not imported: report.py imports this module)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in r) + " |" for r in rows])


def markdown(settings: list[Setting], problems: list[str], why: str = "") -> list[str]:
    """report.md's "Privacy cost" section; ``why``: :func:`closest`."""
    lines = ["", "## Privacy cost (DP vs the same runs without DP)", ""]
    if not any(s.pairs for s in settings):
        lines += [NO_MATCH + why, ""]
    else:
        lines += ["Each DP run is matched to the run with the same configuration and seed but privacy=none. Values: "
                  "mean ± std over seeds; *drop* = no-DP − DP accuracy, paired by seed (positive: lost to privacy). "
                  f"Head / mid / tail: generic, `{RULE}`. MIA AUC: the loss attack on the global model "
                  f"(`fedlt-attack`, {ATTACK_FILE}; 0.5 = no leakage). Per class: {PER_CLASS_CSV}.", ""]
        unmatched = [r.label for s in settings for r, b in zip(s.runs, s.baselines, strict=True) if b is None]
        if unmatched:
            lines += [f"Without a matching no-DP run (left out of the drops): {', '.join(unmatched)}.{why}", ""]
    header = ["setting", "n", "seeds", "z", "C", "ε (δ)"]
    for name, _ in METRICS:
        header += [name, "drop"]
    header.append("MIA AUC")
    rows = []
    for fam in dict.fromkeys(s.family for s in settings):
        members = [s for s in settings if s.family == fam]
        base = list({id(b): b for s in members for b in s.matched}.values())
        if base:
            ref = Setting(RunGroup(base), [None] * len(base))
            rows.append([" · ".join(p for p in ("no DP", members[0].config) if p), len(base),
                         ", ".join(_fmt(x) for x in ref.group.seeds), "–", "–", "∞"]
                        + [x for _, k in METRICS for x in (metric(ref, k)[0], "")]
                        + [mia(ref, base, problems)])
        for s in members:
            first = s.group.first
            row = [s.label, s.group.n, ", ".join(_fmt(x) for x in s.group.seeds),
                   _same(_stat(map(noise_multiplier, s.runs), s.group.n)), clip_text(first),
                   f"{_same(epsilon(s))} ({_value(privacy_value(first, 'delta'))})"]
            for _, k in METRICS:
                dp, _, drop = metric(s, k)
                row += [dp, drop]
            rows.append(row + [mia(s, s.runs, problems)])
    return lines + [markdown_table(header, rows)]


# ------------------------------------------------------------------------------------------ figures
def _legend_eps(eps: Stat) -> str:
    return "ε = –" if not eps.n else f"ε = {eps.mean:.3g}"


def drop_vs_count(settings: list[Setting]):
    """Per-class accuracy drop (no-DP − DP) against the class's training count, log x, one series per setting."""
    from fedlt.eval.plots import MARKERS, _figure, colour

    fig = _figure(7.2, 4.6)
    ax = fig.subplots()
    drawn = 0
    shown = [s for s in settings if any(r["drop"].n for r in per_class(s) or [])]
    for i, s in enumerate(settings):
        rows = [r for r in per_class(s) or [] if r["drop"].n]
        if not rows:
            continue
        nudge = 10 ** (0.012 * (shown.index(s) - (len(shown) - 1) / 2))  # series side by side at one count
        x = np.array([max(float(r["train_count"]), 0.5) * nudge for r in rows])
        y = np.array([float(np.mean(r["drop"].values)) for r in rows])
        sd = np.array([r["drop"].std or 0.0 for r in rows])
        order = np.argsort(-x, kind="stable")
        style = {"color": colour(i), "marker": MARKERS[i % len(MARKERS)]}
        label = f"{_legend_eps(epsilon(s))} · {s.label}" + (f" · {len(s.pairs)} seeds" if len(s.pairs) > 1 else "")
        if len(s.pairs) > 1:
            ax.errorbar(x[order], y[order], yerr=sd[order], capsize=2, alpha=0.9, label=label, **style)
        else:
            ax.plot(x[order], y[order], label=label, **style)
        drawn += 1
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("accuracy drop: no DP − DP (per class, generic)")
    ax.set_title("per-class cost of privacy" + (" (mean ± std over seeds)" if any(len(s.pairs) > 1 for s in
                                                                                     settings) else ""), fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        fig.legend(loc="outside lower center", fontsize=8, ncols=1 if drawn > 3 else drawn)
    else:
        ax.text(0.5, 0.5, "no DP run with a matching no-DP run and per-class accuracy", ha="center", va="center",
                transform=ax.transAxes)
    return fig


def privacy_utility(settings: list[Setting]):
    """Epsilon (log x) against generic / personalized / tail accuracy: a line per configuration and privacy mode
    through its settings (mean, ± std over seeds in both directions), the matched no-DP runs as a dashed level."""
    from matplotlib.ticker import NullFormatter

    from fedlt.eval.plots import MARKERS, _figure, colour

    fig = _figure(13, 4.4)
    axes = fig.subplots(1, 3, sharey=True)
    panels = (("generic", "generic/accuracy"), ("personalized", "personalized/accuracy"),
              ("tail (generic)", f"generic/{RULE}/tail_accuracy"))
    series: dict[tuple[int, str], list[Setting]] = {}
    for s in settings:
        series.setdefault((s.family, privacy_name(s.group.first)), []).append(s)
    families = list(dict.fromkeys(s.family for s in settings))
    modes = list(dict.fromkeys(privacy_name(s.group.first) for s in settings))
    skipped, ticks = 0, set()
    for ax, (title, key) in zip(axes, panels, strict=True):
        for (fam, mode), members in series.items():
            fi = families.index(fam)
            style = {"color": colour(fi), "marker": MARKERS[modes.index(mode) % len(MARKERS)]}
            pts = []
            for s in members:
                eps, (dp, _, _) = epsilon(s), metric(s, key)
                if eps.n and dp.n and math.isfinite(eps.mean) and eps.mean > 0:
                    pts.append((eps.mean, eps.std or 0.0, dp.mean, dp.std or 0.0))
                elif key == panels[0][1]:
                    skipped += 1
            if not pts:
                continue
            pts.sort()
            ticks.update(round(p[0], 3) for p in pts)
            x, xe, y, ye = map(np.array, zip(*pts, strict=True))
            ax.errorbar(x, y, xerr=xe, yerr=ye, capsize=3, **style)
        for fi, fam in enumerate(families):
            base = list({id(b): b for s in settings if s.family == fam for b in s.matched}.values())
            vals = [v for b in base if (v := _number(b.final.get(key))) is not None]
            if vals:
                m = float(np.mean(vals))
                sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                ax.axhline(m, color=colour(fi), ls="--", lw=1.2)
                if sd:
                    ax.axhspan(m - sd, m + sd, color=colour(fi), alpha=0.1, lw=0)
        ax.set_xscale("log")
        if 0 < len(ticks) <= 8:  # the settings' epsilons as the ticks, in plain numbers
            ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ε (achieved, at the run's δ)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (final evaluation)")
    from matplotlib.lines import Line2D

    handles = []
    for (fam, mode), members in series.items():
        handles.append(Line2D([], [], color=colour(families.index(fam)), marker=MARKERS[modes.index(mode) % len(
            MARKERS)], label=" · ".join(p for p in (mode, members[0].config) if p)))
    handles.append(Line2D([], [], color="grey", ls="--", label="no DP (matched runs; band: ± std over seeds)"))
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncols=min(len(handles), 3))
    if skipped:
        fig.suptitle(f"{skipped} setting(s) without a finite positive ε are not drawn", fontsize=9)
    return fig


# ------------------------------------------------------------------------------------------ entry
def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)  # as fedlt.eval.report.save
    return path


def write_privacy_report(runs: list[RunData], out: Path) -> dict | None:
    """Everything above for the DP runs among ``runs``; None (nothing written) when no run used DP. Returns
    ``markdown`` (report.md lines), ``files`` (tables), ``figures``, ``note`` (the no-match line or None),
    ``problems``."""
    settings = match_settings(runs)
    if not settings:
        return None
    problems: list[str] = []
    why = closest(settings, runs)
    files = [write_cost_csv(settings, out / COST_CSV, problems), write_per_class_csv(settings, out / PER_CLASS_CSV)]
    figures = [_save(privacy_utility(settings), out / UTILITY_PNG)]
    if any(s.pairs for s in settings):
        figures.insert(0, _save(drop_vs_count(settings), out / DROP_PNG))
    lines = markdown(settings, problems, why)
    table = lines[-1]
    problems = list(dict.fromkeys(problems))
    lines += ["", "Not read:", ""] + [f"- {msg}" for msg in problems] if problems else []
    return {"markdown": lines, "table": table, "files": files, "figures": figures, "settings": settings,
            "note": None if any(s.pairs for s in settings) else NO_MATCH + why,
            "problems": problems}
