"""The split at a glance: a clients x classes heatmap of training counts beside the global long-tail curve
(coloured by the official 75/95 % head / mid / tail groups). Written as a PNG with matplotlib's Agg backend."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

GROUP_COLOURS = {"head": "#1f77b4", "mid": "#ff7f0e", "tail": "#d62728"}


def write_partition_figure(summary: dict, path: str | Path) -> Path:
    """Draw ``summary`` (the ``partition.json`` content) to ``path`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Patch

    path = Path(path)
    counts = np.asarray(summary["client_class_counts"], dtype=float)
    global_counts = np.asarray(summary["global_class_counts"], dtype=float)
    n_clients, n_classes = counts.shape
    fig, (ax_map, ax_lt) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    shown = np.where(counts > 0, counts, np.nan)
    vmax = max(float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0, 1.0)
    im = ax_map.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis", norm=LogNorm(1, vmax))
    ax_map.set_facecolor("#f0f0f0")  # absent classes (count 0) stay light grey
    ax_map.set_xlabel("class")
    ax_map.set_ylabel("client")
    ax_map.set_title(f"training images per client and class ({n_clients} clients, partition="
                     f"{summary['partition'].get('name')})")
    fig.colorbar(im, ax=ax_map, label="images (log scale; grey = none)")
    groups = (summary.get("shot_groups") or {}).get("cumulative_75_95", {})
    colour = ["#7f7f7f"] * n_classes
    for g, classes in groups.items():
        for c in classes:
            colour[c] = GROUP_COLOURS.get(g, "#7f7f7f")
    ax_lt.bar(np.arange(n_classes), global_counts, color=colour, width=1.0)
    ax_lt.set_yscale("log")
    ax_lt.set_xlabel("class")
    ax_lt.set_ylabel("training images (log scale)")
    ax_lt.set_title(f"{summary['dataset']}: IF={summary['imbalance_factor']:g} ({summary['profile']}), "
                    f"{summary['train_size']} images")
    if groups:
        handles = [Patch(color=c, label=f"{g}: {len(groups[g])} classes (cumulative 75/95% rule)")
                   for g, c in GROUP_COLOURS.items() if g in groups]
        ax_lt.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partition-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
