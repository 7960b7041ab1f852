"""The run's ``metrics.csv``: Lightning's CSV logger, except that a run resumed in its own directory keeps the
history it resumes from.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, so a resumed run's file began at the
checkpoint's step. Here the old rows are read first and written back in front of the new ones: every row logged
before the first step the resumed run logs is kept (rows the resumed run logs again are taken from it).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


def _step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class HistoryWriter(ExperimentWriter):
    """:class:`ExperimentWriter` that starts from the rows of an existing ``metrics.csv`` when ``keep_history``."""

    def __init__(self, log_dir: str, keep_history: bool = False) -> None:
        self._keep_history = keep_history
        self._history: list[dict[str, Any]] | None = None
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning warns and deletes metrics.csv here. The run directory was checked before (tdn.train.rundir);
        # the old rows are read now and the file is only replaced when the first new rows are saved, so a resumed
        # run that fails before that leaves the history as it was.
        path = Path(self.metrics_file_path)
        if self._keep_history and path.is_file():
            with path.open(newline="") as handle:
                self._history = list(csv.DictReader(handle))
        elif path.is_file():
            path.unlink()

    def save(self) -> None:
        if self._history is not None and self.metrics:  # Lightning also saves with no rows (after the hparams)
            first_new = min(_step(m) for m in self.metrics)
            kept = [row for row in self._history if _step(row) < first_new]
            self.metrics = kept + self.metrics
            self._history = None
            if os.path.isfile(self.metrics_file_path):
                os.remove(self.metrics_file_path)  # written afresh, history first
        super().save()


class RunCSVLogger(CSVLogger):
    """``CSVLogger(save_dir=output_dir, name="", version="")`` writing ``<output_dir>/metrics.csv``; with
    ``keep_history`` (a run resumed in its own directory) the rows before the resumed step are kept."""

    def __init__(self, output_dir: str | os.PathLike, keep_history: bool = False) -> None:
        super().__init__(save_dir=str(output_dir), name="", version="")
        self._keep_history = keep_history

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryWriter(log_dir=self.log_dir, keep_history=self._keep_history)
        return self._experiment
