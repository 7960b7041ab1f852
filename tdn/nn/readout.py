"""Readouts: per-atom energy contributions from the scalar (l = 0) channels of the node features."""

from __future__ import annotations

import torch
from torch import nn

from .radial import ScaledSiLU


class LinearReadout(nn.Module):
    """``h [N, C, D]`` -> ``[N]``: a bias-free linear map of the scalars (used after every layer but the last)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, 1, bias=False)
        nn.init.normal_(self.linear.weight, std=channels**-0.5)

    def forward(self, node_feats: torch.Tensor) -> torch.Tensor:
        return self.linear(node_feats[:, :, 0]).squeeze(-1)  # [N]


class MLPReadout(nn.Module):
    """``h [N, C, D]`` -> ``[N]``: linear -> SiLU -> linear on the scalars (after the last layer), no biases."""

    def __init__(self, channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), ScaledSiLU(), nn.Linear(hidden, 1, bias=False)
        )
        for layer in (self.net[0], self.net[2]):
            nn.init.normal_(layer.weight, std=layer.in_features**-0.5)

    def forward(self, node_feats: torch.Tensor) -> torch.Tensor:
        return self.net(node_feats[:, :, 0]).squeeze(-1)  # [N]
