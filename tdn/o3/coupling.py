"""Coupling tensors of the stacked layout: the CG path tensor ``M`` and the Gaunt tensor ``G``.

Both are ``[d3, d1, d2]`` tensors (output, first input, second input) acting as a bilinear map
``out[k] = sum_ij T[k, i, j] x[i] y[j]`` on stacked features with ``d = (l + 1)^2``.

``M`` stacks one Wigner-3j block per path ``(l1, l2, l3)``, scaled by ``sqrt((2 l3 + 1) / n(l3))``
where ``n(l3)`` counts the paths into ``l3``: e3nn's "component" irrep normalisation with "element"
path normalisation, so unit-variance inputs give unit-variance outputs.

``G`` is the Gaunt tensor ``G[k, i, j] = <Y_k Y_i Y_j>``, the mean over the unit sphere; it is the
product of sphere functions ``f = x . Y``, ``g = y . Y`` written back in the same basis: ``(f g)_k = G[k] : x y``.
"""

from __future__ import annotations

from functools import cache

import torch
from e3nn import o3

from .harmonics import spherical_harmonics
from .irreps import check_path_set, degree_slice, dim
from .quadrature import sphere_grid

Path = tuple[int, int, int]


def path_list(lmax_in: int, lmax_sh: int, lmax_out: int, paths: str = "o3") -> list[Path]:
    """All ``(l1, l2, l3)`` allowed by the triangle rule (and, for "o3", with ``l1 + l2 + l3`` even)."""
    check_path_set(paths)
    out = []
    for l1 in range(lmax_in + 1):
        for l2 in range(lmax_sh + 1):
            for l3 in range(abs(l1 - l2), min(l1 + l2, lmax_out) + 1):
                if paths == "so3" or (l1 + l2 + l3) % 2 == 0:
                    out.append((l1, l2, l3))
    return out


def path_coefficients(path_set: list[Path]) -> list[float]:
    """``sqrt((2 l3 + 1) / n(l3))`` for every path: the normalisation used in ``M``."""
    count: dict[int, int] = {}
    for _, _, l3 in path_set:
        count[l3] = count.get(l3, 0) + 1
    return [((2 * l3 + 1) / count[l3]) ** 0.5 for _, _, l3 in path_set]


@cache
def _path_blocks(lmax_in: int, lmax_sh: int, lmax_out: int, paths: str) -> tuple[tuple[Path, torch.Tensor], ...]:
    path_set = path_list(lmax_in, lmax_sh, lmax_out, paths)
    blocks = []
    for (l1, l2, l3), c in zip(path_set, path_coefficients(path_set)):
        w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)  # [2l1+1, 2l2+1, 2l3+1], unit Frobenius norm
        blocks.append(((l1, l2, l3), c * w3j.permute(2, 0, 1).contiguous()))
    return tuple(blocks)


def path_blocks(lmax_in: int, lmax_sh: int, lmax_out: int, paths: str = "o3") -> list[tuple[Path, torch.Tensor]]:
    """Per path ``(l1, l2, l3)``: its normalised block ``[2 l3 + 1, 2 l1 + 1, 2 l2 + 1]`` of ``M`` (float64)."""
    return [(p, b.clone()) for p, b in _path_blocks(lmax_in, lmax_sh, lmax_out, check_path_set(paths))]


def path_tensor(lmax_in: int, lmax_sh: int, lmax_out: int, paths: str = "o3") -> torch.Tensor:
    """The stacked CG path tensor ``M`` ``[d3, d1, d2]`` (float64): the sum of all path blocks."""
    m = torch.zeros(dim(lmax_out), dim(lmax_in), dim(lmax_sh), dtype=torch.float64)
    for (l1, l2, l3), block in _path_blocks(lmax_in, lmax_sh, lmax_out, check_path_set(paths)):
        m[degree_slice(l3), degree_slice(l1), degree_slice(l2)] += block
    return m


@cache
def _gaunt(lmax_in: int, lmax_sh: int, lmax_out: int) -> torch.Tensor:
    points, weights = sphere_grid(lmax_in + lmax_sh + lmax_out)
    y1 = spherical_harmonics(lmax_in, points)
    y2 = spherical_harmonics(lmax_sh, points)
    y3 = spherical_harmonics(lmax_out, points)
    g = torch.einsum("q,qk,qi,qj->kij", weights, y3, y1, y2)
    return torch.where(g.abs() < 1e-13, torch.zeros_like(g), g)  # exact zeros where the integral vanishes


def gaunt_tensor(lmax_in: int, lmax_sh: int, lmax_out: int) -> torch.Tensor:
    """The Gaunt tensor ``G[k, i, j] = mean over the sphere of Y_k Y_i Y_j`` ``[d3, d1, d2]`` (float64).

    Nonzero only for ``l1 + l2 + l3`` even (and the triangle rule): a Gaunt product cannot represent the
    odd ("so3"-only) couplings, and within each allowed path its weight is fixed by the integral.
    """
    return _gaunt(lmax_in, lmax_sh, lmax_out).clone()
