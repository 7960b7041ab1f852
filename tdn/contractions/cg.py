"""The exact product-basis contraction ("cg"): the generalised Clebsch–Gordan basis evaluated by a Horner scheme."""

from __future__ import annotations

import torch

from ..o3 import degree_slice, dim
from .base import MAX_LMAX_DENSE, Contraction, ElementGroups
from .coupling import coupling_basis
from .moments import gaussian_second_moment


class CGContraction(Contraction):
    """Exact generalised-CG contraction, Horner scheme.

    For element ``z`` the weights are folded into the basis once (a matmul with the stacked basis):
    ``T^nu[c] = sum_eta W[z, c, nu, L, eta] U^{nu,L}_eta`` ``[C, D_out, D^nu]``. Then ``sum_nu T^nu(A, ..., A)`` is
    evaluated as ``((T^n . A + T^{n-1}) . A + ... + T^2) . A . A``, contracting one copy of ``A`` per step (``U`` is
    symmetric, so the slot order does not matter): the largest intermediate is ``[C, n_z, D_out D^{n-1}]`` and the
    cost ``D_out D^n`` per node and channel for ``n = correlation``.
    """

    kind = "cg"
    max_lmax_in = MAX_LMAX_DENSE

    def __init__(self, lmax_in: int, lmax_out: int, correlation: int, paths: str = "o3",
                 kind: str | None = None) -> None:
        super().__init__(lmax_in, lmax_out, correlation, paths, kind)
        d, d_out = dim(lmax_in), dim(lmax_out)
        dtype = torch.get_default_dtype()
        self.weight_keys, self.basis_sizes, self.moments = [], {}, {}
        self.slices: dict[int, tuple[int, int]] = {}
        for nu in range(2, correlation + 1):
            start = len(self.weight_keys)
            rows = []  # [eta, D_out, D^nu] per L: the basis placed at the output rows of degree L
            for L in range(lmax_out + 1):
                u = coupling_basis(nu, lmax_in, L, paths)  # [eta, 2L+1, D, ..., D]
                eta = u.shape[0]
                self.basis_sizes[(nu, L)] = eta
                if eta == 0:
                    self.moments[(nu, L)] = 0.0
                    continue
                flat = u.reshape(eta * (2 * L + 1), -1)
                self.moments[(nu, L)] = float(gaussian_second_moment(flat, nu).sum()) / (2 * L + 1)
                placed = torch.zeros(eta, d_out, d**nu, dtype=torch.float64)
                placed[:, degree_slice(L)] = u.reshape(eta, 2 * L + 1, -1)
                rows.append(placed)
                self.weight_keys += [(nu, L, e) for e in range(eta)]
            self.slices[nu] = (start, len(self.weight_keys))
            basis = torch.cat(rows) if rows else torch.zeros(0, d_out, d**nu, dtype=torch.float64)
            self.register_buffer(f"basis_{nu}", basis.reshape(basis.shape[0], -1).to(dtype))  # [P_nu, D_out D^nu]

    def forward(self, A: torch.Tensor, element_index: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        groups = ElementGroups.of(element_index, w.shape[0])
        at = groups.channel_major(A)  # [C, N, D], rows sorted by element
        parts = [self._horner(at[:, start:stop], w[z]) for z, start, stop in groups.chunks()]  # [C, n_z, D_out]
        return groups.restore(parts, A.new_zeros(0, A.shape[1], dim(self.lmax_out)))

    def folded(self, w: torch.Tensor, nu: int) -> torch.Tensor:
        """``w [C, P']`` -> ``T^nu [C, D_out * D^nu]``: the element's weights folded into the basis."""
        start, stop = self.slices[nu]
        return w[:, start:stop] @ getattr(self, f"basis_{nu}")

    def _horner(self, at: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One element's rows ``at [C, n, D]`` and weights ``w [C, P']`` -> ``[C, n, D_out]``."""
        c, n, d = at.shape
        d_out = dim(self.lmax_out)
        top = self.folded(w, self.correlation).view(c, -1, d)  # [C, D_out D^(nu-1), D]
        x = torch.bmm(at, top.transpose(1, 2))  # [C, n, D_out D^(nu-1)]: one slot contracted
        for slots in range(self.correlation - 1, 0, -1):  # x has `slots` uncontracted slots
            if slots >= 2:
                x = x + self.folded(w, slots).unsqueeze(1)  # + T^slots  [C, 1, D_out D^slots]
            x = torch.einsum("cnfd,cnd->cnf", x.view(c, n, -1, d), at)  # [C, n, D_out D^(slots-1)]
        return x.view(c, n, d_out)
