"""Gaunt product on a spherical grid ("The Price of Freedom", Xie et al. 2025).

Both inputs are evaluated as sphere functions ``f = x . Y``, ``g = y . Y`` on a Gauss–Legendre x uniform grid
just fine enough to be exact for the band limit ``lmax_in + lmax_sh + lmax_out``, multiplied pointwise and
projected back with the quadrature weights: ``out_k = sum_q w_q f(r_q) g(r_q) Y_k(r_q)``, i.e. the Gaunt tensor.
"""

from __future__ import annotations

import torch

from ..o3 import sphere_grid, spherical_harmonics
from .base import FactorisedProduct

GAUNT_REASON = (
    "a Gaunt product multiplies sphere functions, so it only produces couplings with l1 + l2 + l3 even "
    "(the 'o3' path set); use 'cg' or 'cp' for 'so3'"
)


class GauntSupport:
    """What the Gaunt-product backends ("grid" here, "gaunt" in .gaunt) accept: a product of sphere functions has
    the 'o3' couplings only, and no per-path weights (the split of the product over paths is fixed). The grid
    product also takes "inout" weights: its factors split by input degree (the rows of the sphere values of x)."""

    supported_paths = ("o3",)
    supported_weights = ("shared", "degree")
    default_weights = "degree"  # the most a Gaunt product supports
    unsupported_reason = GAUNT_REASON


class GridProduct(GauntSupport, FactorisedProduct):
    kind = "grid"
    supported_weights = ("shared", "degree", "inout")

    def __init__(self, lmax_in: int, lmax_sh: int, lmax_out: int, channels: int, paths: str = "o3",
                 weights: str = "shared") -> None:
        super().__init__(lmax_in, lmax_sh, lmax_out, channels, paths, weights)
        points, quad_weights = sphere_grid(lmax_in + lmax_sh + lmax_out)
        self.num_points = points.shape[0]
        self.register_buffer("to_grid_in", spherical_harmonics(lmax_in, points).T.contiguous())  # [d_in, Q]
        self.register_buffer("to_grid_sh", spherical_harmonics(lmax_sh, points).T.contiguous())  # [d_sh, Q]
        self.register_buffer("from_grid", quad_weights[:, None] * spherical_harmonics(lmax_out, points))  # [Q, d_out]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # sphere values of x and y at the Q grid points, and the quadrature projection back to SH
        return self.to_grid_in, self.to_grid_sh, self.from_grid
