"""What a run writes: ``metrics.jsonl`` (one object per evaluated round), ``eval_detail.json`` (the last evaluated
round's per-class / per-client values), ``results.json`` (final summary), TensorBoard event files under ``tb/``
(scalars, per-client histograms, hparams, end-of-run figures), and a progress display on stderr."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from fedlt.eval import tb_extras


def json_safe(v):
    """JSON-safe: NaN/inf become null, numpy/torch scalars become Python numbers."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2))
    os.replace(tmp, path)


class RunLogger:
    def __init__(self, run_dir: str | Path, num_rounds: int, start_round: int = 0, progress: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_round + 1 if start_round else None)
        self.rows: list[dict] = []
        self.detail: dict = {}
        self._hparams_written = False
        self.num_rounds = num_rounds
        self.t0 = time.monotonic()
        self._console = Console(stderr=True)
        self._progress = None
        if progress and sys.stderr.isatty():
            self._progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                                      TextColumn("{task.description}"), TimeElapsedColumn(),
                                      TextColumn("eta"), TimeRemainingColumn(), console=self._console)
            self._task = self._progress.add_task("", total=num_rounds, completed=start_round)
            self._progress.start()
        self.show_plain = progress and self._progress is None

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                self.tb.add_scalar(k, float(v), step)

    def train_round(self, rnd: int, values: dict) -> None:
        """Every round: training scalars to TensorBoard and the progress display."""
        self.scalars(rnd, values)
        if self._progress is not None:
            self._progress.update(self._task, completed=rnd)

    def eval_round(self, row: dict, detail: dict | None = None) -> None:
        """An evaluated round: one line in metrics.jsonl, scalars (and per-client histograms) to TensorBoard,
        the round's per-class / per-client detail to eval_detail.json (so interrupted runs can be reported),
        progress updated."""
        row = json_safe(row)
        self.rows.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if detail is not None:
            self.detail = json_safe(detail)
            write_json_atomic(self.run_dir / "eval_detail.json", self.detail)
            tb_extras.histograms(self.tb, int(row["round"]), self.detail)
        if not self._hparams_written:
            self._hparams_written = tb_extras.write_hparams(self.tb, self.run_dir)
        self.scalars(int(row["round"]), {k: v for k, v in row.items() if k != "round"})
        self.tb.flush()
        g, p = row.get("generic/accuracy"), row.get("personalized/accuracy")
        text = f"generic {g:.4f}  personalized {p:.4f}" if g is not None and p is not None else ""
        if self._progress is not None:
            self._progress.update(self._task, completed=row["round"],  # metrics say which round they are from
                                  description=f"round {row['round']}: {text}" if text else "")
        elif self.show_plain:
            print(f"round {row['round']}/{self.num_rounds}  {text}  ({row.get('time/round_s', 0):.1f} s/round)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.rows:
            tb_extras.figures(self.tb, self.run_dir, self.rows, self.detail)
        self.tb.close()
