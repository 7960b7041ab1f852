"""Exponential moving average of the model's weights, used for validation, testing and export.

The average is a full copy of the model (``ema.module``), so evaluating it is a plain forward call and exporting it
is ``tdn.save_model(ema.module, path)``. It is a registered submodule of the LightningModule: it follows the model
to the device and dtype, and its weights and update count are part of every checkpoint (exact resume).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    With ``warmup`` the decay starts small and grows as ``min(decay, (1 + n) / (10 + n))`` with the number of
    updates ``n`` (as torch_ema and MACE do), so early averages are not dominated by the random initialisation.
    Buffers (E0, scale, shift, ...) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_step", torch.full((), -1, dtype=torch.long))
        # Host copies of the two buffers: reading a buffer on a GPU every step would be a device-to-host sync.
        # The buffers stay the truth that checkpoints carry; the copies are re-read once after a state dict load.
        self._host: tuple[int, int] | None = (0, -1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host = None  # read back from the loaded buffers at the next update

    def _counters(self) -> tuple[int, int]:
        if self._host is None:
            self._host = (int(self.num_updates), int(self.last_step))  # once after a load, not per step
        return self._host

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.module.eval()  # the average is only ever evaluated
        return self

    def current_decay(self) -> float:
        n = self._counters()[0] + 1
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Fold the current weights of ``model`` in; with ``step``, at most once per optimizer step."""
        num_updates, last_step = self._counters()
        if step is not None:
            if last_step == step:
                return
            last_step = int(step)
            self.last_step.fill_(last_step)
        weight = 1.0 - self.current_decay()
        ema_params = list(self.module.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
        if ema_params:
            torch._foreach_lerp_(ema_params, params, weight)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates.fill_(num_updates + 1)
        self._host = (num_updates + 1, last_step)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model``."""
        for p, e in zip(model.parameters(), self.module.parameters()):
            p.copy_(e)
        for b, e in zip(model.buffers(), self.module.buffers()):
            b.copy_(e)
