"""Gauss–Legendre x uniform quadrature on the unit sphere."""

from __future__ import annotations

import math

import numpy as np
import torch


def grid_shape(band_limit: int) -> tuple[int, int]:
    """``(n_theta, n_phi)`` of the smallest grid that integrates every polynomial of degree ``<= band_limit``.

    Gauss–Legendre with ``n`` nodes in ``cos(theta)`` is exact to degree ``2n - 1``; ``n_phi`` uniform nodes
    are exact for trigonometric polynomials of degree ``< n_phi``.
    """
    if band_limit < 0:
        raise ValueError(f"band_limit must be >= 0, got {band_limit}")
    return band_limit // 2 + 1, band_limit + 1


def sphere_grid(band_limit: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``[Q, 3]`` and weights ``[Q]`` (summing to 1) so that ``sum_q w_q f(r_q)`` is the mean of ``f``
    over the sphere, exactly for polynomials of degree ``<= band_limit``.

    Points are ordered theta-major: ``q = i_theta * n_phi + i_phi``.
    """
    n_theta, n_phi = grid_shape(band_limit)
    cos_theta, w_theta = np.polynomial.legendre.leggauss(n_theta)  # weights sum to 2
    phi = 2 * math.pi * np.arange(n_phi) / n_phi
    sin_theta = np.sqrt(1.0 - cos_theta**2)
    points = np.stack(
        [
            sin_theta[:, None] * np.cos(phi)[None, :],
            sin_theta[:, None] * np.sin(phi)[None, :],
            np.broadcast_to(cos_theta[:, None], (n_theta, n_phi)),
        ],
        axis=-1,
    ).reshape(-1, 3)
    weights = np.broadcast_to(w_theta[:, None] / (2 * n_phi), (n_theta, n_phi)).reshape(-1)
    return torch.tensor(points, dtype=dtype), torch.tensor(weights, dtype=dtype)
