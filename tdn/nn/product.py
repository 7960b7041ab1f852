"""Product basis: MACE's symmetric contraction, raising the atomic basis ``A`` to correlation order ``nu``.

Channel-wise (every channel on its own), with learnable element-dependent weights, summed over ``nu = 1..correlation``:

    out_c^{LM} = sum_nu  sum_eta  W[z, c, nu, L, eta] * s[nu, L] * U^{nu,L}_eta(A_c, ..., A_c)^M

where ``z`` is the node's element, ``U^{nu,L}_eta`` (``eta = 1..n(nu, L)``) is a basis of symmetric equivariant
``nu``-linear maps from the stacked layout (degrees ``0..lmax_in``) to degree ``L``, and ``s[nu, L]`` is a fixed
normalisation (below). The backends differ in the basis and in how it is evaluated:

* ``"cg"``   — the generalised Clebsch–Gordan basis (all such maps, orthonormal; :func:`coupling_basis`),
  evaluated exactly by a Horner scheme that contracts one copy of ``A`` at a time.
* ``"cp"``   — the same basis and weights, through a symmetric CP decomposition of each ``U^nu``:
  ``U^{nu}_{(L,eta,M)} ≈ sum_r a[(L,eta,M), r] b_r^{⊗nu}`` so that ``U(A, ..., A) ≈ (A . b_r)^nu @ a``:
  cost ``O(R D)`` per channel instead of ``O(D^nu)``; it matches ``"cg"`` to the fit tolerance.
* ``"gaunt"`` / ``"grid"`` — powers of the sphere function ``f_c(r) = A_c . Y(r)``: ``(f_c^nu)_{LM}``, one basis
  element per ``(nu, L)`` (per-degree weights). Evaluated on a sphere grid exact for the band limit
  ``correlation * lmax_in + lmax_out``; both kinds share this implementation because the math is identical
  (a repeated Gaunt product is the pointwise power on an exact grid). Natural parity only: ``paths="o3"``.

``nu = 1`` is the same for every backend: an element-dependent, per-degree pick of ``A``'s degrees ``<= lmax_out``.

Normalisation: ``W`` is drawn ``N(0, 1)`` and ``s[nu, L]^2 = 1 / (n_L * E|term_{nu,L}|^2)``, where
``E|term_{nu,L}|^2 = (1/(2L+1)) sum_{eta, M} E[U^{nu,L}_eta(A, ..., A)_M^2]`` is computed exactly (Isserlis'
theorem) for ``A ~ N(0, I)`` and ``n_L`` counts the orders ``nu`` that reach degree ``L``. So every output component
has unit variance (over inputs and weight draws) for unit-variance inputs, with the orders contributing equally.
``"cp"`` uses the exact ``"cg"`` values, so the two compute the same function of ``W``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._cache import cached_on
from ..o3 import check_path_set, degree_of_component, degree_slice, dim, sphere_grid, spherical_harmonics
from ..tp.base import MAX_LMAX
from ..tp.grid import GAUNT_REASON
from .product_fit import (
    coupling_basis,
    gaussian_second_moment,
    power_second_moment,
    stacked_basis,
    symmetric_cp,
)
from .recompute import recompute_if_large

KINDS = ("cg", "cp", "gaunt", "grid")
MAX_CORRELATION = 4
# Largest lmax_in per correlation order for the backends that store U^nu densely ([eta, 2L+1, D^nu]): the Horner
# scheme costs (lmax_out+1)^2 D^nu per node and channel, D = (lmax_in+1)^2.
MAX_LMAX_DENSE = {2: MAX_LMAX, 3: 4, 4: 2}

WeightKey = tuple[int, int, int]  # (nu, L, eta)


class ProductBasis(nn.Module):
    """``A [N, C, (lmax_in+1)^2]``, ``element_index [N]`` (long, ``0..num_elements-1``) -> ``[N, C, (lmax_out+1)^2]``.

    ``kind``: "cg" | "cp" | "gaunt" | "grid" (see the module docstring); ``correlation``: highest order ``nu``
    (1..4); ``paths``: "o3" (natural parity, every backend) or "so3" (all SO(3) couplings; "cg" and "cp").
    Options for "cp": ``tol`` (default 1e-4, relative error of each stacked ``U^nu``), ``rank`` (an int for every
    ``nu`` or a dict ``{nu: rank}``, instead of ``tol``), ``seed`` (default 0).

    Attributes: ``weight [num_elements, C, P]`` (the learnable ``W``), ``weight_keys`` (the ``(nu, L, eta)`` of each
    of the ``P`` entries), ``num_weights`` (``P``), ``basis_sizes`` (``{(nu, L): n(nu, L)}``); for "cp" also
    ``ranks`` and ``fit_errors`` (``{nu: ...}``).
    """

    def __init__(
        self,
        kind: str,
        lmax_in: int,
        lmax_out: int,
        channels: int,
        correlation: int,
        num_elements: int,
        paths: str = "o3",
        **options,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        _check_int("correlation", correlation, 1, MAX_CORRELATION)
        _check_int("lmax_in", lmax_in, 0, MAX_LMAX)
        _check_int("lmax_out", lmax_out, 0, lmax_in, " (the product basis does not raise the degree of A)")
        _check_int("channels", channels, 1, None)
        _check_int("num_elements", num_elements, 1, None)
        check_path_set(paths)
        if kind in ("gaunt", "grid") and paths != "o3":
            raise ValueError(f"the {kind!r} product basis supports paths='o3' only, got {paths!r}: {GAUNT_REASON}")
        if kind in ("cg", "cp"):
            for nu in range(2, correlation + 1):
                if lmax_in > MAX_LMAX_DENSE[nu]:
                    raise ValueError(
                        f"the {kind!r} product basis supports lmax_in <= {MAX_LMAX_DENSE[nu]} at correlation {nu} "
                        f"(its coupling tensors have (lmax_in+1)^(2 nu) entries per row), got lmax_in={lmax_in}; "
                        "use kind='grid' or a lower correlation"
                    )
        allowed = {"cp": {"tol", "rank", "seed"}}.get(kind, set())
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"unknown options for kind={kind!r}: {sorted(unknown)} (allowed: {sorted(allowed)})")

        self.kind, self.paths = kind, paths
        self.lmax_in, self.lmax_out = lmax_in, lmax_out
        self.channels, self.correlation, self.num_elements = channels, correlation, num_elements
        if kind == "cg":
            self.contraction: _Contraction = CGContraction(lmax_in, lmax_out, correlation, paths)
        elif kind == "cp":
            self.contraction = CPContraction(lmax_in, lmax_out, correlation, paths, **options)
        else:
            self.contraction = SpherePowerContraction(lmax_in, lmax_out, correlation)

        # weight layout: nu = 1 (one per degree L <= lmax_out), then the backend's (nu, L, eta) for nu >= 2
        keys: list[WeightKey] = [(1, L, 0) for L in range(lmax_out + 1)]
        keys += self.contraction.weight_keys
        self.weight_keys = keys
        self.num_weights = len(keys)
        self.basis_sizes = {(1, L): 1 for L in range(lmax_out + 1)} | self.contraction.basis_sizes
        moments = {(1, L): 1.0 for L in range(lmax_out + 1)} | self.contraction.moments  # E|term|^2 per (nu, L)
        orders = {L: sum(1 for (_, l), m in moments.items() if l == L and m > 0) for L in range(lmax_out + 1)}
        scale = [1.0 / math.sqrt(orders[L] * moments[(nu, L)]) for nu, L, _ in keys]
        dtype = torch.get_default_dtype()
        self.weight = nn.Parameter(torch.randn(num_elements, channels, self.num_weights, dtype=dtype))
        self.register_buffer("weight_scale", torch.tensor(scale, dtype=dtype))  # [P] = s[nu, L] per entry
        self.register_buffer("pick_index", degree_of_component(lmax_out), persistent=False)  # [D_out]: nu=1 entry
        if kind == "cp":
            self.ranks, self.fit_errors = self.contraction.ranks, self.contraction.fit_errors

    # Large systems in eval mode: the basis's intermediates (for cp, [N, C, R] with R in the hundreds) dominate
    # memory, so above `checkpoint_above` nodes it is recomputed in chunks (tdn.nn.recompute). Set on an instance
    # to tune; None disables.
    checkpoint_above: int | None = 16384
    checkpoint_chunk: int = 4096

    def forward(self, A: torch.Tensor, element_index: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(A.device.type):
            # nu-fold products of bf16/fp16 features lose too much: the basis runs in the module's precision
            with torch.autocast(A.device.type, enabled=False):
                return self.forward(A.to(self.weight.dtype), element_index)
        self._check_inputs(A, element_index)
        return recompute_if_large(self._basis, (A, element_index), training=self.training,
                                  above=self.checkpoint_above, chunk=self.checkpoint_chunk)  # fmt: skip

    def _basis(self, A: torch.Tensor, element_index: torch.Tensor) -> torch.Tensor:
        """The product basis of checked inputs ``A [N, C, D]`` -> ``[N, C, D_out]``."""
        weight = self.weight * self.weight_scale  # [E, C, P]
        num_pick = self.lmax_out + 1
        pick = weight[:, :, :num_pick][element_index][:, :, self.pick_index]  # [N, C, D_out]
        out = pick * A[:, :, : dim(self.lmax_out)]  # nu = 1
        if self.correlation > 1:
            out = out + self.contraction(A, element_index, weight[:, :, num_pick:])  # nu = 2..correlation
        return out

    def _check_inputs(self, A: torch.Tensor, element_index: torch.Tensor) -> None:
        d_in = dim(self.lmax_in)
        if A.dim() != 3 or A.shape[1:] != (self.channels, d_in):
            raise ValueError(f"A must have shape [N, {self.channels}, {d_in}], got {list(A.shape)}")
        if element_index.shape != (A.shape[0],):
            raise ValueError(
                f"element_index must have shape [{A.shape[0]}] (one entry per row of A), "
                f"got {list(element_index.shape)}"
            )
        if element_index.dtype != torch.long:
            raise ValueError(f"element_index must be a long tensor, got {element_index.dtype}")
        if A.dtype != self.weight.dtype:
            raise TypeError(f"A has dtype {A.dtype} but the module is {self.weight.dtype}; convert one of them")
        if A.device != self.weight.device or element_index.device != A.device:
            raise ValueError(
                f"A, element_index and the module must be on one device, got {A.device}, {element_index.device}, "
                f"{self.weight.device}"
            )
        if A.shape[0] == 0 or torch.compiler.is_compiling():  # no data-dependent check inside a compiled graph
            return
        # once per index tensor: the check syncs the host
        cached_on(element_index, ("in_range", self.num_elements), lambda: self._check_range(element_index))

    def _check_range(self, element_index: torch.Tensor) -> bool:
        bad = (element_index < 0) | (element_index >= self.num_elements)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"element index {int(element_index[row])} (at row {row}) is out of range: "
                f"this product basis has num_elements={self.num_elements} (valid indices 0..{self.num_elements - 1})"
            )
        return True

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, lmax_in={self.lmax_in}, lmax_out={self.lmax_out}, channels={self.channels}, "
            f"correlation={self.correlation}, num_elements={self.num_elements}, paths={self.paths!r}, "
            f"num_weights={self.num_weights}"
        )


def _check_int(name: str, value: int, low: int, high: int | None, why: str = "") -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}{why}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Backends: the orders nu = 2..correlation
# ---------------------------------------------------------------------------------------------------------------


class _Contraction(nn.Module):
    """``(A [N, C, D], element_index [N], w [E, C, P']) -> [N, C, D_out]`` for the orders ``nu >= 2``.

    ``weight_keys`` lists the ``(nu, L, eta)`` of the ``P'`` weights, ``basis_sizes`` the basis size per
    ``(nu, L)`` and ``moments`` its ``E|term|^2`` for unit weights and ``A ~ N(0, I)``.
    """

    weight_keys: list[WeightKey]
    basis_sizes: dict[tuple[int, int], int]
    moments: dict[tuple[int, int], float]


class _ElementGroups:
    """The rows of a batch grouped by element, so that each element's weights are applied to a contiguous block.

    ``order`` sorts the rows by element (stable) and ``counts`` holds the rows per element: one host sync to build.
    Use :meth:`of`, which builds them once per index tensor (:func:`tdn._cache.cached_on`): every layer of a model,
    and every MD step that passes the same (unmodified) tensor, reuses them without touching the host.
    """

    def __init__(self, element_index: torch.Tensor, num_elements: int) -> None:
        self.order = torch.argsort(element_index, stable=True)  # [N]
        self.counts = torch.bincount(element_index, minlength=num_elements).tolist()

    @classmethod
    def of(cls, element_index: torch.Tensor, num_elements: int) -> _ElementGroups:
        return cached_on(element_index, ("groups", num_elements), lambda: cls(element_index, num_elements))

    def channel_major(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, C, F]`` -> rows sorted by element, channels first: ``[C, N, F]`` (a view after one gather)."""
        return x.index_select(0, self.order).transpose(0, 1)

    def chunks(self) -> list[tuple[int, int, int]]:
        """``(element, start, stop)`` of every element present, in sorted-row coordinates."""
        out, start = [], 0
        for z, count in enumerate(self.counts):
            if count:
                out.append((z, start, start + count))
            start += count
        return out

    def restore(self, parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        """Per-element outputs ``[C, n_z, F]`` (in :meth:`chunks` order) -> ``[N, C, F]`` in the original row order."""
        if not parts:
            return empty
        out_sorted = torch.cat(parts, dim=1).transpose(0, 1)  # [N, C, F]
        return out_sorted.new_zeros(out_sorted.shape).index_copy(0, self.order, out_sorted)


class CGContraction(_Contraction):
    """Exact generalised-CG contraction, Horner scheme.

    For element ``z`` the weights are folded into the basis once (a matmul with the stacked basis):
    ``T^nu[c] = sum_eta W[z, c, nu, L, eta] U^{nu,L}_eta`` ``[C, D_out, D^nu]``. Then ``sum_nu T^nu(A, ..., A)`` is
    evaluated as ``((T^n . A + T^{n-1}) . A + ... + T^2) . A . A``, contracting one copy of ``A`` per step (``U`` is
    symmetric, so the slot order does not matter): the largest intermediate is ``[C, n_z, D_out D^{n-1}]`` and the
    cost ``D_out D^n`` per node and channel for ``n = correlation``.
    """

    def __init__(self, lmax_in: int, lmax_out: int, correlation: int, paths: str) -> None:
        super().__init__()
        self.lmax_in, self.lmax_out, self.correlation = lmax_in, lmax_out, correlation
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
        groups = _ElementGroups.of(element_index, w.shape[0])
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


class CPContraction(_Contraction):
    """Symmetric CP contraction: the ``"cg"`` basis and weights through ``U^nu ≈ a Phi(B_nu)^T``.

    With the directions of all orders side by side, ``B = [B_2 | ... | B_n]`` ``[D, R]``:

        p = A_c @ B                         [N, C, R]     (one matmul for all orders and channels)
        q = p ** nu(r)                      [N, C, R]     (columns of B_nu raised to the power nu)
        out = q @ a_w[z]                    [N, C, D_out]
        a_w[z, c, r, LM] = sum_eta W[z, c, nu, L, eta] a[(L, eta, M), r]

    ``a_w`` folds the element's weights into the CP coefficients (per element, ``C R D_out``), so the cost per node and
    channel is ``R (D + D_out)``. Factors come from :func:`tdn.nn.product_fit.symmetric_cp` (shipped, cached on disk,
    or fitted on first use); ``ranks`` and ``fit_errors`` record ``R_nu`` and the relative error of each ``U^nu``.
    """

    def __init__(self, lmax_in: int, lmax_out: int, correlation: int, paths: str, tol: float = 1e-4,
                 rank: int | dict[int, int] | None = None, seed: int = 0) -> None:
        super().__init__()
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
        if rank is not None and not isinstance(rank, (int, dict)):
            raise ValueError(f"rank must be an int or a dict {{nu: rank}}, got {rank!r}")
        self.lmax_in, self.lmax_out, self.correlation = lmax_in, lmax_out, correlation
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
        groups = _ElementGroups.of(element_index, w.shape[0])
        p = groups.channel_major(A) @ self.directions  # [C, N, R], rows sorted by element
        powers = [part**nu for nu, part in zip(self.ranks, p.split(list(self.ranks.values()), dim=2))]  # [C, N, R_nu]
        parts = []
        for z, start, stop in groups.chunks():
            folded = self.folded(w[z])
            parts.append(sum(torch.bmm(q[:, start:stop], a) for q, a in zip(powers, folded)))  # [C, n_z, D_out]
        return groups.restore(parts, A.new_zeros(0, A.shape[1], dim(self.lmax_out)))


class SpherePowerContraction(_Contraction):
    """Powers of the sphere function ("gaunt" and "grid" alike), one weight per ``(element, channel, nu, L)``.

    ``f_c(r_q) = A_c . Y(r_q)`` on the grid of :func:`tdn.o3.sphere_grid` for the band limit
    ``correlation * lmax_in + lmax_out``; ``(f^nu)_{LM} = sum_q w_q f(r_q)^nu Y_LM(r_q)`` is then exact — the same
    number as ``nu - 1`` nested Gaunt products (``(f^2)_k = G[k] : A A`` with :func:`tdn.o3.gaunt_tensor`).
    Cost ``Q (D + (correlation - 1) D_out)`` per node and channel for ``Q`` grid points.
    """

    def __init__(self, lmax_in: int, lmax_out: int, correlation: int) -> None:
        super().__init__()
        self.lmax_in, self.lmax_out, self.correlation = lmax_in, lmax_out, correlation
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
