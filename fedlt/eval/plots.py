"""Figures for ``fedlt-report`` and for TensorBoard (the same code draws both). Each function takes loaded runs
(``fedlt.eval.report.RunData``) and returns a matplotlib ``Figure`` built without pyplot (no global state, no
display needed: the Agg canvas renders it).

Conventions shared by every figure: run *i* has colour ``C{i}`` and the same label everywhere (what tells the
runs apart: strategy, seed, the preset when recorded, and any other option that differs); per-class values are
points (classes are categories, not a series); classes are named where the dataset has names; clients are
integers; empty clients x classes cells are light grey (``fedlt.data.figure``).

The comparison figures also take groups of repetitions (``fedlt.eval.report.RunGroup``: runs that differ only in
``seed``), in place of or mixed with runs: a group is one colour and one label ("... · 3 seeds"), drawn as the mean
over its runs with ± one sample std (n - 1) as error bars (and a band along a curve); a run, or a group of one, is
drawn as it always was.
"""

from __future__ import annotations

import textwrap

import numpy as np

from fedlt.data.figure import MAX_NAMED_CLASSES, class_axis, count_heatmap, quiet_matplotlib
from fedlt.eval.groups import shot_groups
from fedlt.eval.runs import RunGroup, as_groups, flatten

quiet_matplotlib()

from matplotlib.collections import LineCollection  # noqa: E402 -- after quiet_matplotlib(): no font-cache chatter
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
# Options that never tell runs apart in a legend: where data and caches live, the machine, logging, resuming.
NOT_DISTINGUISHING = ("backend", "checkpoint", "data_root", "cache_dir", "log_level", "resume", "hydra")


