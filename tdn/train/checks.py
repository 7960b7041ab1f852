"""Types and ranges of the config's plain options, checked before anything runs.

Hydra accepts any value on the command line (``epochs=abc`` is the string "abc"); without these checks the mistake
surfaces deep inside Lightning or the data module as an unrelated error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError


@dataclass(frozen=True)
class Option:
    """``kind``: "int", "number" or "bool"; ``minimum`` (inclusive) and ``positive`` (> 0) for numbers."""

    key: str
    kind: str
    minimum: float | None = None
    positive: bool = False
    nullable: bool = False
    example: str = ""


OPTIONS = (
    Option("epochs", "int", minimum=1, example="epochs=50"),
    Option("batch_size", "int", minimum=1, nullable=True, example="batch_size=8"),
    Option("seed", "int", example="seed=0"),
    Option("cutoff", "number", positive=True, example="cutoff=5.0"),
    Option("num_nodes", "int", minimum=1),
    Option("cpu_threads", "int", minimum=1, nullable=True),
    Option("test", "bool"),
    Option("export", "bool"),
    Option("overwrite", "bool"),
    Option("debug", "bool"),
    Option("snapshots.every_n_epochs", "int", minimum=0, example="snapshots.every_n_epochs=5"),
    Option("committee.size", "int", minimum=1, example="committee.size=5"),
    Option("data.train_size", "number", minimum=0, nullable=True),
    Option("data.val_size", "number", minimum=0, nullable=True),
    Option("data.test_size", "number", minimum=0, nullable=True),
    Option("data.max_atoms", "int", minimum=1, nullable=True),
    Option("data.max_edges", "int", minimum=1, nullable=True),
    Option("data.max_neighbors", "int", minimum=1, nullable=True),
    Option("data.eval_batch_size", "int", minimum=1, nullable=True),
    Option("data.num_workers", "int", minimum=0),
    Option("data.stats_max_structures", "int", minimum=1, nullable=True),
    Option("data.skip_invalid", "bool"),
    Option("finetune.new_elements", "bool"),
    Option("finetune.pretrained_lr_factor", "number", positive=True, example="finetune.pretrained_lr_factor=0.1"),
    Option("finetune.replay.fraction", "number", positive=True, example="finetune.replay.fraction=0.2"),
    Option("training_module.optimizer.lr", "number", positive=True, example="training_module.optimizer.lr=0.01"),
    Option("training_module.optimizer.weight_decay", "number", minimum=0),
    Option("training_module.loss.energy_weight", "number", minimum=0),
    Option("training_module.loss.forces_weight", "number", minimum=0),
    Option("training_module.loss.stress_weight", "number", minimum=0),
    Option("training_module.loss.huber_delta", "number", positive=True),
    Option("training_module.lr_scheduler.factor", "number", positive=True),
    Option("training_module.lr_scheduler.patience", "int", minimum=0),
    Option("training_module.lr_scheduler.min_lr", "number", minimum=0),
    Option("training_module.lr_scheduler.warmup_epochs", "number", minimum=0),
    Option("training_module.lr_scheduler.min_lr_ratio", "number", minimum=0),
    Option("training_module.ema.decay", "number", minimum=0),
    Option("training_module.ema.enabled", "bool"),
    Option("trainer.gradient_clip_val", "number", minimum=0, nullable=True),
    Option("trainer.accumulate_grad_batches", "int", minimum=1),
    Option("trainer.check_val_every_n_epoch", "int", minimum=1, nullable=True),
    Option("trainer.log_every_n_steps", "int", minimum=1),
    Option("trainer.num_sanity_val_steps", "int", minimum=-1),
    Option("trainer.limit_train_batches", "number", minimum=0, nullable=True),
    Option("trainer.limit_val_batches", "number", minimum=0, nullable=True),
    Option("trainer.limit_test_batches", "number", minimum=0, nullable=True),
)


def _describe(option: Option) -> str:
    what = {"int": "an integer", "number": "a number", "bool": "true or false"}[option.kind]
    if option.positive:
        what += " > 0"
    elif option.minimum is not None:
        what += f" >= {option.minimum:g}"
    if option.nullable:
        what += " (or null)"
    return what


def _valid(option: Option, value: Any) -> bool:
    if value is None:
        return option.nullable
    if option.kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if option.kind == "int" and not isinstance(value, int):
        return False
    if not math.isfinite(value):
        return False
    if option.positive and not value > 0:
        return False
    return option.minimum is None or value >= option.minimum


def check_options(cfg: DictConfig) -> None:
    """A ConfigError naming the first option of :data:`OPTIONS` whose value has the wrong type or range."""
    absent = object()
    for option in OPTIONS:
        try:
            value = OmegaConf.select(cfg, option.key, default=absent, throw_on_missing=False)
        except OmegaConfBaseException:  # an interpolation that cannot resolve: reported where it is used
            continue
        if value is not absent and not _valid(option, value):
            hint = f" (e.g. {option.example})" if option.example else ""
            raise ConfigError(f"{option.key} must be {_describe(option)}, got {value!r}{hint}")
