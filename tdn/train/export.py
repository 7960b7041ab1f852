"""Export of the trained model (``tdn.save_model``) and the check that the file reproduces it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..io import load_model, save_model


def export_model(model: torch.nn.Module, path: str | Path) -> Path:
    """Write ``model`` (eval mode) with :func:`tdn.save_model`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    save_model(model, path)
    return path


def energies(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Energies [B] of a batch (on the model's device), without forces."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(batch.to(device), compute_forces=False)["energy"].detach()


def reproduction_error(model: torch.nn.Module, path: str | Path, batch: Any) -> float:
    """Largest |E_file - E_model| (eV) over the structures of ``batch``: the exported file against the model."""
    model.eval()
    reloaded = load_model(path, device=next(model.parameters()).device)
    return float((energies(reloaded, batch) - energies(model, batch)).abs().max())
