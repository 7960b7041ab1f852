"""Errors of the training side."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot work, found before training starts."""


class NonFiniteLossError(RuntimeError):
    """The training loss stopped being finite (NaN or inf); ``epoch``, ``batch`` (index in the epoch) and ``step``
    (optimizer steps before it) say where it happened first."""

    def __init__(self, epoch: int, batch: int, step: int, value: float, checkpoint: str | None = None) -> None:
        where = f"epoch {epoch}, batch {batch} (step {step})"
        resume = f"; the last checkpoint before it: {checkpoint}" if checkpoint else ""
        super().__init__(
            f"training stopped: the loss became {value} at {where}. Likely causes: bad labels or structures in "
            f"that batch, or a learning rate too high (training_module.optimizer.lr){resume}"
        )
        self.epoch, self.batch, self.step, self.value = epoch, batch, step, value
