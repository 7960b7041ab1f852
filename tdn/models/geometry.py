"""Geometry of a batch of structures: periodic edge shifts, strain, cell volume.

Written as elementwise products and sums, never as ``matmul`` / ``einsum`` / ``bmm`` / ``det``: those run in
bfloat16 under autocast (0.02 Å edge errors in a 12 Å cell) and in TF32 once a user allows it
(``torch.set_float32_matmul_precision("high")``, ~5e-4 relative). Geometry must keep the model's own precision
whatever those settings say; it is a few flops per edge, so nothing is lost.
"""

from __future__ import annotations

import torch


def vector_times_matrix(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``out[..., j] = sum_i v[..., i] m[..., i, j]`` for ``v [..., 3]`` and ``m [..., 3, 3]`` (row vectors)."""
    return (v.unsqueeze(-1) * m).sum(-2)  # [..., 3]


def matrix_times_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[..., i, k] = sum_j a[..., i, j] b[..., j, k]`` for 3 x 3 matrices."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)  # [..., 3, 3]


def cell_volume(cell: torch.Tensor) -> torch.Tensor:
    """``|a1 · (a2 × a3)|`` per cell ``[B, 3, 3]`` (rows are lattice vectors) -> ``[B]``; zero for molecules."""
    return (cell[:, 0] * torch.linalg.cross(cell[:, 1], cell[:, 2], dim=-1)).sum(-1).abs()


def strained_geometry(
    pos: torch.Tensor,  # [N, 3]
    cell: torch.Tensor,  # [B, 3, 3]
    unit_shifts: torch.Tensor,  # [E, 3]
    batch_index: torch.Tensor,  # [N]
    sender: torch.Tensor,  # [E]
    displacement: torch.Tensor | None = None,  # [B, 3, 3]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and edge shifts (``unit_shifts @ cell`` in Å) after the strain ``1 + sym(displacement)``.

    ``displacement`` is the zero tensor that stress is differentiated against; ``None`` leaves everything
    unstrained. Autocast is switched off here so that the result keeps the precision of ``pos``.
    """
    with torch.autocast(pos.device.type, enabled=False):
        if displacement is not None:
            strain = 0.5 * (displacement + displacement.transpose(1, 2))  # [B, 3, 3]
            pos = pos + vector_times_matrix(pos, strain[batch_index])  # [N, 3]
            cell = cell + matrix_times_matrix(cell, strain)  # [B, 3, 3]
        edge_shift = vector_times_matrix(unit_shifts, cell[batch_index[sender]])  # [E, 3]
    return pos, edge_shift
