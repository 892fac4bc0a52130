"""Figures for ``fedlt-report`` and for TensorBoard (the same code draws both). Each function takes loaded runs
(``fedlt.eval.report.RunData``) and returns a matplotlib ``Figure`` built without pyplot (no global state, no
display needed: the Agg canvas renders it).

Conventions shared by every figure: run *i* has colour ``C{i}`` and the same label everywhere (what tells the
runs apart: strategy, seed, the preset when recorded, and any other option that differs); per-class values are
points (classes are categories, not a series); classes are named where the dataset has names; clients are
integers; empty clients x classes cells are light grey (``fedlt.data.figure``).
"""

from __future__ import annotations

import textwrap

import numpy as np

from fedlt.data.figure import MAX_NAMED_CLASSES, class_axis, count_heatmap, quiet_matplotlib
from fedlt.eval.groups import shot_groups

quiet_matplotlib()

from matplotlib.figure import Figure  # noqa: E402 -- after quiet_matplotlib(): no font-cache chatter
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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if not isinstance(v, list) else tuple(v)
    return out


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_labels(runs) -> list[str]:
    """A legend label per run that tells it apart from the others: the strategy, the preset (when config.yaml
    records one), every other option whose value differs between the runs, and the seed; the folder name is
    added only where that still leaves two runs with the same label."""
    flats = [{k: v for k, v in _flat(r.config).items() if not k.startswith(NOT_DISTINGUISHING)} for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    skip = {"strategy.name", "seed", "experiment", "preset"}
    differing = [k for k in keys if k not in skip and len({repr(f.get(k)) for f in flats}) > 1]
    labels = []
    for run, flat in zip(runs, flats, strict=True):
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
        if flat.get("seed") is not None:
            parts.append(f"seed {flat['seed']}")
        labels.append(" · ".join(parts))
    if len(differing) > 5 or len(set(labels)) < len(labels):
        labels = [f"{lab} · {r.label}" if labels.count(lab) > 1 or len(differing) > 5 else lab
                  for lab, r in zip(labels, runs, strict=True)]
    return labels


def _variants(runs) -> tuple[str | None, list[str]]:
    """The personalized masking variant: (the one all runs use, or None), and each run's."""
    each = [r.mask_variant for r in runs]
    return (each[0] if len(set(each)) == 1 else None), each


def _number_points(rows, key) -> list[tuple[int, float]]:
    return [(r["round"], float(r[key])) for r in rows
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and np.isfinite(r[key])]


def accuracy_over_rounds(runs) -> Figure:
    """Generic and personalized accuracy (primary predictors) against the round, one line per run."""
    fig = _figure(11, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    labels = run_labels(runs)
    common, each = _variants(runs)
    pers_title = "personalized (own test sets, mean over all clients" + (f"; {common})" if common else ")")
    handles = []
    for ax, key, title in ((axes[0], "generic/accuracy", "generic (global model, balanced test set)"),
                           (axes[1], "personalized/accuracy", pers_title)):
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            pts = _number_points(run.rows, key)
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], color=colour(i))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        if run.rows:
            text = label if common or each[i] in label.split(" · ") else f"{label} (personalized: {each[i]})"
            handles.append(Line2D([], [], color=colour(i), marker=MARKERS[i % len(MARKERS)], label=text))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2), fontsize=8)
    return fig


def per_class_vs_frequency(runs) -> Figure:
    """Final per-class accuracy of each run's primary generic predictor, one point per class and run, classes
    ordered from the most to the least frequent (the first run's long-tailed training counts, drawn as grey bars
    on the right axis), with its cumulative_75_95 head and tail groups shaded."""
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
    groups = shot_groups(counts, "cumulative_75_95")
    for g, shade in (("head", 0.10), ("tail", 0.05)):
        pos = sorted(rank[c] for c in groups[g])
        if pos:
            ax.axvspan(pos[0] - 0.5, pos[-1] + 0.5, color="grey", alpha=shade, lw=0)
            ax.text((pos[0] + pos[-1]) / 2, 1.03, g, ha="center", fontsize=8)
    labels = run_labels(runs)
    shown = [(i, r) for i, r in enumerate(runs) if r.per_class_accuracy() is not None
             and len(r.per_class_accuracy()) == k]
    width = 0.5 if len(shown) > 1 else 0.0
    for j, (i, run) in enumerate(shown):
        acc = run.per_class_accuracy()
        offset = (j / (len(shown) - 1) - 0.5) * width if len(shown) > 1 else 0.0
        pts = [(rank[c] + offset, a) for c, a in enumerate(acc) if a is not None]
        if pts:
            x, y = zip(*pts)
            ax.scatter(x, y, s=28, marker=MARKERS[i % len(MARKERS)], color=colour(i), label=labels[i], zorder=3)
    ax.set_ylim(-0.02, 1.08)
    class_axis(ax, k, ticks if k <= MAX_NAMED_CLASSES else None)
    ax.set_xlabel("class, from the most to the least frequent" + ("" if k <= MAX_NAMED_CLASSES else " (rank)"))
    ax.set_ylabel("accuracy on the balanced test set")
    left_out = len([r for r in runs if r.per_class_accuracy() is not None]) - len(shown)
    title = "per-class accuracy (generic, final evaluation)"
    if left_out:
        title += f"; {left_out} run(s) with another number of classes not shown"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Patch(color="#e6e6e6", label="training images of the class (right axis"
                         + (f", {labels[runs.index(base)]})" if len(runs) > 1 else ")")))
    wide = max(len(h.get_label()) for h in handles) > 45
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=1 if wide else min(len(handles), 2))
    return fig


def per_client_distribution(runs) -> Figure:
    """Distribution of the final per-client personalized accuracy (primary predictor, the run's own masking
    variant): a box per run with every client as a dot, mean and median marked and explained in a legend."""
    fig = _figure(max(6.4, 2.0 * len(runs) + 3), 4.6)
    ax = fig.subplots()
    labels = run_labels(runs)
    data, ticks, cols = [], [], []
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        v = run.per_client_accuracy()
        if v:
            values = [x for x in v if x is not None]
            data.append(values)
            missing = len(v) - len(values)
            note = "" if run.mask_variant in label.split(" · ") else f"{run.mask_variant}, "
            note += f"{len(values)} clients" + (f", {missing} without a test set" if missing else "")
            ticks.append("\n".join(textwrap.wrap(label, 26)) + f"\n({note})")
            cols.append(colour(i))
    median_style = {"color": "black", "linewidth": 1.5}
    mean_style = {"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 6}
    if data:
        ax.boxplot(data, showmeans=True, showfliers=False, medianprops=median_style, meanprops=mean_style,
                   widths=0.5)  # every client is drawn as a dot anyway
        ax.set_xticks(range(1, len(ticks) + 1), ticks, fontsize=8)
        rng = np.random.default_rng(0)  # jitter only
        for i, (d, c) in enumerate(zip(data, cols, strict=True), start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=14, alpha=0.7, color=c, zorder=3)
        fig.legend(handles=[Line2D([], [], label="median", **median_style),
                           Line2D([], [], linestyle="none", label="mean", **mean_style),
                           Line2D([], [], linestyle="none", marker="o", color="grey", alpha=0.7, label="one client"),
                           Patch(facecolor="white", edgecolor="black", label="box: middle 50 % of clients")],
                  fontsize=8, loc="outside right upper")
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
