"""Forces, virial and per-atom virials from edge forces: the derivatives of an energy that depends on the positions
only through the edge vectors, as every tdn model (and the D3 dispersion term) does.

An edge ``e`` goes from sender ``i_e`` to receiver ``j_e`` with the periodic shift ``S_e`` (Å):
``r_e = pos[j_e] - pos[i_e] + S_e``. With the edge force ``g_e = dE/dr_e`` (``[E, 3]``, one backward pass with
respect to the shift vectors, ``dr_e/dS_e = 1``):

* forces        ``F_k = -dE/dpos_k = sum_{e: i_e = k} g_e - sum_{e: j_e = k} g_e``;
* strain        ``dE/deps = sum_e r_e ⊗ g_e`` for the homogeneous strain ``r -> (1 + eps) r`` (symmetrised, as the
  model's own stress, which differentiates a symmetric strain; exactly symmetric already for a rotation-invariant
  energy), virial ``W = -dE/deps`` and stress ``sigma = -W / V`` (ASE sign, ``V`` the cell volume);
* per-atom virials ``W_k = 1/2 sum_{e: i_e = k or j_e = k} (-sym(r_e ⊗ g_e))``: half of each edge's virial to
  each of its two atoms, so that ``sum_k W_k = W``. ASE's per-atom ``stresses`` are ``sigma_k = -W_k / V``
  with the volume of the whole cell (as ``ase.calculators.lj.LennardJones``), so ``sum_k sigma_k = sigma``.
  The split is one choice among many (per-atom stresses are not unique): the usual half-and-half split of each
  pair's virial, as for pair potentials.

Everything here accepts a leading committee dimension (``g [M, E, 3]`` gives ``[M, N, 3]`` forces). Geometry is
elementwise products and sums, never a matmul (no TF32 whatever the matmul precision setting).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "atom_virials", "derivatives", "edge_forces", "edge_vectors", "evaluate_models", "forces_from_edges", "to_host",
    "virial",
]  # fmt: skip


def edge_vectors(pos: torch.Tensor, edge_index: torch.Tensor, edge_shift: torch.Tensor) -> torch.Tensor:
    """``r_e = pos[j_e] - pos[i_e] + S_e`` ``[E, 3]`` (the same arithmetic as the model's own)."""
    return pos[edge_index[1]] - pos[edge_index[0]] + edge_shift


def forces_from_edges(g: torch.Tensor, edge_index: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """``F_k = sum_{e: i_e = k} g_e - sum_{e: j_e = k} g_e`` for edge forces ``g [..., E, 3]`` -> ``[..., N, 3]``."""
    dim = g.dim() - 2
    forces = g.new_zeros(*g.shape[:dim], num_atoms, 3)
    return forces.index_add_(dim, edge_index[0], g).index_add_(dim, edge_index[1], g, alpha=-1)


def _edge_virials(g: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``-sym(r_e ⊗ g_e)`` ``[..., E, 3, 3]``."""
    outer = vectors.unsqueeze(-1) * g.unsqueeze(-2)  # [..., E, 3, 3]: r_a g_b
    return -0.5 * (outer + outer.transpose(-1, -2))


def virial(g: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``W = -sum_e sym(r_e ⊗ g_e)`` ``[..., 3, 3]`` (eV); the stress is ``-W / V``."""
    return _edge_virials(g, vectors).sum(dim=-3)


def atom_virials(g: torch.Tensor, vectors: torch.Tensor, edge_index: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """Per-atom virials ``[..., N, 3, 3]`` (eV): half of each edge's ``-sym(r_e ⊗ g_e)`` to each of its atoms."""
    half = 0.5 * _edge_virials(g, vectors)  # [..., E, 3, 3]
    dim = half.dim() - 3
    out = half.new_zeros(*half.shape[:dim], num_atoms, 3, 3)
    return out.index_add_(dim, edge_index[0], half).index_add_(dim, edge_index[1], half)


def edge_forces(
    energy: Callable[[torch.Tensor], torch.Tensor], edge_shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value, g)``: ``value = energy(shift)`` (detached) and ``g = d sum(value) / d shift`` ``[E, 3]``, zeros
    where the energy does not depend on an edge (no edge at all, or every pair beyond the cutoff)."""
    shift = edge_shift.detach().requires_grad_(True)
    with torch.enable_grad():
        value = energy(shift)
        grad = None
        if value.requires_grad:
            (grad,) = torch.autograd.grad(value.sum(), shift, allow_unused=True)
    return value.detach(), torch.zeros_like(shift) if grad is None else grad.detach()


def evaluate_models(
    models: Sequence[nn.Module],
    pos: torch.Tensor,
    element_index: Sequence[torch.Tensor],
    edge_index: torch.Tensor,
    edge_shift: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Run every model of ``models`` (one model, or a committee sharing cutoff and elements) on one graph;
    ``element_index``: each model's element rows ``[N]`` (the same tensor where the element lists agree).

    The graph's tensors (positions, element rows, ``edge_index``, shift vectors) are built once and shared; each
    model runs its energy network forward and one backward pass with respect to the shift vectors, one model after
    the other (so that only one model's autograd graph is alive at a time). Returns ``node_energy [M, N]`` and the
    edge forces ``g [M, E, 3]`` (eV/Å), detached.
    """
    node_energies, grads = [], []
    for model, rows in zip(models, element_index):
        node_energy, g = edge_forces(lambda s, m=model, r=rows: m.node_energies(pos, r, edge_index, s), edge_shift)
        node_energies.append(node_energy)
        grads.append(g)
    return {"node_energy": torch.stack(node_energies), "g": torch.stack(grads)}


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The tensors as float64 numpy arrays of the same shapes, brought to the host in ONE transfer (one sync on an
    accelerator): concatenated flat on the device in the widest dtype, split again on the host."""
    with torch.no_grad():
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors.values()])
    host = np.asarray(flat.cpu().numpy(), dtype=np.float64)
    arrays, offset = {}, 0
    for key, tensor in tensors.items():
        arrays[key] = host[offset : offset + tensor.numel()].reshape(tensor.shape)
        offset += tensor.numel()
    return arrays


def derivatives(g: torch.Tensor, vectors: torch.Tensor, edge_index: torch.Tensor, num_atoms: int, *,
                with_virial: bool, with_atom_virials: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """From edge forces ``g [..., E, 3]`` and edge vectors ``[E, 3]``: ``forces [..., N, 3]``, with ``with_virial``
    ``virial [..., 3, 3]``, with ``with_atom_virials`` ``atom_virials [N, 3, 3]`` of the mean of ``g`` over its
    leading (committee) dimensions: the per-atom split is linear in ``g``, so that is the members' mean."""
    out = {"forces": forces_from_edges(g, edge_index, num_atoms)}
    if with_virial:
        out["virial"] = virial(g, vectors)
    if with_atom_virials:
        mean = g.reshape(-1, *g.shape[-2:]).mean(dim=0)
        out["atom_virials"] = atom_virials(mean, vectors, edge_index, num_atoms)
    return out
