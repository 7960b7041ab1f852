"""The LightningModule: a :class:`tdn.models.TDNModel`, its loss, metrics and EMA, the optimizer and schedule."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from .. import models
from .ema import EMA
from .finetune import ParamPlan, RowSteps
from .losses import LossConfig, PotentialLoss
from .metrics import MeanLoss, MetricSet
from .optim import build_optimizer, build_scheduler

FLOAT_FIELDS = ("pos", "cell", "unit_shifts", "energy", "forces", "stress")


class PotentialModule(L.LightningModule):
    """Trains an interatomic potential on energies, forces and (where labelled) stress.

    Args:
        model_config: the model's :class:`tdn.models.ModelConfig` as a dict (kept in the checkpoint, so
            ``PotentialModule.load_from_checkpoint(path)`` rebuilds the model without the data).
        loss: :class:`tdn.train.losses.LossConfig` fields.
        optimizer / lr_scheduler: see :mod:`tdn.train.optim`.
        ema: ``{enabled, decay, warmup}``; when enabled the average is what validation, test and export use.
        metrics: metric families for validation and test (``generic``, ``s2ef``, ``pubchemqcr``).
        compute_stress: "auto" (when the loss needs it, or in validation and test when the batch carries stress
            labels), True or False.
        seed: the global RNGs are re-seeded from ``(seed, epoch)`` at the start of every training epoch, so that the
            data order (and anything else random) of an epoch does not depend on what ran before it: a run resumed
            from an end-of-epoch checkpoint continues exactly as the uninterrupted run would.
        model: an already built model (e.g. loaded with ``init_from``); its config must equal ``model_config``.
        finetune_plan: with ``init_from``, how the parameters train (:class:`tdn.train.finetune.ParamPlan`: frozen
            parts, learning-rate factors as optimizer parameter groups, scaled steps on pretrained rows).
    """

    def __init__(
        self,
        model_config: Mapping[str, Any],
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        lr_scheduler: Mapping[str, Any] | None = None,
        ema: Mapping[str, Any] | None = None,
        metrics: Sequence[str] = ("generic",),
        compute_stress: str | bool = "auto",
        seed: int = 0,
        model: torch.nn.Module | None = None,
        finetune_plan: ParamPlan | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "finetune_plan"])
        self.model = model if model is not None else models.build_model(config=dict(model_config))
        self.loss_config = LossConfig.from_dict(loss or {})
        self.loss_fn = PotentialLoss(self.loss_config)
        self.optimizer_config = dict(optimizer or {})
        self.scheduler_config = dict(lr_scheduler or {"name": "none"})
        ema = dict(ema or {})
        unknown = sorted(set(ema) - {"enabled", "decay", "warmup"})
        if unknown:
            raise ValueError(f"unknown ema option(s) {unknown}; known: ['decay', 'enabled', 'warmup']")
        self.ema = None
        if ema.get("enabled", True):
            self.ema = EMA(self.model, ema.get("decay", 0.99), ema.get("warmup", True))
        self.val_metrics = MetricSet(metrics)
        self.test_metrics = MetricSet(metrics)
        self.val_loss = MeanLoss()
        self.test_loss = MeanLoss()
        if compute_stress not in ("auto", True, False):
            raise ValueError(f"compute_stress must be 'auto', true or false, got {compute_stress!r}")
        self.compute_stress = compute_stress
        self.seed = int(seed)
        self.finetune_plan = finetune_plan
        self._row_steps: RowSteps | None = None
        self.test_results: dict[str, float] = {}
        self._plateau: tuple[torch.optim.lr_scheduler.ReduceLROnPlateau, str] | None = None
        self._plateau_state: dict[str, Any] | None = None
        # [epoch, batch, step, loss] of the first non-finite training loss, kept on the device: checking the loss on
        # the host every step would be a sync (callbacks.NonFiniteLossGuard reads it at intervals). Not a buffer:
        # DDP would overwrite every rank's record with rank 0's at each forward.
        self._nonfinite: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation, test and export use: the EMA of the weights when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def wants_stress(self, batch: Any, training: bool = False) -> bool:
        """Whether to compute the stress: decided from the config and from flags read on the CPU, never from a
        tensor on the device (that would be a sync per step)."""
        if self.compute_stress != "auto":
            return bool(self.compute_stress)
        if self.loss_config.uses("stress"):
            return True
        if training:
            return False  # the loss does not use it and training reports nothing else
        flag = getattr(batch, "stress_labelled", None)  # set by on_before_batch_transfer
        if flag is not None:
            return bool(flag)
        has = getattr(batch, "has_stress", None)
        return has is not None and bool(has.any())

    def _forward(self, model: torch.nn.Module, batch: Any, training: bool) -> dict[str, torch.Tensor | None]:
        # training: keep the graph of the forces (and stress) so that their loss can be backpropagated
        stress = self.wants_stress(batch, training)
        return model(batch, compute_forces=True, compute_stress=stress, training=training)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Flags the steps need, read while the batch is still on the CPU (on a GPU each read would be a sync)."""
        if hasattr(batch, "num_graphs"):
            has = getattr(batch, "has_stress", None)
            padding = getattr(batch, "padding", None)
            batch.stress_labelled = has is not None and bool(has.any())
            batch.all_padding = padding is not None and bool(padding.all())
        return batch

    @staticmethod
    def _num_graphs(batch: Any) -> int:
        return int(batch.num_graphs) if hasattr(batch, "num_graphs") else 1

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Floating-point fields in the model's dtype (Lightning's 64-true precision does not reach inside graphs)."""
        dtype = self.model.dtype
        for name in FLOAT_FIELDS:
            value = getattr(batch, name, None)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
                setattr(batch, name, value.to(dtype))
        return batch

    # ------------------------------------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        self.model.train()  # a model loaded for fine-tuning comes in eval mode; Lightning keeps modules' modes
        seed = (self.seed * 1_000_003 + self.current_epoch) % (2**31 - 1)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        pred = self._forward(self.model, batch, training=True)
        loss, parts = self.loss_fn(pred, batch, self.current_epoch)
        self.record_nonfinite(loss, batch_idx)
        size = self._num_graphs(batch)
        self.log("loss", loss, on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=size)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        for term, value in parts.items():
            self.log(f"train/loss_{term}", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        return loss

    @torch.no_grad()
    def record_nonfinite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Remember (on the device, without a sync) where the loss first stopped being finite."""
        record = self.nonfinite_record(loss.device)
        here = torch.empty_like(record)
        here[0], here[1], here[2] = self.current_epoch, batch_idx, self.global_step  # fills, not copies
        here[3] = loss.detach()
        first = (record[0] < 0) & ~torch.isfinite(here[3])
        record.copy_(torch.where(first, here, record))

    def nonfinite_record(self, device: torch.device | None = None) -> torch.Tensor:
        """[epoch, batch, step, loss] (float64) of the first non-finite training loss; epoch -1 while there is none."""
        device = self.device if device is None else device
        if self._nonfinite is None or self._nonfinite.device != device:
            self._nonfinite = torch.full((4,), -1.0, dtype=torch.float64, device=device)
        return self._nonfinite

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.trainer.global_step)

    # ------------------------------------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: Any, metrics: MetricSet, mean_loss: MeanLoss) -> torch.Tensor | None:
        all_padding = getattr(batch, "all_padding", None)  # set by on_before_batch_transfer
        if all_padding is None:
            padding = getattr(batch, "padding", None)
            all_padding = padding is not None and bool(padding.all())
        if all_padding:
            return None  # a batch repeated only to give every rank the same number of batches
        pred = self._forward(self.eval_model, batch, training=False)
        loss, _ = self.loss_fn(pred, batch, self.current_epoch)
        mean_loss.update(loss, self._num_graphs(batch))
        metrics.update(pred, batch)
        return loss

    def _log_metrics(self, stage: str, metrics: MetricSet, mean_loss: MeanLoss) -> dict[str, float]:
        # compute() all-reduces sums and counts, then divides: identical on every rank
        values = {"loss": mean_loss.compute(), **metrics.compute()}
        metrics.reset()
        mean_loss.reset()
        self.log_dict({f"{stage}/{k}": v.float() for k, v in values.items()}, sync_dist=True)
        return {k: float(v) for k, v in values.items()}

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self._evaluate(batch, self.val_metrics, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        values = self._log_metrics("val", self.val_metrics, self.val_loss)
        if self._plateau is not None and not self.trainer.sanity_checking:
            self._step_plateau(values)

    def _step_plateau(self, values: dict[str, float]) -> None:
        """ReduceLROnPlateau is stepped here, not by Lightning: Lightning steps it after the epoch's checkpoint was
        written (and skips that step when resuming), so a resumed run would lose one step of its state."""
        scheduler, monitor = self._plateau
        if monitor.startswith("val/") and monitor[4:] in values:
            value = values[monitor[4:]]
        elif monitor in self.trainer.callback_metrics:
            value = float(self.trainer.callback_metrics[monitor])
        else:
            raise KeyError(f"lr_scheduler.monitor={monitor!r} was not logged; logged: {sorted(values)}")
        scheduler.step(value)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self._evaluate(batch, self.test_metrics, self.test_loss)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_metrics("test", self.test_metrics, self.test_loss)

    # ------------------------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        plan = self.finetune_plan
        lr_factors = plan.lr_factors if plan is not None else None
        optimizer = build_optimizer(self.model.named_parameters(), self.optimizer_config, lr_factors=lr_factors)
        if self._row_steps is not None:
            self._row_steps.detach()
        self._row_steps = plan.row_steps(self.model) if plan is not None else None
        if self._row_steps is not None:
            self._row_steps.attach(optimizer)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = build_scheduler(optimizer, self.scheduler_config, total, total / max_epochs)
        self._plateau = None
        if scheduler is not None and isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau):
            self._plateau = (scheduler["scheduler"], scheduler["monitor"])  # stepped in on_validation_epoch_end
            if self._plateau_state is not None:
                self._plateau[0].load_state_dict(self._plateau_state)
            scheduler = None
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._plateau is not None:
            checkpoint["plateau_scheduler"] = self._plateau[0].state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._plateau_state = checkpoint.get("plateau_scheduler")  # applied when the optimizer is configured

    # ------------------------------------------------------------------------------------------------ export
    def export_model(self) -> torch.nn.Module:
        """The model to save: the EMA weights (when enabled), in eval mode."""
        model = self.eval_model
        model.eval()
        return model
