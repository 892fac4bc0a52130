"""Figures for ``fedlt-report`` and for TensorBoard (the same code draws both). Each function takes loaded runs
(``fedlt.eval.report.RunData``) and returns a matplotlib ``Figure`` built without pyplot (no global state, no
display needed: the Agg canvas renders it)."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedlt.eval.groups import shot_groups


def _figure(width=6.4, height=4.0) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def accuracy_over_rounds(runs) -> Figure:
    """Generic and personalized accuracy (primary predictors) against the round, one line per run."""
    fig = _figure(11, 4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in ((axes[0], "generic/accuracy", "generic (global model, balanced test set)"),
                           (axes[1], "personalized/accuracy", "personalized (mean over all clients)")):
        for run in runs:
            pts = [(r["round"], r[key]) for r in run.rows if r.get(key) is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="o", label=run.label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    if any(run.rows for run in runs):
        axes[1].legend(fontsize=8)
    return fig


def per_class_vs_frequency(runs) -> Figure:
    """Final per-class accuracy of each run's primary generic predictor against the class's global training
    count (log scale), with the cumulative_75_95 head/mid/tail boundaries of the first run shaded."""
    fig = _figure()
    ax = fig.subplots()
    for run in runs:
        acc, counts = run.per_class_accuracy(), run.train_counts()
        if acc is None or counts is None:
            continue
        pts = [(c, a) for c, a in zip(counts, acc, strict=False) if a is not None and c > 0]
        if pts:
            x, y = zip(*sorted(pts))
            ax.plot(x, y, marker="o", linestyle="-", alpha=0.8, label=run.label)
    first = next((r.train_counts() for r in runs if r.train_counts() is not None), None)
    if first is not None and any(c > 0 for c in first):
        groups = shot_groups(first, "cumulative_75_95")
        for g, shade in (("head", 0.12), ("tail", 0.05)):
            cs = [first[c] for c in groups[g] if first[c] > 0]
            if cs:
                ax.axvspan(min(cs) * 0.95, max(cs) * 1.05, color="grey", alpha=shade, lw=0)
                ax.text(np.sqrt(min(cs) * max(cs)), 1.02, g, ha="center", fontsize=8)
        ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.08)
    ax.set_xlabel("training images of the class (global long-tailed set)")
    ax.set_ylabel("accuracy on the balanced test set")
    ax.set_title("per-class accuracy vs class frequency (generic)", fontsize=10)
    ax.grid(alpha=0.3)
    if any(r.per_class_accuracy() for r in runs):
        ax.legend(fontsize=8)
    return fig


def per_client_distribution(runs) -> Figure:
    """Distribution of the final per-client personalized accuracy (primary predictor, the run's default masking
    variant): a box per run with every client as a dot."""
    fig = _figure()
    ax = fig.subplots()
    data, labels = [], []
    for run in runs:
        v = run.per_client_accuracy()
        if v:
            data.append([x for x in v if x is not None])
            labels.append(run.label)
    if data:
        ax.boxplot(data, showmeans=True, showfliers=False)  # every client is drawn as a dot anyway
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, ha="right", fontsize=8)
        rng = np.random.default_rng(0)  # jitter only
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=10, alpha=0.6, color="tab:blue")
    ax.set_ylabel("accuracy on the client's local test set")
    ax.set_title("per-client personalized accuracy", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return fig


def partition_heatmap(run) -> Figure:
    """Clients x classes training counts (partition.json ``client_class_counts``), log colour scale."""
    counts = np.asarray(run.partition.get("client_class_counts") or [[0]], dtype=np.float64)
    n_clients, k = counts.shape
    fig = _figure(max(4.0, min(0.25 * k + 2, 16)), max(3.0, min(0.22 * n_clients + 1.5, 14)))
    ax = fig.subplots()
    masked = np.ma.masked_equal(counts, 0)
    vmax = max(counts.max(), 1.0)
    im = ax.imshow(masked, aspect="auto", cmap="viridis", norm=LogNorm(vmin=1, vmax=vmax), interpolation="nearest")
    fig.colorbar(im, ax=ax, label="training images (empty = 0)")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_title(f"partition of {run.label}", fontsize=10)
    return fig
