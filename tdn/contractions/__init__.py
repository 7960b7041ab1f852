"""The ν-body contractions of the product basis (MACE's symmetric contraction) behind one registry, with their
tables: ``build(kind, lmax_in, lmax_out, correlation, paths, **options)``.

Kinds: "cg" (:class:`CGContraction`, the exact generalised-CG basis), "cp" (:class:`CPContraction`, its symmetric
CP decomposition), "gaunt" and "grid" (:class:`SpherePowerContraction`, powers of the sphere function; the two are
the same math). Each class declares the path sets and options it supports; an unsupported request is one ValueError
from :func:`tdn.tp.base.check_support`. The element-dependent weights live in :class:`tdn.nn.product.ProductBasis`.
"""

from __future__ import annotations

from typing import Any

from .base import MAX_CORRELATION, MAX_LMAX_DENSE, Contraction, ElementGroups, WeightKey
from .cg import CGContraction
from .coupling import coupling_basis, stacked_basis
from .cp import CPContraction
from .factors import SymmetricCPFactors, symmetric_cp
from .moments import gaussian_second_moment, power_second_moment
from .sphere import SpherePowerContraction

CONTRACTIONS: dict[str, type[Contraction]] = {
    "cg": CGContraction,
    "cp": CPContraction,
    "gaunt": SpherePowerContraction,
    "grid": SpherePowerContraction,
}
KINDS = tuple(CONTRACTIONS)


def contraction(kind: str) -> type[Contraction]:
    """The contraction class registered as ``kind``; an unknown kind is a ValueError listing the known ones."""
    if kind not in CONTRACTIONS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return CONTRACTIONS[kind]


def build(kind: str, lmax_in: int, lmax_out: int, correlation: int, paths: str = "o3", **options: Any) -> Contraction:
    """The contraction of the orders ``nu = 2..correlation`` for ``kind``: ``(A [N, C, (lmax_in+1)^2],
    element_index [N], w [E, C, P']) -> [N, C, (lmax_out+1)^2]``, tables in ``torch.get_default_dtype()``.

    ``options`` are those the class declares (for "cp": ``tol``, ``rank``, ``seed``). Correlation 1 gives an empty
    contraction (no weights).

    >>> c = build("grid", lmax_in=1, lmax_out=1, correlation=3)
    >>> type(c).__name__, c.kind, [key for key in c.weight_keys if key[1] == 0]
    ('SpherePowerContraction', 'grid', [(2, 0, 0), (3, 0, 0)])
    """
    cls = contraction(kind)
    cls.check(kind, lmax_in, lmax_out, correlation, paths, options)
    return cls(lmax_in, lmax_out, correlation, paths, kind=kind, **options)


__all__ = [
    "CONTRACTIONS",
    "KINDS",
    "MAX_CORRELATION",
    "MAX_LMAX_DENSE",
    "CGContraction",
    "CPContraction",
    "Contraction",
    "ElementGroups",
    "SpherePowerContraction",
    "SymmetricCPFactors",
    "WeightKey",
    "build",
    "contraction",
    "coupling_basis",
    "gaussian_second_moment",
    "power_second_moment",
    "stacked_basis",
    "symmetric_cp",
]
