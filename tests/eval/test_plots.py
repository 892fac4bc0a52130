"""The figures' conventions, checked on the matplotlib objects (fast, no run): integer client ticks, class names,
no axis past the last class, per-class values as points, legends that tell runs apart and explain the markers,
one colour for empty cells; a group of seeds drawn as its mean with ± std error bars (their lengths checked)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer

from fedlt.data.figure import EMPTY_COLOUR, MAX_NAMED_CLASSES, partition_figure
from fedlt.eval import plots
from fedlt.eval.report import RunData, RunGroup

NAMES = ["cat", "dog", "eel", "fox"]
COUNTS = [[30, 0, 4, 1], [10, 12, 0, 0], [0, 3, 2, 1]]  # 3 clients x 4 classes, empty cells included


def summary(counts=COUNTS, names=NAMES) -> dict:
    g = np.sum(counts, axis=0).tolist()
    return {"client_class_counts": counts, "global_class_counts": g, "classes": names, "dataset": "toy",
            "partition": {"name": "dirichlet"}, "imbalance_factor": 10.0, "profile": "exp", "train_size": sum(g),
            "shot_groups": {"cumulative_75_95": {"head": [0], "mid": [1], "tail": [2, 3]}}}


def run(name: str, strategy="fedavg", seed=1, mask=False, per_class=(0.9, 0.5, 0.2, 0.0), experiment=None,
        rounds=(1, 2, 3)) -> RunData:
    config = {"strategy": {"name": strategy}, "seed": seed, "num_rounds": 3, "eval": {"mask_absent_classes": mask},
              "backend": {"num_cpus": seed}}  # a difference that must not show in the labels
    if experiment:
        config["experiment"] = experiment
    variant = "masked" if mask else "unmasked"
    return RunData(path=Path(name), label=name, config=config,
                   partition={"classes": NAMES, "global_class_counts": np.sum(COUNTS, axis=0).tolist(),
                              "client_class_counts": COUNTS},
                   rows=[{"round": r, "generic/accuracy": 0.1 * r, "personalized/accuracy": 0.2 * r} for r in rounds],
                   detail={"generic": {"model/per_class_accuracy": list(per_class)},
                           "personalized": {f"model/{variant}/per_client_accuracy": [0.5, 0.7, None]}})


def ticks_in_view(ax, axis="y") -> list[float]:
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    return [t for t in (ax.get_yticks() if axis == "y" else ax.get_xticks()) if lo <= t <= hi]


def tick_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


def test_partition_png_conventions():
    fig = partition_figure(summary())
    heat, bars = fig.axes[0], fig.axes[1]
    assert all(float(t).is_integer() for t in ticks_in_view(heat)) and ticks_in_view(heat)  # integer clients
    assert tick_labels(heat) == NAMES and tick_labels(bars) == NAMES
    assert heat.get_xlim() == (-0.5, 3.5) and bars.get_xlim() == (-0.5, 3.5)  # no axis past the last class
    assert to_hex(heat.images[0].cmap.get_bad()) == EMPTY_COLOUR
    assert "light grey = none" in fig.axes[2].get_ylabel()  # the colour bar explains the empty cells
    few = partition_figure(summary([[3, 1, 0, 2], [0, 5, 1, 1]]))  # 2 clients: no tick at 0.5
    assert ticks_in_view(few.axes[0]) == [0.0, 1.0]


def test_many_classes_get_index_ticks_that_stop_at_the_last_class():
    k = MAX_NAMED_CLASSES + 10
    counts = np.ones((2, k), dtype=int).tolist()
    fig = partition_figure(summary(counts, [f"c{i}" for i in range(k)]))
    for ax in fig.axes[:2]:
        assert ax.get_xlim() == (-0.5, k - 0.5)
        assert all(float(t).is_integer() for t in ticks_in_view(ax, "x"))


def test_report_heatmap_uses_the_same_conventions():
    fig = plots.partition_heatmap(run("a"))
    ax = fig.axes[0]
    assert tick_labels(ax) == NAMES and ax.get_xlim() == (-0.5, 3.5)
    assert all(float(t).is_integer() for t in ticks_in_view(ax))
    assert to_hex(ax.images[0].cmap.get_bad()) == EMPTY_COLOUR


def test_labels_tell_runs_apart():
    a, b = run("x", "fedavg", 1), run("y", "fedprox", 2, mask=True)
    la, lb = plots.run_labels([a, b])
    assert "fedavg" in la and "seed 1" in la and "unmasked" in la
    assert "fedprox" in lb and "seed 2" in lb and "masked" in lb
    assert "num_cpus" not in la + lb  # where a run ran does not tell results apart
    same = plots.run_labels([run("2025-01-01/run"), run("2025-01-02/run")])
    assert same[0] != same[1] and all("fedavg · seed 1" in lab for lab in same)  # only the folder differs
    assert "smoke" in plots.run_labels([run("p", experiment="smoke")])[0]  # the preset, when recorded


def test_accuracy_over_rounds_legend_and_integer_rounds():
    runs = [run("x", "fedavg", 1), run("y", "fedprox", 2)]
    fig = plots.accuracy_over_rounds(runs)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == plots.run_labels(runs)
    assert all(float(t).is_integer() for t in ticks_in_view(fig.axes[0], "x"))


def test_per_class_accuracy_is_points_in_frequency_order_with_class_names():
    runs = [run("x", "fedavg", 1), run("y", "fedprox", 2, per_class=(0.8, None, 0.4, 0.1))]
    fig = plots.per_class_vs_frequency(runs)
    ax = fig.axes[0]
    assert all(len(line.get_xdata()) <= 1 for line in ax.get_lines())  # no lines joining unrelated classes
    points = [c for c in ax.collections if len(c.get_offsets())]
    assert [len(c.get_offsets()) for c in points] == [4, 3]  # one point per class (None = not drawn)
    order = np.argsort(-np.sum(COUNTS, axis=0), kind="stable")
    assert tick_labels(ax) == [NAMES[c] for c in order] and ax.get_xlim() == (-0.5, 3.5)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == plots.run_labels(runs)


def test_per_client_legend_explains_mean_and_median():
    runs = [run("x", "fedavg", 1), run("y", "fedprox", 2, mask=True)]
    fig = plots.per_client_distribution(runs)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "median" in legend and "mean" in legend and "one client" in legend
    ticks = tick_labels(fig.axes[0])
    assert "unmasked" in ticks[0] and "masked" in ticks[1] and "1 without a test set" in ticks[0]


def test_every_figure_renders_for_a_run_without_detail(tmp_path):
    empty = RunData(path=tmp_path, label="empty")
    for fig in (plots.accuracy_over_rounds([empty]), plots.per_class_vs_frequency([empty]),
                plots.per_client_distribution([empty]), plots.partition_heatmap(empty)):
        fig.savefig(tmp_path / "f.png")


# ------------------------------------------------------------------------------------------ seeds: error bars
def seeded(seed: int, acc: float, strategy="fedavg", per_class=(0.9, 0.5, 0.2, 0.0), clients=(0.5, 0.7, None)):
    """A run whose accuracies scale with ``acc`` (rounds 1-3: acc/3, 2acc/3, acc)."""
    r = run(f"{strategy}_{seed}", strategy, seed, per_class=per_class)
    r.rows = [{"round": k, "generic/accuracy": acc * k / 3, "personalized/accuracy": acc * k / 3 + 0.1}
              for k in (1, 2, 3)]
    r.detail["personalized"] = {"model/unmasked/per_client_accuracy": list(clients)}
    return r


def three_seeds() -> RunGroup:
    return RunGroup([seeded(1, 0.3, per_class=(0.9, 0.5, 0.2, 0.0), clients=(0.5, 0.7, None)),
                     seeded(2, 0.5, per_class=(0.7, 0.5, None, 0.1), clients=(0.6, 0.9, 0.3)),
                     seeded(3, 0.4, per_class=(0.8, 0.2, 0.4, 0.3), clients=(0.2, 0.4, 0.6))])


def bar_half_lengths(container: ErrorbarContainer) -> list[tuple[float, float, float]]:
    """(x, centre, half length) of each vertical error bar."""
    (bars,) = container.lines[2]
    return [(float(s[0][0]), float((s[0][1] + s[1][1]) / 2), float(abs(s[1][1] - s[0][1]) / 2))
            for s in bars.get_segments()]


def errorbars(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_a_group_of_seeds_is_one_label_and_runs_keep_theirs():
    group, other = three_seeds(), seeded(7, 0.2, "fedprox")
    assert plots.run_labels([group, other]) == ["fedavg · 3 seeds", "fedprox · seed 7"]
    assert plots.run_labels([RunGroup([other])]) == plots.run_labels([other])  # a group of one is its run


def test_accuracy_over_rounds_draws_mean_with_std_bars_and_band_for_a_group_only():
    group, other = three_seeds(), seeded(7, 0.2, "fedprox")
    fig = plots.accuracy_over_rounds([group, other])
    for ax, offset in zip(fig.axes[:2], (0.0, 0.1), strict=True):
        (bars,) = errorbars(ax)  # the group's; the single run has none
        got = bar_half_lengths(bars)
        accs = [0.3, 0.5, 0.4]
        for (x, centre, half), k in zip(got, (1, 2, 3), strict=True):
            values = [a * k / 3 + offset for a in accs]
            assert x == k and centre == pytest.approx(statistics.fmean(values))
            assert half == pytest.approx(statistics.stdev(values))  # sample std, n - 1
        assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 1  # the ±std band
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["fedavg · 3 seeds", "fedprox · seed 7", plots.STD_NOTE]
    plain = plots.accuracy_over_rounds([other, seeded(8, 0.3, "fedlc")])
    assert not any(errorbars(ax) or ax.collections for ax in plain.axes)  # runs alone: lines as before
    assert plots.STD_NOTE not in [t.get_text() for t in plain.legends[0].get_texts()]


def test_per_class_accuracy_of_a_group_is_the_mean_with_std_bars():
    group = three_seeds()
    fig = plots.per_class_vs_frequency([group, seeded(7, 0.2, "fedprox")])
    ax = fig.axes[0]
    (bars,) = errorbars(ax)
    order = list(np.argsort(-np.sum(COUNTS, axis=0), kind="stable"))
    per_class = [r.per_class_accuracy() for r in group.runs]
    for x, centre, half in bar_half_lengths(bars):
        c = order[round(x + 0.25)]  # the first of two series sits 0.25 left of its class
        values = [p[c] for p in per_class if p[c] is not None]
        assert centre == pytest.approx(statistics.fmean(values))
        assert half == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)
    assert "mean ± std" in ax.get_title()
    assert not errorbars(plots.per_class_vs_frequency([seeded(7, 0.2), seeded(8, 0.3, "fedlc")]).axes[0])


def test_per_client_box_pools_the_seeds_and_a_bar_shows_the_spread_of_their_means():
    group = three_seeds()
    fig = plots.per_client_distribution([group, seeded(7, 0.2, "fedprox")])
    ax = fig.axes[0]
    (bars,) = errorbars(ax)
    means = [statistics.fmean([v for v in r.per_client_accuracy() if v is not None]) for r in group.runs]
    ((x, centre, half),) = bar_half_lengths(bars)
    assert x == pytest.approx(1.36)  # beside the group's box
    assert (centre, half) == (pytest.approx(statistics.fmean(means)), pytest.approx(statistics.stdev(means)))
    assert [len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)] == [8, 2]
    assert "3 clients × 3 seeds, 1 without a test set" in tick_labels(ax)[0]
    assert any("mean over seeds ± std" in t.get_text() for t in fig.legends[0].get_texts())
    assert not errorbars(plots.per_client_distribution([seeded(7, 0.2), seeded(8, 0.3, "fedlc")]).axes[0])


def test_figures_with_groups_render(tmp_path):
    items = [three_seeds(), seeded(7, 0.2, "fedprox")]
    for fig in (plots.accuracy_over_rounds(items), plots.per_class_vs_frequency(items),
                plots.per_client_distribution(items)):
        fig.savefig(tmp_path / "f.png")
