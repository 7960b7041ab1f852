"""Radial part of an edge: Bessel basis times a smooth cutoff envelope, and the MLP that turns it into
per-edge, per-channel tensor-product weights.

Every map from the edge length to the convolution weights vanishes, with its first two derivatives, at
the cutoff: the envelope does, and the MLP has no biases and ``silu(0) = 0``, so ``MLP(0) = 0``.
An edge that crosses the cutoff therefore changes neither the energy nor the forces discontinuously.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class BesselBasis(nn.Module):
    """``sqrt(2 / r_c) * sin(n pi r / r_c) / r`` for ``n = 1..num_basis``: ``r [E]`` -> ``[E, num_basis]``.

    The frequencies are fixed (not trained). ``r`` must be positive (no zero-length edges).
    """

    def __init__(self, cutoff: float, num_basis: int = 8) -> None:
        super().__init__()
        if cutoff <= 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        if num_basis < 1:
            raise ValueError(f"num_basis must be >= 1, got {num_basis}")
        self.cutoff = float(cutoff)
        self.num_basis = int(num_basis)
        self.register_buffer(
            "frequencies", math.pi / cutoff * torch.arange(1, num_basis + 1, dtype=torch.float64), persistent=False
        )
        self.prefactor = math.sqrt(2.0 / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)  # [E, 1]
        return self.prefactor * torch.sin(self.frequencies.to(r.dtype) * r) / r  # [E, num_basis]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num_basis={self.num_basis}"


class PolynomialCutoff(nn.Module):
    """Smooth envelope ``f(x)``, ``x = r / r_c``: ``1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)``
    for ``x < 1`` and 0 beyond.

    ``f(1) = f'(1) = f''(1) = 0``, so energies, forces and their first derivative are continuous at the cutoff.
    """

    def __init__(self, cutoff: float, p: int = 5) -> None:
        super().__init__()
        if p < 2:
            raise ValueError(f"the envelope exponent p must be >= 2, got {p}")
        self.cutoff = float(cutoff)
        self.p = int(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = r / self.cutoff
        f = 1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
        return f * (x < 1.0).to(r.dtype)  # [E]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, p={self.p}"


class RadialEmbedding(nn.Module):
    """Edge length ``r [E]`` -> radial features ``[E, num_basis]``: Bessel basis times the envelope."""

    def __init__(self, cutoff: float, num_basis: int = 8, envelope_exponent: int = 5) -> None:
        super().__init__()
        self.basis = BesselBasis(cutoff, num_basis)
        self.envelope = PolynomialCutoff(cutoff, envelope_exponent)
        self.num_basis = num_basis

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.basis(r) * self.envelope(r).unsqueeze(-1)  # [E, num_basis]


class ScaledSiLU(nn.Module):
    """``silu(x) / sqrt(E[silu(z)^2])`` with ``z ~ N(0, 1)``: keeps unit second moment through deep MLPs."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(_second_moment(nn.functional.silu))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(x) * self.scale


def _second_moment(fn) -> float:
    """``E[fn(z)^2]`` for ``z ~ N(0, 1)`` by Gauss–Hermite quadrature (exact enough for smooth ``fn``)."""
    import numpy as np

    nodes, weights = np.polynomial.hermite_e.hermegauss(100)  # weight exp(-z^2 / 2)
    values = fn(torch.tensor(nodes, dtype=torch.float64)).numpy()
    return float((weights * values**2).sum() / math.sqrt(2 * math.pi))


class RadialMLP(nn.Module):
    """Radial features ``[E, num_basis]`` -> tensor-product weights ``[E, channels, num_weights]``.

    Bias-free linear layers (weights ``N(0, 1/fan_in)``) with a normalised SiLU between them, so the output is
    exactly zero where the input is (at and beyond the cutoff).
    """

    def __init__(self, num_basis: int, hidden: Sequence[int], channels: int, num_weights: int) -> None:
        super().__init__()
        sizes = [num_basis, *hidden, channels * num_weights]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            linear = nn.Linear(fan_in, fan_out, bias=False)
            nn.init.normal_(linear.weight, std=fan_in**-0.5)
            layers.append(linear)
            if i < len(sizes) - 2:
                layers.append(ScaledSiLU())
        self.net = nn.Sequential(*layers)
        self.channels, self.num_weights = channels, num_weights

    def forward(self, radial: torch.Tensor) -> torch.Tensor:
        return self.net(radial).view(-1, self.channels, self.num_weights)  # [E, C, P]
