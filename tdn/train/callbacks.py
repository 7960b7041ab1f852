"""Lightning callbacks of ``tdn-train``."""

from __future__ import annotations

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
            checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", None) or None
            raise NonFiniteLossError(*found, checkpoint=checkpoint)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.every == 0:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._check(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, pl_module)
