"""Output second moments of the product-basis terms for unit-variance Gaussian inputs (Isserlis' theorem).

They set the fixed normalisation ``s[nu, L]`` of the weights: every output component of the product basis then has
unit variance at initialisation for unit-variance inputs.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from ..o3 import dim, sphere_grid, spherical_harmonics


def _isserlis(nu: int) -> list[tuple[int, int]]:
    """``(k, count)``: the pairings of two copies of ``nu`` slots with ``k`` pairs across the copies number
    ``C(nu, k)^2 k! ((nu - k - 1)!!)^2``; the other ``(nu - k) / 2`` pairs of each copy are internal."""

    def double_factorial(n: int) -> int:
        return math.prod(range(n, 0, -2)) if n > 0 else 1

    return [(k, math.comb(nu, k) ** 2 * math.factorial(k) * double_factorial(nu - k - 1) ** 2)
            for k in range(nu % 2, nu + 1, 2)]


def gaussian_second_moment(rows: torch.Tensor, nu: int) -> torch.Tensor:
    """``E[(T_k(A, ..., A))^2]`` for symmetric rows ``T_k`` ``[K, D^nu]`` and ``A ~ N(0, I_D)`` -> ``[K]``.

    Isserlis' theorem: ``sum_k count(k) ||tr^{(nu-k)/2} T||^2``, where ``tr`` contracts two slots with the
    identity (internal pairs) and ``k`` slots are paired across the two copies.
    """
    d = round(rows.shape[1] ** (1 / nu)) if nu > 0 else 1
    out = torch.zeros(rows.shape[0], dtype=torch.float64)
    traced = rows.to(torch.float64)
    for k, count in sorted(_isserlis(nu), reverse=True):  # k = nu, nu - 2, ...: one more trace each step
        out += count * (traced**2).sum(1)
        if k >= 2:
            traced = traced.reshape(rows.shape[0], -1, d, d).diagonal(dim1=2, dim2=3).sum(-1)
    return out


@cache
def power_second_moment(nu: int, lmax_in: int, lmax_out: int) -> torch.Tensor:
    """``E[((f^nu)_{LM})^2]`` ``[(lmax_out+1)^2]`` for the sphere function ``f = A . Y`` with ``A ~ N(0, I_D)``.

    ``f`` is a Gaussian field with variance ``D`` and covariance ``kappa(r, s) = Y(r) . Y(s)``, so
    ``E[f(r)^nu f(s)^nu] = sum_k count(k) kappa^k D^(nu-k)`` (same pairings as :func:`gaussian_second_moment`),
    integrated against ``Y_LM(r) Y_LM(s)`` with a quadrature exact for the band limit ``nu lmax_in + lmax_out``.
    """
    points, weights = sphere_grid(nu * lmax_in + lmax_out)
    y_in = spherical_harmonics(lmax_in, points)  # [Q, D]
    project = weights[:, None] * spherical_harmonics(lmax_out, points)  # [Q, D_out]
    kappa = y_in @ y_in.T  # [Q, Q]
    d = dim(lmax_in)
    kernel = sum(count * kappa**k * float(d) ** (nu - k) for k, count in _isserlis(nu))
    return torch.einsum("qm,qp,pm->m", project, kernel, project)
