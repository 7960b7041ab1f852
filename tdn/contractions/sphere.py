"""The sphere-power product-basis contraction ("gaunt" and "grid"): powers of the sphere function on an exact grid."""

from __future__ import annotations

import torch

from ..o3 import degree_of_component, degree_slice, dim, sphere_grid, spherical_harmonics
from ..tp.grid import GAUNT_REASON
from .base import Contraction
from .moments import power_second_moment


class SpherePowerContraction(Contraction):
    """Powers of the sphere function ("gaunt" and "grid" alike), one weight per ``(element, channel, nu, L)``.

    ``f_c(r_q) = A_c . Y(r_q)`` on the grid of :func:`tdn.o3.sphere_grid` for the band limit
    ``correlation * lmax_in + lmax_out``; ``(f^nu)_{LM} = sum_q w_q f(r_q)^nu Y_LM(r_q)`` is then exact — the same
    number as ``nu - 1`` nested Gaunt products (``(f^2)_k = G[k] : A A`` with :func:`tdn.o3.gaunt_tensor`).
    Cost ``Q (D + (correlation - 1) D_out)`` per node and channel for ``Q`` grid points.
    """

    kind = "grid"
    supported_paths = ("o3",)
    unsupported_reason = GAUNT_REASON

    def __init__(self, lmax_in: int, lmax_out: int, correlation: int, paths: str = "o3",
                 kind: str | None = None) -> None:
        super().__init__(lmax_in, lmax_out, correlation, paths, kind)
        points, quad = sphere_grid(correlation * lmax_in + lmax_out)
        dtype = torch.get_default_dtype()
        self.num_points = points.shape[0]
        self.register_buffer("to_grid", spherical_harmonics(lmax_in, points).T.contiguous().to(dtype))  # [D, Q]
        project = quad[:, None] * spherical_harmonics(lmax_out, points)  # [Q, D_out]
        self.register_buffer("from_grid", project.to(dtype))
        self.weight_keys, self.basis_sizes, self.moments = [], {}, {}
        degree = degree_of_component(lmax_out)
        index = torch.full((correlation - 1, dim(lmax_out)), -1, dtype=torch.long)  # weight of (nu, LM); -1: none
        for nu in range(2, correlation + 1):
            moment = power_second_moment(nu, lmax_in, lmax_out)  # [D_out]
            for L in range(lmax_out + 1):
                m = float(moment[degree_slice(L)].mean())
                present = m > 1e-12  # e.g. lmax_in = 0: f is constant, f^nu has no L > 0 part
                self.basis_sizes[(nu, L)] = int(present)
                self.moments[(nu, L)] = m if present else 0.0
                if present:
                    index[nu - 2, degree == L] = len(self.weight_keys)
                    self.weight_keys.append((nu, L, 0))
        self.register_buffer("weight_index", index, persistent=False)  # [correlation-1, D_out]

    def forward(self, A: torch.Tensor, element_index: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        f = A @ self.to_grid  # [N, C, Q]
        power, terms = f, []
        for _ in range(2, self.correlation + 1):
            power = power * f  # f^nu  [N, C, Q]
            terms.append(power @ self.from_grid)  # [N, C, D_out]
        stacked = torch.stack(terms, dim=2)  # [N, C, correlation-1, D_out]
        padded = torch.cat([w, w.new_zeros(*w.shape[:2], 1)], dim=2)  # [E, C, P'+1], last = 0 for absent terms
        node_w = padded[element_index][:, :, self.weight_index]  # [N, C, correlation-1, D_out]
        return (stacked * node_w).sum(2)
