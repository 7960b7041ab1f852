"""The run's loggers, from ``loggers: [csv, tensorboard, wandb, mlflow]`` and the ``wandb`` / ``mlflow`` sections.

csv (``<run>/metrics.csv``, which the learning curve is drawn from) and TensorBoard (``<run>/tensorboard``) need
nothing more. Weights & Biases and MLflow are optional packages: asking for one that is not installed is a
ConfigError naming the ``pip install`` that fixes it. Weights & Biases writes under ``<run>/wandb`` (offline with
``wandb.mode=offline`` or ``WANDB_MODE=offline``; ``wandb sync`` uploads later); MLflow writes to a local file store
in ``<run>/mlruns`` unless ``mlflow.tracking_uri`` says otherwise (e.g. ``sqlite:///mlflow.db`` or a server).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from .csvlog import RunCSVLogger
from .errors import ConfigError

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
DEFAULT_LOGGERS = ("csv", "tensorboard")
WANDB_MODES = ("offline", "online", "disabled")
WANDB_KEYS = ("project", "name", "mode", "tags", "group")
MLFLOW_KEYS = ("tracking_uri", "experiment_name", "run_name")


def require(package: str, logger: str) -> None:
    """Import ``package`` or raise a ConfigError that says how to install it."""
    try:
        importlib.import_module(package)
    except ImportError:
        raise ConfigError(
            f"loggers: {logger} needs the {package} package, which is not installed: pip install {package} "
            f"(or leave {logger} out of loggers)"
        ) from None


def logger_names(cfg: DictConfig) -> list[str]:
    """The checked ``loggers`` list (a single name is accepted too)."""
    names = cfg.get("loggers", list(DEFAULT_LOGGERS))
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    elif OmegaConf.is_config(names):
        names = OmegaConf.to_container(names)
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(
            f"loggers: unknown logger(s) {unknown}; choose from {list(LOGGERS)} (e.g. loggers=[csv,wandb])"
        )
    return list(dict.fromkeys(names))


def check_loggers(cfg: DictConfig) -> list[str]:
    """The logger names, after checking that the optional packages they need are installed (before any data is
    read or any file written)."""
    names = logger_names(cfg)
    for name in names:
        if name in ("wandb", "mlflow"):
            require(name, name)
    return names


def _section(cfg: DictConfig, name: str, known: tuple[str, ...]) -> dict[str, Any]:
    values = OmegaConf.to_container(cfg[name], resolve=True) if name in cfg and cfg[name] is not None else {}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {name} option(s) {unknown}; known: {sorted(known)}")
    return values


def wandb_logger(options: Mapping[str, Any], output_dir: Path) -> Logger:
    from lightning.pytorch.loggers import WandbLogger

    mode = options.get("mode")
    if mode is not None and mode not in WANDB_MODES:
        raise ConfigError(f"wandb.mode must be one of {list(WANDB_MODES)} or null (WANDB_MODE decides), got {mode!r}")
    extra = {"mode": mode} if mode is not None else {}  # passed to wandb.init: no process-wide WANDB_MODE change
    if options.get("group"):
        extra["group"] = options["group"]
    return WandbLogger(
        save_dir=str(output_dir),
        project=options.get("project") or "tdn",
        name=options.get("name") or output_dir.name,
        tags=list(options.get("tags") or []),
        **extra,
    )


def mlflow_logger(options: Mapping[str, Any], output_dir: Path) -> Logger:
    from lightning.pytorch.loggers import MLFlowLogger

    uri = options.get("tracking_uri")
    if not uri:  # a local file store in the run directory, which MLflow >= 3 only opens when told it may
        uri = (output_dir / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(
        experiment_name=options.get("experiment_name") or "tdn",
        run_name=options.get("run_name") or output_dir.name,
        tracking_uri=uri,
    )


def build_loggers(cfg: DictConfig, output_dir: Path, keep_history: bool = False) -> list[Logger]:
    """The loggers ``cfg.loggers`` names, writing under ``output_dir`` (``keep_history``: see RunCSVLogger)."""
    loggers: list[Logger] = []
    names = check_loggers(cfg)
    wandb_options = _section(cfg, "wandb", WANDB_KEYS)
    mlflow_options = _section(cfg, "mlflow", MLFLOW_KEYS)
    for name in names:
        if name == "csv":
            loggers.append(RunCSVLogger(output_dir, keep_history=keep_history))
        elif name == "tensorboard":
            loggers.append(
                TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version="", default_hp_metric=False)
            )
        elif name == "wandb":
            loggers.append(wandb_logger(wandb_options, output_dir))
        else:
            loggers.append(mlflow_logger(mlflow_options, output_dir))
    return loggers
