"""Parameter counts per backend (the table in docs/parameters.md)."""

from __future__ import annotations

from typing import Any

from torch import nn


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per part of a :class:`tdn.models.TDNModel`."""
    parts = {
        "embedding": model.embedding,
        "radial MLPs": [block.radial_mlp for block in model.interactions],
        "conv linears": [[block.linear_up, block.linear] for block in model.interactions],
        "conv tensor product": [block.tp for block in model.interactions],
        "self-connections": model.self_connections,
        "product basis": [block.basis for block in model.products],
        "product linears": [block.linear for block in model.products],
        "readouts": model.readouts,
    }

    def count(obj: Any) -> int:
        if isinstance(obj, nn.Module):
            return count_parameters(obj)
        return sum(count(o) for o in obj)

    out = {name: count(obj) for name, obj in parts.items()}
    out["total"] = count_parameters(model)
    return out


def parameter_table(
    backends: tuple[str, ...] = ("cg", "cp", "gaunt", "grid"),
    elements: tuple[int, ...] = (1, 6, 7, 8),
    preset: str = "mace-medium",
    **overrides: Any,
) -> list[dict[str, Any]]:
    """One row per backend (and weight mode) at the preset's widths: config summary and parameter breakdown."""
    from . import build_model

    rows = []
    for kind in backends:
        model = build_model(preset=preset, tp=kind, elements=list(elements), dtype="float32", **overrides)
        row = {
            "tp": kind,
            "tp_weights": model.config.tp_weights,
            "num_weights": [block.tp.num_weights for block in model.interactions],
        }
        rows.append({**row, **parameter_breakdown(model)})
    return rows
