"""Saving and loading models as one self-describing file.

The file is ``torch.save`` of a dict of plain types and tensors only (no pickled classes), so it loads with
``torch.load(..., weights_only=True)``::

    {"format": "tdn-model", "format_version": 1, "tdn_version": "0.1.0",
     "config": "<ModelConfig as JSON>", "state_dict": {name: tensor, ...}}

Weights are stored on the CPU in the model's dtype; ``load_model`` rebuilds the model from the config and can
move it to any device and dtype.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

FORMAT = "tdn-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """The file is not a readable tdn model, or was written by an incompatible version."""


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (a :class:`tdn.models.TDNModel`) to ``path``: config, weights, format version."""
    from . import __version__
    from .models import TDNModel

    if not isinstance(model, TDNModel):
        raise TypeError(f"save_model needs a tdn.models.TDNModel, got {type(model).__name__}")
    config = model.sync_config().to_dict()
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tdn_version": __version__,
        "config": json.dumps(config),
        "state_dict": {name: t.detach().cpu().clone() for name, t in model.state_dict().items()},
    }
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written model under the final name


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """The checked contents of a model file: ``format_version``, ``tdn_version``, ``config`` (dict), ``state_dict``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, not a torch file, or contains pickled classes
        raise ModelFileError(f"{path!r} is not a readable tdn model file: {type(error).__name__}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path!r} is not a tdn model file (no format={FORMAT!r} marker)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelFileError(
            f"{path!r} has model file format version {version!r} (tdn {payload.get('tdn_version')}); "
            f"this tdn reads versions 1..{FORMAT_VERSION}: upgrade tdn"
        )
    try:
        config = json.loads(payload["config"])
        state_dict = payload["state_dict"]
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path!r}: damaged model file ({type(error).__name__}: {error})") from error
    if not isinstance(config, dict) or not isinstance(state_dict, dict):
        raise ModelFileError(f"{path!r}: damaged model file (config or state_dict has the wrong type)")
    return {**payload, "config": config, "state_dict": state_dict}


def load_model(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> torch.nn.Module:
    """Rebuild a model written by :func:`save_model`; ``device`` (default CPU) and ``dtype`` (default: as saved).

    Returned in eval mode. A corrupt or incompatible file raises :class:`ModelFileError` (a ValueError).
    """
    from .models import ModelConfig, TDNModel

    payload = read_model_file(path)
    config_values = payload["config"]
    if dtype is not None:
        config_values["dtype"] = str(dtype).removeprefix("torch.")
    try:
        config = ModelConfig.from_dict(config_values)
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{os.fspath(path)!r}: incompatible model config: {error}") from error
    model = TDNModel(config)
    state_dict = payload["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong_shape:
        raise ModelFileError(
            f"{os.fspath(path)!r}: weights do not fit the model its config describes "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}); "
            f"was it written by a different tdn version ({payload.get('tdn_version')})?"
        )
    model.load_state_dict(state_dict)  # copies into the model's dtype
    model.sync_config()
    if device is not None:
        model.to(device)
    return model.eval()
