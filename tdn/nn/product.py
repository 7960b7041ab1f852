"""Product basis: MACE's symmetric contraction, raising the atomic basis ``A`` to correlation order ``nu``.

Channel-wise (every channel on its own), with learnable element-dependent weights, summed over ``nu = 1..correlation``:

    out_c^{LM} = sum_nu  sum_eta  W[z, c, nu, L, eta] * s[nu, L] * U^{nu,L}_eta(A_c, ..., A_c)^M

where ``z`` is the node's element, ``U^{nu,L}_eta`` (``eta = 1..n(nu, L)``) is a basis of symmetric equivariant
``nu``-linear maps from the stacked layout (degrees ``0..lmax_in``) to degree ``L``, and ``s[nu, L]`` is a fixed
normalisation (below). The backends differ in the basis and in how it is evaluated:

* ``"cg"``   — the generalised Clebsch–Gordan basis (all such maps, orthonormal;
  :func:`tdn.contractions.coupling_basis`), evaluated exactly by a Horner scheme that contracts one copy of ``A``
  at a time.
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
from ..contractions import (
    KINDS,
    MAX_CORRELATION,
    MAX_LMAX_DENSE,
    CGContraction,
    Contraction,
    CPContraction,
    ElementGroups,
    SpherePowerContraction,
    WeightKey,
    contraction,
)
from ..contractions import build as build_contraction
from ..contractions.base import check_int
from ..o3 import degree_of_component, dim
from .recompute import recompute_if_large

__all__ = [
    "KINDS",
    "MAX_CORRELATION",
    "MAX_LMAX_DENSE",
    "CGContraction",
    "CPContraction",
    "ElementGroups",
    "ProductBasis",
    "SpherePowerContraction",
    "WeightKey",
]


class ProductBasis(nn.Module):
    """``A [N, C, (lmax_in+1)^2]``, ``element_index [N]`` (long, ``0..num_elements-1``) -> ``[N, C, (lmax_out+1)^2]``.

    ``kind``: "cg" | "cp" | "gaunt" | "grid" (see the module docstring; the orders ``nu >= 2`` come from
    :func:`tdn.contractions.build`); ``correlation``: highest order ``nu`` (1..4); ``paths``: "o3" (natural parity,
    every backend) or "so3" (all SO(3) couplings; "cg" and "cp"). Options for "cp": ``tol`` (default 1e-4, relative
    error of each stacked ``U^nu``), ``rank`` (an int for every ``nu`` or a dict ``{nu: rank}``, instead of ``tol``),
    ``seed`` (default 0).

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
        contraction(kind)  # an unknown kind first
        check_int("channels", channels, 1, None)
        check_int("num_elements", num_elements, 1, None)
        self.contraction: Contraction = build_contraction(kind, lmax_in, lmax_out, correlation, paths, **options)
        self.kind, self.paths = kind, paths
        self.lmax_in, self.lmax_out = lmax_in, lmax_out
        self.channels, self.correlation, self.num_elements = channels, correlation, num_elements

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
        if isinstance(self.contraction, CPContraction):
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
        # a contraction whose eval backward keeps only its inputs needs no checkpoint (it would recompute for nothing)
        above = None if self.contraction.bounded_memory_in_eval else self.checkpoint_above
        return recompute_if_large(self._basis, (A, element_index), training=self.training, above=above,
                                  chunk=self.checkpoint_chunk)  # fmt: skip

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
