"""The split at a glance: a clients x classes heatmap of training counts beside the global long-tail curve
(coloured by the official 75/95 % head / mid / tail groups). Written as a PNG with matplotlib's Agg canvas.

The drawing helpers here (the count heatmap, class and client axes, the colour of empty cells) are shared with
``fedlt-report``'s figures (``fedlt.eval.plots``), so every figure follows one convention: integer client
ticks, class names where the dataset has them, no axis beyond the last class, empty cells in light grey.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

GROUP_COLOURS = {"head": "#1f77b4", "mid": "#ff7f0e", "tail": "#d62728"}
EMPTY_COLOUR = "#d9d9d9"  # a clients x classes cell with no image, in every figure
EMPTY_LABEL = "light grey = none"
MAX_NAMED_CLASSES = 30  # above this many classes, class ticks are indices (the names are in partition.json)


def quiet_matplotlib() -> None:
    """Import matplotlib without its start-up chatter: on a fresh machine it builds its font cache and logs
    "generated new fontManager" (INFO) and "building the font cache" (WARNING); fedlt's runs log at INFO, so
    both would reach the terminal. Later font warnings are kept."""
    logger = logging.getLogger("matplotlib")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    fonts = logging.getLogger("matplotlib.font_manager")
    level = fonts.level
    fonts.setLevel(logging.ERROR)
    try:
        import matplotlib.font_manager  # noqa: F401 -- builds (or loads) the font cache here, quietly
    finally:
        fonts.setLevel(level)


def class_axis(ax, num_classes: int, names: list[str] | None = None, axis: str = "x") -> None:
    """Class positions 0..K-1: one tick per class with its name (K <= MAX_NAMED_CLASSES and names known), else
    integer indices; the axis ends at the last class."""
    from matplotlib.ticker import MaxNLocator

    set_lim, axis_obj = (ax.set_xlim, ax.xaxis) if axis == "x" else (ax.set_ylim, ax.yaxis)
    if names is not None and len(names) == num_classes and num_classes <= MAX_NAMED_CLASSES:
        long = max((len(n) for n in names), default=0) > 3
        ticks = list(range(num_classes))
        if axis == "x":
            ax.set_xticks(ticks, names, rotation=45 if long else 0, ha="right" if long else "center",
                          rotation_mode="anchor", fontsize=8)
        else:
            ax.set_yticks(ticks, names, fontsize=8)
    else:
        axis_obj.set_major_locator(MaxNLocator(integer=True))
    if axis == "x":
        set_lim(-0.5, num_classes - 0.5)
    else:  # heatmap rows run top to bottom
        set_lim(num_classes - 0.5, -0.5)


def client_axis(ax, num_clients: int) -> None:
    """Clients as rows (top to bottom) with integer ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(num_clients - 0.5, -0.5)


def count_heatmap(fig, ax, counts: np.ndarray, classes: list[str] | None = None, label: str = "training images"):
    """Clients x classes counts, log colour scale, empty cells in EMPTY_COLOUR (one convention everywhere)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    counts = np.asarray(counts, dtype=np.float64)
    n_clients, k = counts.shape
    shown = np.where(counts > 0, counts, np.nan)  # NaN = "bad" = EMPTY_COLOUR
    vmax = max(float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0, 1.0)
    cmap = colormaps["viridis"].with_extremes(bad=EMPTY_COLOUR)
    im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap, norm=LogNorm(1, max(vmax, 1.0 + 1e-9)))
    fig.colorbar(im, ax=ax, label=f"{label} (log scale)\n{EMPTY_LABEL}")
    class_axis(ax, k, classes)
    client_axis(ax, n_clients)
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    return im


def partition_figure(summary: dict):
    """The figure of ``summary`` (the ``partition.json`` content) as a matplotlib ``Figure`` (no pyplot)."""
    quiet_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    counts = np.asarray(summary["client_class_counts"], dtype=float)
    global_counts = np.asarray(summary["global_class_counts"], dtype=float)
    n_clients, n_classes = counts.shape
    classes = summary.get("classes")
    classes = classes if isinstance(classes, list) and len(classes) == n_classes else None
    named = classes is not None and n_classes <= MAX_NAMED_CLASSES
    fig = Figure(figsize=(13, 5.6 if named else 5), layout="constrained")
    ax_map, ax_lt = fig.subplots(1, 2, width_ratios=[3, 2])
    count_heatmap(fig, ax_map, counts, classes)
    ax_map.set_title(f"training images per client and class ({n_clients} clients, partition="
                     f"{summary['partition'].get('name')})", fontsize=10)
    regime = summary.get("regime")  # which global-vs-local long-tail regime (fedlt.data.partition.regime)
    noise = summary.get("label_noise")
    if regime or noise:
        fig.suptitle("; ".join(s for s in (regime, noise and f"label noise {noise['kind']} {noise['rate']:g} "
                                            f"(realised {noise['realised_rate']:.3f})") if s), fontsize=11)
    groups = (summary.get("shot_groups") or {}).get("cumulative_75_95", {})
    colour = ["#7f7f7f"] * n_classes
    for g, members in groups.items():
        for c in members:
            colour[c] = GROUP_COLOURS.get(g, "#7f7f7f")
    ax_lt.bar(np.arange(n_classes), global_counts, color=colour, width=0.9)
    ax_lt.set_yscale("log")
    class_axis(ax_lt, n_classes, classes)
    ax_lt.set_xlabel("class")
    ax_lt.set_ylabel("training images (log scale)")
    ax_lt.set_title(f"{summary['dataset']}: IF={summary['imbalance_factor']:g} ({summary['profile']}), "
                    f"{summary['train_size']} images", fontsize=10)
    if groups:
        handles = [Patch(color=c, label=f"{g}: {len(groups[g])} classes (cumulative 75/95% rule)")
                   for g, c in GROUP_COLOURS.items() if g in groups]
        ax_lt.legend(handles=handles, loc="upper right", fontsize=8)
    return fig


def write_partition_figure(summary: dict, path: str | Path) -> Path:
    """Draw ``summary`` (the ``partition.json`` content) to ``path``, written as a temporary file that is renamed
    into place (so a reader never sees half a PNG), with the same permissions as any file fedlt writes."""
    fig = partition_figure(summary)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain open() creates the file with the umask's permissions (mkstemp would make it private, 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
