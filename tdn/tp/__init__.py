"""Tensor-product backends behind one interface: ``build(kind, lmax, channels, paths, weights, ...)``."""

from __future__ import annotations

import torch

from .base import MAX_LMAX, WEIGHT_MODES, TensorProduct
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
    ``options`` go to the backend (e.g. ``rank=``, ``tol=`` for "cp"). Tables are computed in float64 and the
    module is returned in ``torch.get_default_dtype()``; ``.to(dtype)`` changes it like any module.
    """
    if kind not in BACKENDS:
        raise ValueError(f"kind must be one of {sorted(BACKENDS)}, got {kind!r}")
    degrees = {"lmax_in": lmax_in, "lmax_sh": lmax_sh, "lmax_out": lmax_out}
    for name, value in degrees.items():
        if value is None:
            if lmax is None:
                raise ValueError(f"give lmax or {name}")
            degrees[name] = lmax
    module = BACKENDS[kind](channels=channels, paths=paths, weights=weights, **degrees, **options)
    return module.to(torch.get_default_dtype())


__all__ = ["BACKENDS", "MAX_LMAX", "WEIGHT_MODES", "TensorProduct", "build"]
