"""TensorBoard beyond scalars (called by ``fedlt.runlog.RunLogger``): per-client accuracy histograms every
evaluated round, the run's hyperparameters for the HPARAMS table, and the report's figures as images at the
end of the run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("fedlt")

# The same names in every run, so TensorBoard's HPARAMS table lines runs up whatever the strategy.
HPARAM_NAMES = ("strategy", "strategy_options", "dataset", "imbalance_factor", "profile", "partition", "alpha",
                "num_clients", "participation", "num_rounds", "local_epochs", "batch_size", "lr", "momentum",
                "weight_decay", "model", "loss", "seed", "mask_absent_classes")
HPARAM_METRICS = ("generic/accuracy", "generic/balanced_accuracy", "generic/macro_f1",
                  "generic/worst_class_accuracy", "generic/cumulative_75_95/head_accuracy",
                  "generic/cumulative_75_95/mid_accuracy", "generic/cumulative_75_95/tail_accuracy",
                  "personalized/accuracy", "personalized/accuracy_p10", "personalized/masked/accuracy",
                  "personalized/unmasked/accuracy")


def hparams_of(cfg: dict) -> dict:
    """Hyperparameters of a run config (None values dropped; strategy-specific options as one string)."""
    d, p, s = cfg.get("dataset") or {}, cfg.get("partition") or {}, cfg.get("strategy") or {}
    opt = cfg.get("optimizer") or {}
    options = ",".join(f"{k}={v}" for k, v in sorted(s.items()) if k != "name" and not isinstance(v, (dict, list)))
    hp = {
        "strategy": s.get("name"), "strategy_options": options, "dataset": d.get("name"),
        "imbalance_factor": d.get("imbalance_factor"), "profile": d.get("profile"), "partition": p.get("name"),
        "alpha": p.get("alpha"), "num_clients": cfg.get("num_clients"), "participation": cfg.get("participation"),
        "num_rounds": cfg.get("num_rounds"), "local_epochs": cfg.get("local_epochs"),
        "batch_size": cfg.get("batch_size"), "lr": opt.get("lr"), "momentum": opt.get("momentum"),
        "weight_decay": opt.get("weight_decay"), "model": (cfg.get("model") or {}).get("name"),
        "loss": (cfg.get("loss") or {}).get("name"), "seed": cfg.get("seed"),
        "mask_absent_classes": (cfg.get("eval") or {}).get("mask_absent_classes"),
    }
    return {k: v for k, v in hp.items() if isinstance(v, (bool, int, float, str))}


def read_config(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def write_hparams(tb, run_dir: Path) -> bool:
    """The hparams plugin's experiment config and this run's session start (values from config.yaml) into the
    run's own event file; the HPARAMS table then shows the last value of each metric's scalar series."""
    cfg = read_config(run_dir)
    if cfg is None:
        return False
    from tensorboard.plugins.hparams import summary_v2 as hp

    writer = tb._get_file_writer()  # torch's SummaryWriter has no public call for raw summaries
    writer.add_summary(hp.hparams_config_pb([hp.HParam(n) for n in HPARAM_NAMES],
                                            [hp.Metric(m) for m in HPARAM_METRICS]))
    writer.add_summary(hp.hparams_pb(hparams_of(cfg), trial_id=str(Path(run_dir).resolve())))
    return True


def histograms(tb, step: int, detail: dict) -> None:
    """Per-client personalized accuracy of every predictor/variant as a histogram."""
    for key, values in (detail.get("personalized") or {}).items():
        if key.endswith("/per_client_accuracy"):
            v = np.asarray([x for x in values if x is not None], dtype=np.float64)
            if v.size:
                tb.add_histogram(f"personalized/{key}", v, step, bins=np.linspace(0.0, 1.0, 21))


def figure_image(fig) -> np.ndarray:
    """RGB array of a matplotlib Figure, rendered with the Agg canvas (no pyplot, thread-safe enough)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def figures(tb, run_dir: Path, rows: list[dict], detail: dict) -> None:
    """The report's single-run figures as TensorBoard images at the last evaluated round. A plotting failure
    is logged, never raised: it must not cost the run its results."""
    try:
        from fedlt.eval import plots
        from fedlt.eval.report import RunData

        run_dir = Path(run_dir)
        part = run_dir / "partition.json"
        run = RunData(path=run_dir, label=run_dir.name, config=read_config(run_dir) or {},
                      partition=json.loads(part.read_text()) if part.exists() else {}, rows=rows, detail=detail)
        step = int(rows[-1]["round"])
        figs = {"figures/accuracy_over_rounds": plots.accuracy_over_rounds([run]),
                "figures/per_class_accuracy": plots.per_class_vs_frequency([run]),
                "figures/per_client_accuracy": plots.per_client_distribution([run])}
        if run.partition.get("client_class_counts"):
            figs["figures/partition"] = plots.partition_heatmap(run)
        for tag, fig in figs.items():
            tb.add_image(tag, figure_image(fig), step, dataformats="HWC")
    except Exception as e:  # noqa: BLE001
        log.warning("TensorBoard figures skipped: %s: %s", type(e).__name__, e)
