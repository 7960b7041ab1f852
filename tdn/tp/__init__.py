"""Tensor-product backends behind one interface: ``build(kind, lmax, channels, paths, weights, ...)``.

Each backend declares on its class what it supports (``supported_paths``, ``supported_weights``), its
``default_weights`` and its ``options`` (e.g. ``rank``, ``tol``, ``seed`` for "cp"); :func:`backend` returns the class
of a kind, and :func:`tdn.tp.base.check_support` turns an unsupported request into one ValueError.
"""

from __future__ import annotations

import torch

from .base import MAX_LMAX, WEIGHT_MODES, FactorisedProduct, TensorProduct, check_support, weights_per_channel
from .cg import CGProduct
from .cp import CPProduct
from .gaunt import GauntProduct
from .grid import GridProduct

BACKENDS: dict[str, type[TensorProduct]] = {
    "cg": CGProduct,
    "cp": CPProduct,
    "gaunt": GauntProduct,
    "grid": GridProduct,
}


def backend(kind: str) -> type[TensorProduct]:
    """The backend class registered as ``kind``; an unknown kind is a ValueError listing the known ones."""
    if kind not in BACKENDS:
        raise ValueError(f"kind must be one of {sorted(BACKENDS)}, got {kind!r}")
    return BACKENDS[kind]


def build(
    kind: str,
    lmax: int | None = None,
    channels: int = 1,
    paths: str = "o3",
    weights: str = "shared",
    *,
    lmax_in: int | None = None,
    lmax_sh: int | None = None,
    lmax_out: int | None = None,
    **options,
) -> TensorProduct:
    """Build a tensor product ``x [E,C,D_in], y [E,D_sh], w [E,C,P] -> [E,C,D_out]``.

    ``lmax`` sets all three degrees; ``lmax_in`` / ``lmax_sh`` / ``lmax_out`` override one each.
    ``options`` go to the backend (those in its ``options``, e.g. ``rank=``, ``tol=`` for "cp"). Tables are computed
    in float64 and the module is returned in ``torch.get_default_dtype()``; ``.to(dtype)`` changes it like any module.

    >>> tp = build("cg", lmax=1, channels=2, weights="path")
    >>> tp.num_weights  # paths (0,0,0), (0,1,1), (1,0,1), (1,1,0)
    4
    >>> tuple(tp(torch.ones(3, 2, 4), torch.ones(3, 4), torch.ones(3, 2, 4)).shape)
    (3, 2, 4)
    """
    cls = backend(kind)
    check_support(kind, cls, options=options)
    degrees = {"lmax_in": lmax_in, "lmax_sh": lmax_sh, "lmax_out": lmax_out}
    for name, value in degrees.items():
        if value is None:
            if lmax is None:
                raise ValueError(f"give lmax or {name}")
            degrees[name] = lmax
    module = cls(channels=channels, paths=paths, weights=weights, **degrees, **options)
    return module.to(torch.get_default_dtype())


__all__ = [
    "BACKENDS",
    "MAX_LMAX",
    "WEIGHT_MODES",
    "FactorisedProduct",
    "TensorProduct",
    "backend",
    "build",
    "check_support",
    "weights_per_channel",
]
