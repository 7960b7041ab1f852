"""Product block: MACE's many-body update of the node features.

The atomic basis ``A`` is raised to correlation order ``nu`` by :class:`tdn.nn.product.ProductBasis` (through the
chosen contraction, with element-dependent weights), mixed by a linear map, and added to the self-connection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .linear import EquivariantLinear
from .product import ProductBasis


class ProductBlock(nn.Module):
    """``A [N, C, (lmax_in+1)^2]``, ``element_index [N]``, residual ``[N, C, (lmax_out+1)^2]`` or None
    -> new node features ``[N, C, (lmax_out+1)^2]``. ``options`` go to ProductBasis (e.g. ``tol`` for "cp")."""

    def __init__(
        self,
        kind: str,
        lmax_in: int,
        lmax_out: int,
        channels: int,
        correlation: int,
        num_elements: int,
        paths: str = "o3",
        **options: Any,
    ) -> None:
        super().__init__()
        self.basis = ProductBasis(kind, lmax_in, lmax_out, channels, correlation, num_elements, paths=paths, **options)
        self.linear = EquivariantLinear(lmax_out, lmax_out, channels, channels)

    def forward(
        self, atomic_basis: torch.Tensor, element_index: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        b = self.basis(atomic_basis, element_index)  # [N, C, D_out]
        h = self.linear(b)  # [N, C, D_out]
        return h if residual is None else h + residual
