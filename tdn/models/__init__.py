"""The MACE-like model assembled from :mod:`tdn.nn` with a chosen tensor-product backend."""

from __future__ import annotations

from typing import Any

import torch

from .config import DEFAULT_TP_WEIGHTS, PRESETS, ModelConfig
from .model import TDNModel, UnknownElementError
from .params import count_parameters, parameter_table


def build_model(
    tp: str | None = None,
    lmax: int | None = None,
    channels: int | None = None,
    num_layers: int | None = None,
    correlation: int | None = None,
    cutoff: float | None = None,
    elements: list[int] | None = None,
    *,
    preset: str | None = None,
    config: ModelConfig | dict[str, Any] | None = None,
    **more: Any,
) -> TDNModel:
    """An untrained model. Defaults: ``tp="cp", lmax=2, channels=32, num_layers=2, correlation=3, cutoff=5.0``
    and the rest of :class:`ModelConfig`.

    Values are taken, later winning, from: ModelConfig's defaults, the named ``preset`` (see ``PRESETS``, e.g.
    ``"mace-medium"``), ``config`` (a ModelConfig or a dict of its fields), and the keyword arguments that are
    not None (``more`` takes any other ModelConfig field: ``lmax_hidden``, ``tp_weights``, ``atomic_energies``,
    ``avg_num_neighbors``, ``dtype``, ...).
    """
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    if config is not None:
        values.update(config.to_dict() if isinstance(config, ModelConfig) else dict(config))
    explicit = dict(
        tp=tp,
        lmax=lmax,
        channels=channels,
        num_layers=num_layers,
        correlation=correlation,
        cutoff=cutoff,
        elements=elements,
    )
    values.update({k: v for k, v in explicit.items() if v is not None})
    values.update(more)
    if isinstance(values.get("dtype"), torch.dtype):
        values["dtype"] = str(values["dtype"]).removeprefix("torch.")
    if "elements" not in values:
        raise ValueError("build_model needs elements=[atomic numbers], e.g. elements=[1, 6, 8]")
    return TDNModel(ModelConfig.from_dict(values))


__all__ = [
    "DEFAULT_TP_WEIGHTS",
    "PRESETS",
    "ModelConfig",
    "TDNModel",
    "UnknownElementError",
    "build_model",
    "count_parameters",
    "parameter_table",
]
