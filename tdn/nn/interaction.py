"""Interaction block: the equivariant convolution that gathers messages from neighbours.

For every edge ``i -> j`` (sender ``i``, receiver ``j``) the sender's features, mixed by a linear map, are coupled
through the chosen tensor-product backend with the edge's spherical harmonics ``Y(r_ij)``, weighted per channel by
a radial MLP of ``|r_ij|``; the messages are summed on the receiver, divided by the average number of neighbours,
and mixed by a second linear map. The result is MACE's atomic basis ``A_j``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import tp as tp_backends
from .linear import EquivariantLinear
from .radial import RadialMLP
from .receiver_conv import receiver_conv
from .recompute import recompute_if_large


class InteractionBlock(nn.Module):
    """``h [N, C, (lmax_node+1)^2]`` -> atomic basis ``A [N, C, (lmax_out+1)^2]``.

    ``kind``/``paths``/``weights``/``tp_options`` choose the tensor-product backend (see :func:`tdn.tp.build`).
    """

    # Large systems in eval mode: the radial MLP's activations (~500 floats per edge, and as much again for their
    # gradients) are the largest per-edge memory once the convolution is fused, so above `checkpoint_above` edges
    # (`checkpoint_above_cpu` on the CPU, whose memory is larger and where the recompute cost ~17 % of a
    # 1.4M-edge step) the MLP is recomputed in chunks (tdn.nn.recompute). Set on an instance to tune; None disables.
    checkpoint_above: int | None = 500_000
    checkpoint_above_cpu: int | None = 4_000_000
    checkpoint_chunk: int = 65_536

    def __init__(
        self,
        kind: str,
        lmax_node: int,
        lmax_sh: int,
        lmax_out: int,
        channels: int,
        num_radial: int,
        radial_hidden: Sequence[int],
        avg_num_neighbors: float = 1.0,
        paths: str = "o3",
        weights: str = "shared",
        tp_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.linear_up = EquivariantLinear(lmax_node, lmax_node, channels, channels)
        self.tp = tp_backends.build(
            kind,
            channels=channels,
            paths=paths,
            weights=weights,
            lmax_in=lmax_node,
            lmax_sh=lmax_sh,
            lmax_out=lmax_out,
            **(tp_options or {}),
        )
        self.radial_mlp = RadialMLP(num_radial, radial_hidden, channels, self.tp.num_weights)
        self.linear = EquivariantLinear(lmax_out, lmax_out, channels, channels)
        self.avg_num_neighbors = float(avg_num_neighbors)

    def forward(
        self,
        node_feats: torch.Tensor,  # [N, C, D_node]
        edge_sh: torch.Tensor,  # [E, D_sh]
        edge_radial: torch.Tensor,  # [E, num_radial]
        edge_index: torch.Tensor,  # [2, E]: sender, receiver
    ) -> torch.Tensor:
        sender, receiver = edge_index[0], edge_index[1]
        h = self.linear_up(node_feats)  # [N, C, D_node]
        weights = recompute_if_large(self.radial_mlp, (edge_radial,), training=self.training,
                                     above=self.recompute_above(edge_radial), chunk=self.checkpoint_chunk)
        # eval mode on a device without the Triton kernel (the CPU): one matrix product per receiver, None elsewhere
        summed = None if self.training else receiver_conv(self.tp, h, edge_sh, weights, sender, receiver)
        if summed is None:
            summed = self._conv(h, edge_sh, weights, sender, receiver)  # [N, C, D_out]
        return self.linear(summed) / self.avg_num_neighbors  # [N, C, D_out]

    def recompute_above(self, edge_radial: torch.Tensor) -> int | None:
        """The edge count above which the radial MLP is recomputed, for the device of ``edge_radial``."""
        return self.checkpoint_above_cpu if edge_radial.device.type == "cpu" else self.checkpoint_above

    def _conv(self, h: torch.Tensor, edge_sh: torch.Tensor, weights: torch.Tensor, sender: torch.Tensor,
              receiver: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The backend's own gather-product-scatter (may be fused), or per-edge messages summed on the receivers."""
        if hasattr(self.tp, "conv"):
            # training differentiates the forces again: the fused kernels are first order, the reference is not
            fused = False if self.training else None
            return self.tp.conv(h, edge_sh, weights, sender, receiver, fused=fused)  # [N, C, D_out]
        messages = self.tp(h[sender], edge_sh, weights)  # [E, C, D_out]
        summed = messages.new_zeros(h.shape[0], *messages.shape[1:])
        return summed.index_add(0, receiver, messages)  # [N, C, D_out]
