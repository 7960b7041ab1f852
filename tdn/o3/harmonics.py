"""Real spherical harmonics (e3nn's), in "component" normalisation: ``sum_m Y_lm(r)^2 = 2l + 1``.

Equivalently the mean of ``Y_lm^2`` over the unit sphere is 1, so ``Y_lm / sqrt(4 pi)`` is orthonormal.
"""

from __future__ import annotations

import torch
from e3nn import o3


def spherical_harmonics(lmax: int, vectors: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``vectors [..., 3]`` -> ``[..., (lmax + 1)^2]`` real spherical harmonics of degrees ``0..lmax``."""
    return o3.spherical_harmonics(list(range(lmax + 1)), vectors, normalize=normalize, normalization="component")
