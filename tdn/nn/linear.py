"""Equivariant linear maps on the stacked layout ``[N, C, D]``.

Channels are mixed separately within each degree ``l``, with one ``[C_in, C_out]`` matrix per degree shared
by its ``2l + 1`` components; degrees are never mixed (that would break equivariance). Degrees present on the
output but not on the input come out as zeros; input degrees above ``lmax_out`` are dropped.
Weights are ``N(0, 1)`` and the sum over input channels is divided by ``sqrt(C_in)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..contractions import ElementGroups
from ..o3 import degree_slice, dim


class EquivariantLinear(nn.Module):
    """``x [N, C_in, (lmax_in+1)^2]`` -> ``[N, C_out, (lmax_out+1)^2]``, no bias."""

    def __init__(self, lmax_in: int, lmax_out: int, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.lmax_in, self.lmax_out = lmax_in, lmax_out
        self.channels_in, self.channels_out = channels_in, channels_out
        self.num_degrees = min(lmax_in, lmax_out) + 1
        self.weight = nn.Parameter(torch.randn(self.num_degrees, channels_in, channels_out))  # [L+1, C_in, C_out]
        self.norm = channels_in**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [
            torch.einsum("ncm,co->nom", x[:, :, degree_slice(l)], self.weight[l])  # [N, C_out, 2l+1]
            for l in range(self.num_degrees)
        ]
        return self._assemble(blocks)

    def _assemble(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate the per-degree outputs, normalise, and zero-fill degrees the input does not have."""
        out = torch.cat(blocks, dim=2) * self.norm  # [N, C_out, (min(lmax_in, lmax_out)+1)^2]
        missing = dim(self.lmax_out) - out.shape[2]
        if missing > 0:
            out = torch.cat([out, out.new_zeros(out.shape[0], out.shape[1], missing)], dim=2)
        return out

    def extra_repr(self) -> str:
        return (
            f"lmax_in={self.lmax_in}, lmax_out={self.lmax_out}, "
            f"channels_in={self.channels_in}, channels_out={self.channels_out}"
        )


class ElementLinear(EquivariantLinear):
    """An :class:`EquivariantLinear` with a separate weight set per element (MACE's self-connection).

    ``x [N, C_in, D_in]``, ``element_index [N]`` -> ``[N, C_out, D_out]``:
    ``out[n, :, LM] = W[z_n, L]^T x[n, :, LM] / sqrt(C_in)``. The rows are grouped by element
    (:class:`tdn.contractions.ElementGroups`, cached on the index tensor and shared with the product basis) and each
    element's rows go through one matmul per degree, so no per-node ``[C_in, C_out]`` weight is materialised.
    Inside ``torch.compile`` (where the grouping's host sync would break the graph) the node's matrices are gathered.
    """

    def __init__(self, lmax_in: int, lmax_out: int, channels_in: int, channels_out: int, num_elements: int) -> None:
        super().__init__(lmax_in, lmax_out, channels_in, channels_out)
        self.num_elements = num_elements
        self.weight = nn.Parameter(torch.randn(num_elements, self.num_degrees, channels_in, channels_out))

    def forward(self, x: torch.Tensor, element_index: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if torch.compiler.is_compiling():
            return self.gathered(x, element_index)
        groups = ElementGroups.of(element_index, self.num_elements)
        xs = groups.sort(x)  # [N, C_in, D_in], rows sorted by element
        blocks = []
        for l in range(self.num_degrees):
            xl = xs[:, :, degree_slice(l)]  # [N, C_in, 2l+1]
            parts = [torch.einsum("ncm,co->nom", xl[start:stop], self.weight[z, l]) for z, start, stop in
                     groups.chunks()]  # [n_z, C_out, 2l+1]
            blocks.append(torch.cat(parts) if parts else xl.new_zeros(0, self.channels_out, 2 * l + 1))
        return groups.unsort(self._assemble(blocks))  # [N, C_out, D_out]

    def gathered(self, x: torch.Tensor, element_index: torch.Tensor) -> torch.Tensor:
        """The same map with the node's matrices gathered, ``[N, C_in, C_out]`` per degree: no host sync."""
        blocks = [
            torch.einsum("ncm,nco->nom", x[:, :, degree_slice(l)], self.weight[element_index, l])  # [N, C_out, 2l+1]
            for l in range(self.num_degrees)
        ]
        return self._assemble(blocks)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_elements={self.num_elements}"
