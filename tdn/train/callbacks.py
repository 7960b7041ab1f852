"""Lightning callbacks of ``tdn-train``."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from .errors import NonFiniteLossError


class NonFiniteLossGuard(Callback):
    """Stops training with :class:`NonFiniteLossError` once the loss stopped being finite.

    The module records the first non-finite batch on the device (``PotentialModule.nonfinite_record()``, no host sync
    per step); this reads the record every ``every`` training batches (Lightning's logging interval, which syncs
    anyway), at the end of each training epoch and before validation, so that no non-finite model is validated,
    checkpointed or exported. Lightning runs checkpoint callbacks after all others, so the check comes first.
    """

    def __init__(self, every: int = 50) -> None:
        self.every = max(1, int(every))

    @staticmethod
    def first_nonfinite(trainer: L.Trainer, pl_module: Any) -> tuple[int, int, int, float] | None:
        """(epoch, batch, step, loss) of the first non-finite batch on any rank, or None."""
        record = pl_module.nonfinite_record()
        if trainer.world_size > 1:  # every rank calls this at the same points: a collective is safe
            record = trainer.strategy.all_gather(record).reshape(-1, 4)
        rows = [row for row in record.reshape(-1, 4).tolist() if row[0] >= 0]
        if not rows:
            return None
        epoch, batch, step, value = min(rows)
        return int(epoch), int(batch), int(step), value

    def _check(self, trainer: L.Trainer, pl_module: Any) -> None:
        found = self.first_nonfinite(trainer, pl_module)
        if found is not None:
            checkpoint = next((c.best_model_path for c in trainer.checkpoint_callbacks
                               if c.monitor is None and c.best_model_path), None)  # the latest epoch's checkpoint
            raise NonFiniteLossError(*found, checkpoint=checkpoint)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.every == 0:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._check(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, pl_module)


class TrainingClock(Callback):
    """Compute spent on training batches: process CPU seconds and wall seconds, summed over the training steps
    (forward, backward, optimiser; not validation, checkpoints or snapshots) and carried through checkpoints, so a
    resumed run continues its clock. Logged as ``time/train_cpu_s`` and ``time/train_wall_s`` once per epoch: the
    axis of learning curves against compute. (On a GPU the wall clock is read without a device sync; at epoch
    granularity the queued work is at most one step behind.)"""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self._start: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = (time.process_time(), time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._start is not None:
            self.cpu_s += time.process_time() - self._start[0]
            self.wall_s += time.perf_counter() - self._start[1]
            self._start = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        pl_module.log_dict({"time/train_cpu_s": self.cpu_s, "time/train_wall_s": self.wall_s},
                           on_step=False, on_epoch=True, sync_dist=False, reduce_fx="max")

    def state_dict(self) -> dict[str, float]:
        return {"cpu_s": self.cpu_s, "wall_s": self.wall_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cpu_s = float(state_dict.get("cpu_s", 0.0))
        self.wall_s = float(state_dict.get("wall_s", 0.0))


class Snapshots(Callback):
    """Exports the evaluation model (EMA weights) after chosen epochs, for learning curves of the test error:
    ``<run>/snapshots/epoch_<k>.pt`` (``tdn.load_model`` files) and ``snapshots/index.json`` with the epoch, the
    optimiser step and the :class:`TrainingClock` reading of each. ``epochs``: epoch counts (1-based) to export
    after; ``every_n_epochs``: also every n-th epoch (0: never)."""

    def __init__(self, directory: str | Path, epochs: Sequence[int] = (), every_n_epochs: int = 0,
                 clock: TrainingClock | None = None) -> None:
        self.directory = Path(directory)
        self.epochs = {int(e) for e in epochs}
        self.every = int(every_n_epochs)
        self.clock = clock

    def wanted(self, epoch: int) -> bool:
        """Whether the state after ``epoch`` completed epochs is exported."""
        return epoch in self.epochs or (self.every > 0 and epoch % self.every == 0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        epoch = trainer.current_epoch + 1
        if trainer.sanity_checking or not trainer.is_global_zero or not self.wanted(epoch):
            return
        from .export import export_model

        model = pl_module.export_model()
        path = export_model(model, self.directory / f"epoch_{epoch:05d}.pt")  # the next epoch's start sets train()
        index_path = self.directory / "index.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else []
        index = [row for row in index if row["epoch"] != epoch]  # a resumed run rewrites its own epoch
        index.append({"epoch": epoch, "step": int(trainer.global_step), "file": path.name,
                      "train_cpu_s": self.clock.cpu_s if self.clock else None,
                      "train_wall_s": self.clock.wall_s if self.clock else None})
        index_path.write_text(json.dumps(sorted(index, key=lambda row: row["epoch"]), indent=1))
