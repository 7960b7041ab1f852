"""Saving and loading models as one self-describing file.

The file is ``torch.save`` of a dict of plain types and tensors only (no pickled classes), so it loads with
``torch.load(..., weights_only=True)``::

    {"format": "tdn-model", "format_version": 1, "tdn_version": "0.1.0",
     "config": "<ModelConfig as JSON>", "state_dict": {name: tensor, ...}}

Weights are stored on the CPU in the model's dtype; ``load_model`` rebuilds the model from the config and can
move it to any device and dtype. The config records the rank of every CP factor set (``cp_factors``), so the
rebuild makes placeholders of the file's shapes instead of looking up or fitting factors the file replaces anyway.
A model with a NaN or infinite weight or buffer is never written (:class:`NonFiniteModelError`); a file holding
pickled Python objects is never loaded.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import torch

FORMAT = "tdn-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """The file is not a readable tdn model, or was written by an incompatible version."""


class NonFiniteModelError(ValueError):
    """The model has NaN or infinite weights or buffers: it is never written."""


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` holding a NaN or an infinity."""
    return [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def check_finite(model: torch.nn.Module, what: str = "model") -> None:
    """Raise :class:`NonFiniteModelError` naming the tensors of ``model`` that are not finite."""
    bad = non_finite_tensors(model)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteModelError(
            f"the {what} has non-finite (NaN or inf) values in {shown}; a model like that is never saved "
            "(did training diverge? lower the learning rate or check the data, then export a finite checkpoint)"
        )


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (a :class:`tdn.models.TDNModel`) to ``path``: config, weights, format version."""
    from . import __version__
    from .models import TDNModel

    if not isinstance(model, TDNModel):
        raise TypeError(f"save_model needs a tdn.models.TDNModel, got {type(model).__name__}")
    check_finite(model)  # before anything is written: a NaN model must not replace a good file
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


def refused_global(error: Exception) -> str:
    """What a weights-only load refused (e.g. "Unsupported global: GLOBAL torch.nn.Linear ..."), from PyTorch's
    message, without its advice to unpickle the file anyway."""
    text = str(error)
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
    return text.splitlines()[0].strip() if text.strip() else type(error).__name__


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """The checked contents of a model file: ``format_version``, ``tdn_version``, ``config`` (dict), ``state_dict``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # PyTorch's advice (weights_only=False) is not ours to repeat
        raise ModelFileError(
            f"{path!r} is not a readable tdn model file: it holds pickled Python objects "
            f"({refused_global(error)}), and tdn refuses to load pickled code. A tdn model file holds only a config "
            "and tensors: re-export it (build the model from its config with tdn.models.build_model(config=...), "
            "load its weights with model.load_state_dict(...), write it with tdn.save_model(model, path))"
        ) from None
    except Exception as error:  # truncated, corrupt, not a torch file
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


def cp_factor_tensors(model: torch.nn.Module) -> set[str]:
    """State-dict names of the CP factor tensors of ``model`` (two-body products and product-basis contractions):
    the tensors whose shapes the ranks in ``config.cp_factors`` fix."""
    from .contractions import CPContraction
    from .tp.cp import CPProduct

    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, (CPProduct, CPContraction))
        for name, _ in module.named_buffers(recurse=False)
    }


def load_model(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> torch.nn.Module:
    """Rebuild a model written by :func:`save_model`; ``device`` (default CPU) and ``dtype`` (default: as saved).

    The CP factors whose ranks the config records (``cp_factors``) are built as placeholders of those ranks and take
    the file's values: no factor file is read, fitted or cached. A file without that record (written before it
    existed) gets its factors looked up, or fitted, as when the model was built, then replaced by the file's.
    Returned in eval mode. A corrupt or incompatible file, or one whose recorded ranks disagree with its factor
    tensors, raises :class:`ModelFileError` (a ValueError).
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
    recorded = config.cp_factors
    model = TDNModel(config, factors_from=os.fspath(path))  # CP factors recorded in the config: placeholders
    state_dict = payload["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    wrong_factors = sorted(set(wrong_shape) & cp_factor_tensors(model)) if recorded is not None else []
    if wrong_factors:
        shown = ", ".join(
            f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(expected[k].shape)} by the record"
            for k in wrong_factors[:3]
        )
        raise ModelFileError(
            f"{os.fspath(path)!r}: the CP ranks recorded in its config (cp_factors) disagree with the factor tensors "
            f"it holds ({shown}); the file was edited or damaged"
        )
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