def _figure(width=6.4, height=4.0) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def colour(i: int) -> str:
    return f"C{i % 10}"


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_labels(items) -> list[str]:
    """A legend label per run, or per group of repetitions, that tells it apart from the others: the strategy,
    the preset (when config.yaml records one), every other option whose value differs, and the seed (a group: how
    many seeds); the folder name is added only where that still leaves two with the same label."""
    groups = as_groups(items)
    flats = [{k: v for k, v in flatten(g.first.config).items() if not k.startswith(NOT_DISTINGUISHING)}
             for g in groups]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    skip = {"strategy.name", "seed", "experiment", "preset"}
    differing = [k for k in keys if k not in skip and len({repr(f.get(k)) for f in flats}) > 1]
    labels = []
    for group, flat in zip(groups, flats, strict=True):
        run = group.first
        strategy = flat.get("strategy.name") or run.final.get("strategy") or run.label
        parts = [str(strategy)]
        preset = run.config.get("experiment") or run.config.get("preset")
        if isinstance(preset, str) and preset:
            parts.append(preset)
        for k in differing[:5]:
            if k not in flat:  # e.g. another strategy's option
                continue
            if k == "eval.mask_absent_classes":
                parts.append("masked" if flat[k] else "unmasked")
                continue
            short = k.removeprefix("strategy.").removeprefix("dataset.").removeprefix("optimizer.")
            parts.append(f"{short}={_value(flat[k])}")
        if group.n > 1:
            parts.append(f"{group.n} seeds")
        elif flat.get("seed") is not None:
            parts.append(f"seed {flat['seed']}")
        labels.append(" · ".join(parts))
    if len(differing) > 5 or len(set(labels)) < len(labels):
        labels = [f"{lab} · {g.first.label}" if labels.count(lab) > 1 or len(differing) > 5 else lab
                  for lab, g in zip(labels, groups, strict=True)]
    return labels


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (n - 1; 0 for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


STD_NOTE = "bars / band: ± 1 std over a group's seeds"


def _variants(groups: list[RunGroup]) -> tuple[str | None, list[str]]:
    """The personalized masking variant: (the one all runs use, or None), and each group's."""
    each = [g.first.mask_variant for g in groups]
    return (each[0] if len(set(each)) == 1 else None), each


def _number_points(rows, key) -> list[tuple[int, float]]:
    return [(r["round"], float(r[key])) for r in rows
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and np.isfinite(r[key])]


def _over_rounds(group: RunGroup, key: str) -> tuple[list[int], list[float], list[float]]:
    """Rounds, and the mean and std over the group's runs of ``key`` at each (std 0 where one run has it)."""
    by_round: dict[int, list[float]] = {}
    for run in group.runs:
        for r, v in _number_points(run.rows, key):
            by_round.setdefault(r, []).append(v)
    xs = sorted(by_round)
    stats = [_mean_std(by_round[x]) for x in xs]
    return xs, [m for m, _ in stats], [sd for _, sd in stats]


def accuracy_over_rounds(runs) -> Figure:
    """Generic and personalized accuracy (primary predictors) against the round, one line per run; a group of
    repetitions is its mean, with ± std error bars at every evaluated round and a band between them."""
    fig = _figure(11, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    groups = as_groups(runs)
    labels = run_labels(groups)
    common, each = _variants(groups)
    pers_title = "personalized (own test sets, mean over all clients" + (f"; {common})" if common else ")")
    handles = []
    for ax, key, title in ((axes[0], "generic/accuracy", "generic (global model, balanced test set)"),
                           (axes[1], "personalized/accuracy", pers_title)):
        for i, group in enumerate(groups):
            x, y, sd = _over_rounds(group, key)
            style = {"marker": MARKERS[i % len(MARKERS)], "color": colour(i)}
            if not x:
                continue
            if group.n == 1:
                ax.plot(x, y, **style)
                continue
            ax.errorbar(x, y, yerr=sd, capsize=3, **style)
            if len(x) > 1:
                ax.fill_between(x, np.subtract(y, sd), np.add(y, sd), color=colour(i), alpha=0.15, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy" + (" (mean over a group's seeds)" if any(g.n > 1 for g in groups) else ""))
    for i, (group, label) in enumerate(zip(groups, labels, strict=True)):
        if any(r.rows for r in group.runs):
            text = label if common or each[i] in label.split(" · ") else f"{label} (personalized: {each[i]})"
            handles.append(Line2D([], [], color=colour(i), marker=MARKERS[i % len(MARKERS)], label=text))
    if handles and any(g.n > 1 for g in groups):
        handles.append(Patch(color="grey", alpha=0.3, label=STD_NOTE))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2), fontsize=8)
    return fig


def _per_class(group: RunGroup, k: int) -> list[list[float]] | None:
    """Each class's accuracies over the group's runs with ``k`` per-class values (None: no such run)."""
    accs = [a for a in (r.per_class_accuracy() for r in group.runs) if a is not None and len(a) == k]
    return [[a[c] for a in accs if a[c] is not None] for c in range(k)] if accs else None


def per_class_vs_frequency(runs) -> Figure:
    """Final per-class accuracy of each run's primary generic predictor, one point per class and run, classes
    ordered from the most to the least frequent (the first run's long-tailed training counts, drawn as grey bars
    on the right axis), with its cumulative_75_95 head and tail groups shaded. A group of repetitions: the mean
    over its runs per class, with ± std error bars."""
    groups = as_groups(runs)
    runs = [r for g in groups for r in g.runs]
    base = next((r for r in runs if r.train_counts() is not None and r.per_class_accuracy() is not None), None)
    if base is None:
        fig = _figure()
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no per-class accuracy recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    counts = np.asarray(base.train_counts(), dtype=np.float64)
    k = len(counts)
    order = np.argsort(-counts, kind="stable")
    names = base.class_names()
    ticks = [names[c] for c in order] if names else [str(int(c)) for c in order]
    fig = _figure(max(6.4, min(0.3 * k + 2.5, 16)), 4.6 if k <= MAX_NAMED_CLASSES else 4.0)
    ax = fig.subplots()
    bars = ax.twinx()
    bars.bar(np.arange(k), np.maximum(counts[order], 0.5), width=0.8, color="#e6e6e6", zorder=0)
    bars.set_yscale("log")
    bars.set_ylabel("training images of the class (log scale)", color="#808080")
    ax.set_zorder(bars.get_zorder() + 1)  # points above the bars
    ax.patch.set_visible(False)
    rank = {int(c): j for j, c in enumerate(order)}
    shot = shot_groups(counts, "cumulative_75_95")
    for g, shade in (("head", 0.10), ("tail", 0.05)):
        pos = sorted(rank[c] for c in shot[g])
        if pos:
            ax.axvspan(pos[0] - 0.5, pos[-1] + 0.5, color="grey", alpha=shade, lw=0)
            ax.text((pos[0] + pos[-1]) / 2, 1.03, g, ha="center", fontsize=8)
    labels = run_labels(groups)
    shown = [(i, g, per) for i, g in enumerate(groups) if (per := _per_class(g, k)) is not None]
    width = 0.5 if len(shown) > 1 else 0.0
    for j, (i, group, per) in enumerate(shown):
        offset = (j / (len(shown) - 1) - 0.5) * width if len(shown) > 1 else 0.0
        pts = [(rank[c] + offset, *_mean_std(v)) for c, v in enumerate(per) if v]
        if pts:
            x, y, sd = zip(*pts)
            ax.scatter(x, y, s=28, marker=MARKERS[i % len(MARKERS)], color=colour(i), label=labels[i], zorder=3)
            if group.n > 1:
                ax.errorbar(x, y, yerr=sd, fmt="none", ecolor=colour(i), elinewidth=1, capsize=2, zorder=3)
    ax.set_ylim(-0.02, 1.08)
    class_axis(ax, k, ticks if k <= MAX_NAMED_CLASSES else None)
    ax.set_xlabel("class, from the most to the least frequent" + ("" if k <= MAX_NAMED_CLASSES else " (rank)"))
    ax.set_ylabel("accuracy on the balanced test set")
    left_out = len([g for g in groups if any(r.per_class_accuracy() is not None for r in g.runs)]) - len(shown)
    title = "per-class accuracy (generic, final evaluation)"
    if any(g.n > 1 for _, g, _ in shown):
        title = "per-class accuracy (generic, final evaluation; a group: mean ± std over its seeds)"
    if left_out:
        title += f"; {left_out} run(s) with another number of classes not shown"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    handles, _ = ax.get_legend_handles_labels()
    base_label = next(lab for lab, g in zip(labels, groups, strict=True) if base in g.runs)
    handles.append(Patch(color="#e6e6e6", label="training images of the class (right axis"
                         + (f", {base_label})" if len(runs) > 1 else ")")))
    wide = max(len(h.get_label()) for h in handles) > 45
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=1 if wide else min(len(handles), 2))
    return fig


def per_client_distribution(runs) -> Figure:
    """Distribution of the final per-client personalized accuracy (primary predictor, the run's own masking
    variant): a box per run with every client as a dot, mean and median marked and explained in a legend. A group
    of repetitions: one box over the clients of all its runs, and beside it the mean over the runs of each run's
    client mean (its personalized accuracy) with ± std error bars."""
    groups = as_groups(runs)
    fig = _figure(max(6.4, 2.0 * len(groups) + 3), 4.6)
    ax = fig.subplots()
    labels = run_labels(groups)
    data, ticks, cols, seed_means = [], [], [], []
    for i, (group, label) in enumerate(zip(groups, labels, strict=True)):
        recorded = [v for v in (r.per_client_accuracy() for r in group.runs) if v]
        if not recorded:
            continue
        per_run = [[x for x in v if x is not None] for v in recorded]
        values = [x for v in per_run for x in v]
        data.append(values)
        missing = sum(map(len, recorded)) - len(values)
        note = "" if group.first.mask_variant in label.split(" · ") else f"{group.first.mask_variant}, "
        sizes = {len(v) for v in recorded}
        if len(per_run) == 1:
            note += f"{len(values)} clients"
        elif len(sizes) == 1:
            note += f"{sizes.pop()} clients × {len(per_run)} seeds"
        else:
            note += f"{sum(map(len, recorded))} clients of {len(per_run)} seeds"
        note += f", {missing} without a test set" if missing else ""
        ticks.append("\n".join(textwrap.wrap(label, 26)) + f"\n({note})")
        cols.append(colour(i))
        seed_means.append([float(np.mean(v)) for v in per_run if v] if group.n > 1 else [])
    median_style = {"color": "black", "linewidth": 1.5}
    mean_style = {"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 6}
    if data:
        ax.boxplot(data, showmeans=True, showfliers=False, medianprops=median_style, meanprops=mean_style,
                   widths=0.5)  # every client is drawn as a dot anyway
        ax.set_xticks(range(1, len(ticks) + 1), ticks, fontsize=8)
        rng = np.random.default_rng(0)  # jitter only
        for i, (d, c) in enumerate(zip(data, cols, strict=True), start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=14, alpha=0.7, color=c, zorder=3)
        handles = [Line2D([], [], label="median", **median_style),
                   Line2D([], [], linestyle="none", label="mean", **mean_style),
                   Line2D([], [], linestyle="none", marker="o", color="grey", alpha=0.7, label="one client"),
                   Patch(facecolor="white", edgecolor="black", label="box: middle 50 % of clients")]
        bars = None
        for i, (means, c) in enumerate(zip(seed_means, cols, strict=True), start=1):
            if len(means) > 1:
                m, sd = _mean_std(means)
                bars = ax.errorbar([i + 0.36], [m], yerr=[sd], fmt="_", color="black", ecolor=c, markersize=10,
                                   elinewidth=2, capsize=4, zorder=4)
        if bars is not None:  # a legend entry drawn like the bars, in neutral grey (not added to the axes)
            handles.append(ErrorbarContainer(
                (Line2D([], [], linestyle="none", marker="_", color="black", markersize=10),
                 (Line2D([], [], linestyle="none", marker="_", color="grey", markersize=8),) * 2,
                 (LineCollection([], colors="grey", linewidths=2),)),
                has_yerr=True, label="mean over seeds ± std\n(of each run's client mean)"))
        fig.legend(handles=handles, fontsize=8, loc="outside right upper")
    else:
        ax.text(0.5, 0.5, "no per-client accuracy recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("accuracy on the client's local test set")
    ax.set_title("per-client personalized accuracy (final evaluation)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return fig


def count_matrix(run) -> np.ndarray | None:
    """partition.json's clients x classes training counts, when present and well-formed."""
    rows = run.partition.get("client_class_counts")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        return None
    if len({len(r) for r in rows}) != 1:
        return None
    try:
        counts = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return counts if np.isfinite(counts).all() else None


def partition_heatmap(run) -> Figure:
    """Clients x classes training counts (partition.json ``client_class_counts``), log colour scale, empty
    cells light grey."""
    counts = count_matrix(run)
    if counts is None:
        counts = np.zeros((1, 1))
    n_clients, k = counts.shape
    names = run.class_names()
    named = names is not None and k <= MAX_NAMED_CLASSES
    fig = _figure(max(4.5, min(0.3 * k + 2.5, 16)), max(3.0, min(0.22 * n_clients + (2.3 if named else 1.5), 14)))
    ax = fig.subplots()
    count_heatmap(fig, ax, counts, names)
    ax.set_title(f"partition of {run.label}", fontsize=10)
    return fig
