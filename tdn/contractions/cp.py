"""The CP product-basis contraction ("cp"): the "cg" basis and weights through a symmetric CP decomposition."""

from __future__ import annotations

import torch

from ..o3 import degree_slice, dim
from .base import MAX_LMAX_DENSE, Contraction, ElementGroups
from .chunked import power_sum
from .coupling import stacked_basis
from .factors import DEFAULT_TOL, symmetric_cp
from .moments import gaussian_second_moment


class CPContraction(Contraction):
    """Symmetric CP contraction: the ``"cg"`` basis and weights through ``U^nu ≈ a Phi(B_nu)^T``.

    With the directions of all orders side by side, ``B = [B_2 | ... | B_n]`` ``[D, R]``:

        p = A_c @ B                         [N, C, R]     (one matmul for all orders and channels)
        q = p ** nu(r)                      [N, C, R]     (columns of B_nu raised to the power nu)
        out = q @ a_w[z]                    [N, C, D_out]
        a_w[z, c, r, LM] = sum_eta W[z, c, nu, L, eta] a[(L, eta, M), r]

    ``a_w`` folds the element's weights into the CP coefficients (per element, ``C R D_out``), so the cost per node and
    channel is ``R (D + D_out)``. Factors come from :func:`tdn.contractions.factors.symmetric_cp` (shipped, cached on
    disk, or fitted on first use); ``ranks`` and ``fit_errors`` record ``R_nu`` and the relative error of each ``U^nu``.
    """

    kind = "cp"
    max_lmax_in = MAX_LMAX_DENSE
    options = ("tol", "rank", "seed")
    bounded_memory_in_eval = True

    def __init__(self, lmax_in: int, lmax_out: int, correlation: int, paths: str = "o3", tol: float = DEFAULT_TOL,
                 rank: int | dict[int, int] | None = None, seed: int = 0, kind: str | None = None) -> None:
        super().__init__(lmax_in, lmax_out, correlation, paths, kind)
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
        if rank is not None and not isinstance(rank, (int, dict)):
            raise ValueError(f"rank must be an int or a dict {{nu: rank}}, got {rank!r}")
        d_out = dim(lmax_out)
        dtype = torch.get_default_dtype()
        self.weight_keys, self.basis_sizes, self.moments = [], {}, {}
        self.ranks: dict[int, int] = {}
        self.fit_errors: dict[int, float] = {}
        directions, coefficients = [], []
        for nu in range(2, correlation + 1):
            target, etas = stacked_basis(nu, lmax_in, lmax_out, paths)  # [K, D^nu], rows (L, eta, M)
            nu_rank = rank.get(nu) if isinstance(rank, dict) else rank
            factors = symmetric_cp(nu, lmax_in, lmax_out, paths, tol=float(tol), rank=nu_rank, seed=seed)
            self.ranks[nu], self.fit_errors[nu] = factors.rank, factors.error
            # a [(L, eta, M), r] -> [P_nu, R, D_out]: one slice per weight (nu, L, eta), placed at degree L
            expanded = torch.zeros(sum(etas), factors.rank, d_out, dtype=torch.float64)
            row, key = 0, 0
            for L, eta in enumerate(etas):
                self.basis_sizes[(nu, L)] = eta
                size = eta * (2 * L + 1)
                self.moments[(nu, L)] = (
                    float(gaussian_second_moment(target[row : row + size], nu).sum()) / (2 * L + 1) if eta else 0.0
                )
                a = factors.coefficients[row : row + size].view(eta, 2 * L + 1, -1)  # [eta, 2L+1, R]
                expanded[key : key + eta, :, degree_slice(L)] = a.transpose(1, 2)
                self.weight_keys += [(nu, L, e) for e in range(eta)]
                row, key = row + size, key + eta
            directions.append(factors.directions)
            coefficients.append(expanded)
        # correlation 1 has no contraction: an empty [D, 0] keeps the module well formed
        directions = torch.cat(directions, dim=1) if directions else torch.zeros(dim(lmax_in), 0, dtype=torch.float64)
        self.register_buffer("directions", directions.to(dtype))  # [D, R]
        for nu, expanded in zip(range(2, correlation + 1), coefficients):
            self.register_buffer(f"coefficients_{nu}", expanded.to(dtype))  # [P_nu, R_nu, D_out]

    def folded(self, w: torch.Tensor) -> list[torch.Tensor]:
        """``w [C, P']`` -> ``a_w`` per order, ``[C, R_nu, D_out]``: the element's weights folded into the CP
        coefficients."""
        parts, start = [], 0
        for nu in range(2, self.correlation + 1):
            coefficients = getattr(self, f"coefficients_{nu}")  # [P_nu, R_nu, D_out]
            stop = start + coefficients.shape[0]
            parts.append(torch.einsum("cp,prm->crm", w[:, start:stop], coefficients))
            start = stop
        return parts

    def forward(self, A: torch.Tensor, element_index: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        groups = ElementGroups.of(element_index, w.shape[0])
        if self.training or torch.compiler.is_compiling():
            return self._whole(A, groups, w)
        # eval (MD, inference): the [N, C, R] intermediates one cache-sized tile at a time, a first-order backward
        orders = tuple(self.ranks.items())
        chunks = groups.chunks()
        if len(chunks) == 1:  # one element: no sorting
            return power_sum(A, self.directions, torch.cat(self.folded(w[chunks[0][0]]), dim=1), orders)
        sorted_a = groups.sort(A)  # [N, C, D], rows sorted by element
        parts = [
            power_sum(sorted_a[start:stop], self.directions, torch.cat(self.folded(w[z]), dim=1), orders)
            for z, start, stop in chunks
        ]  # [n_z, C, D_out] each
        return groups.unsort(torch.cat(parts)) if parts else A.new_zeros(0, A.shape[1], dim(self.lmax_out))

    def _whole(self, A: torch.Tensor, groups: ElementGroups, w: torch.Tensor) -> torch.Tensor:
        """The contraction through autograd on whole ``[C, N, R]`` tensors: differentiable to any order (training
        on forces), and what ``torch.compile`` traces."""
        sorted_a = groups.channel_major(A)  # [C, N, D], rows sorted by element
        # one matmul per order, not one split afterwards: the split's backward would concatenate [C, N, R] gradients
        powers, start = [], 0
        for nu, rank in self.ranks.items():
            powers.append((sorted_a @ self.directions[:, start : start + rank]) ** nu)  # [C, N, R_nu]
            start += rank
        parts = []
        for z, start, stop in groups.chunks():
            folded = self.folded(w[z])
            parts.append(sum(torch.bmm(q[:, start:stop], a) for q, a in zip(powers, folded)))  # [C, n_z, D_out]
        return groups.restore(parts, A.new_zeros(0, A.shape[1], dim(self.lmax_out)))
