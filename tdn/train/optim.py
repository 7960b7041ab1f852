"""Optimizers (Adam / AdamW, optionally AMSGrad) and learning-rate schedules (ReduceLROnPlateau, cosine with
linear warm-up) from the ``optimizer`` and ``lr_scheduler`` sections of the config."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULERS = ("plateau", "cosine", "none")


def _check_keys(section: str, values: Mapping[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {section} option(s) {unknown}; known: {sorted(known)}")


def build_optimizer(
    params: Iterable[tuple[str, nn.Parameter]],
    config: Mapping[str, Any],
    lr_factors: Mapping[str, float] | None = None,
) -> torch.optim.Optimizer:
    """``config``: name (adam | adamw), lr, amsgrad, weight_decay, betas, eps.

    Weight decay applies to weight matrices only (parameters with two or more dimensions), never to biases or
    per-element scalars. ``lr_factors`` (parameter name -> factor, 1 for names it lacks) puts parameters in
    groups that train at ``lr * factor`` (each group records its ``lr_factor``); parameters that do not require a
    gradient are left out.
    """
    config = dict(config)
    _check_keys("optimizer", config, ("name", "lr", "amsgrad", "weight_decay", "betas", "eps"))
    name = str(config.pop("name", "adam")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    weight_decay = float(config.pop("weight_decay", 0.0))
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for param_name, p in params:
        if p.requires_grad:
            factor = 1.0 if lr_factors is None else float(lr_factors.get(param_name, 1.0))
            grouped.setdefault((factor, p.ndim >= 2), []).append(p)
    groups = []
    for (factor, decay), members in sorted(grouped.items(), key=lambda item: (-item[0][0], not item[0][1])):
        group: dict[str, Any] = {"params": members, "weight_decay": weight_decay if decay else 0.0}
        if lr_factors is not None:
            group.update(lr_factor=factor, lr=float(config.get("lr", 1e-3)) * factor)
        groups.append(group)
    if "betas" in config:
        config["betas"] = tuple(float(b) for b in config["betas"])
    if not groups:
        raise ValueError("no parameter requires a gradient: nothing to optimize")
    return OPTIMIZERS[name](groups, **config)


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """LR factor per optimizer step: linear up to 1 over ``warmup_steps``, then a half cosine to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


PLATEAU_KEYS = ("factor", "patience", "min_lr", "threshold", "monitor")
COSINE_KEYS = ("warmup_epochs", "min_lr_ratio")


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Mapping[str, Any], total_steps: int, steps_per_epoch: float
) -> dict[str, Any] | None:
    """A Lightning ``lr_scheduler`` dict, or None for a constant learning rate (``name: none``).

    plateau: factor, patience (epochs), min_lr, threshold, monitor (default ``val/loss``); stepped every epoch.
    cosine: warmup_epochs (linear warm-up, may be fractional), min_lr_ratio (final lr / initial lr); stepped every
    optimizer step over ``total_steps``. Keys of the other schedule are ignored, so one section can hold both.
    """
    config = dict(config)
    _check_keys("lr_scheduler", config, ("name", *PLATEAU_KEYS, *COSINE_KEYS))
    name = str(config.pop("name", "plateau")).lower()
    if name not in SCHEDULERS:
        raise ValueError(f"lr_scheduler.name must be one of {SCHEDULERS}, got {name!r}")
    if name == "none":
        return None
    if name == "plateau":
        options = {k: config[k] for k in PLATEAU_KEYS if k in config and k != "monitor"}
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", **options)
        monitor = config.get("monitor") or "val/loss"
        return {"scheduler": scheduler, "monitor": monitor, "interval": "epoch", "frequency": 1, "strict": True}
    warmup_steps = int(round(float(config.get("warmup_epochs") or 0.0) * steps_per_epoch))
    factor = warmup_cosine(int(total_steps), warmup_steps, float(config.get("min_lr_ratio") or 0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}
