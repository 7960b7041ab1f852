"""Training: the LightningModule (losses, metrics, EMA), the Hydra entry point ``tdn-train`` and model export.

from tdn.train import train, compose
result = train(compose(["tp=grid", "epochs=2"]), "outputs/run")
"""

from __future__ import annotations

import threading

from . import resolvers
from .ema import EMA
from .errors import ConfigError, NonFiniteLossError
from .losses import LossConfig, PotentialLoss
from .metrics import METRICS, GenericMetrics, MetricSet, PubChemQCRMetrics, S2EFMetrics
from .resolvers import CONF_DIR

_COMPOSE_LOCK = threading.Lock()


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """The config ``tdn-train`` would use for ``overrides`` (Hydra's compose API on the repository's conf/).
    Safe to call from several threads at once (Hydra's global state is held for one call at a time)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with _COMPOSE_LOCK:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def train(cfg, output_dir):
    """Run training as ``tdn-train`` does (see :func:`tdn.train.run.train`)."""
    from .run import train as _train

    return _train(cfg, output_dir)


def __getattr__(name: str):
    if name == "PotentialModule":
        from .module import PotentialModule

        return PotentialModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CONF_DIR",
    "EMA",
    "METRICS",
    "ConfigError",
    "GenericMetrics",
    "LossConfig",
    "MetricSet",
    "NonFiniteLossError",
    "PotentialLoss",
    "PotentialModule",
    "PubChemQCRMetrics",
    "S2EFMetrics",
    "compose",
    "resolvers",
    "train",
]
