"""Neighbour lists with periodic images.

Convention (docs/CONTRACTS.md): an edge goes from sender i to receiver j, with integer cell shift S,
and its vector is ``pos[j] - pos[i] + S @ cell``. Every pair closer than the cutoff appears in both
directions; an atom is its own neighbour only through a non-zero shift (small periodic cells).
Edges are sorted by (sender, receiver, shift) so results are reproducible.

``neighbor_list`` runs on the CPU with vesin (numpy in, numpy out). ``neighbor_list_torch`` is a
pure-torch version for tensors on any device (a GPU during MD): a brute-force search over all
pairs and the periodic images that can reach the cutoff, processed in chunks to bound memory.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch


def _as_pbc(pbc) -> np.ndarray:
    arr = np.asarray(pbc, dtype=bool).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3:
        raise ValueError(f"pbc must be a bool or three bools, got {pbc!r}")
    return arr


def _check_cell(cell: np.ndarray, pbc: np.ndarray) -> None:
    lengths = np.linalg.norm(cell, axis=1)
    if np.any(pbc & (lengths < 1e-12)):
        raise ValueError(f"periodic along a zero cell vector: pbc={pbc.tolist()}, cell lengths={lengths.tolist()}")
    if pbc.all() and abs(np.linalg.det(cell)) < 1e-12:
        raise ValueError("fully periodic cell with zero volume")


def _sort_edges(sender, receiver, shifts) -> np.ndarray:
    return np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], receiver, sender))


def _cap_order(receiver: np.ndarray, sender: np.ndarray, d2: np.ndarray, shifts: np.ndarray, max_neighbors: int):
    """Positions of the edges kept when each receiver keeps its ``max_neighbors`` nearest senders."""
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], sender, d2, receiver))
    recv_sorted = receiver[order]
    starts = np.searchsorted(recv_sorted, recv_sorted, side="left")
    rank = np.arange(len(order)) - starts
    return np.sort(order[rank < max_neighbors])


def neighbor_list(positions, cell, pbc, cutoff: float, max_neighbors: int | None = None):
    """All pairs closer than ``cutoff``, on the CPU (vesin).

    Args:
        positions: [N,3] Å.
        cell: [3,3] Å, rows are the cell vectors (ignored along non-periodic directions; may be zero
            for a molecule).
        pbc: bool or [3] bools.
        cutoff: Å.
        max_neighbors: keep, for each receiver, only this many nearest senders (ties broken by
            sender index then shift); None keeps all. The capped list is no longer symmetric.

    Returns:
        sender [E] int64, receiver [E] int64, unit_shifts [E,3] int64, with
        ``pos[receiver] - pos[sender] + unit_shifts @ cell`` the edge vectors, sorted by
        (sender, receiver, shift).
    """
    import vesin

    pos = np.ascontiguousarray(np.asarray(positions, dtype=np.float64).reshape(-1, 3))
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = _as_pbc(pbc)
    if len(pos) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros((0, 3), dtype=np.int64)
    if pbc.any():
        _check_cell(cell, pbc)
    box = cell if pbc.any() else np.zeros((3, 3))
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts = calculator.compute(points=pos, box=box, periodic=pbc.tolist(), quantities="ijS")
    sender = np.asarray(i, dtype=np.int64)
    receiver = np.asarray(j, dtype=np.int64)
    shifts = np.asarray(shifts, dtype=np.int64).reshape(-1, 3)
    order = _sort_edges(sender, receiver, shifts)
    sender, receiver, shifts = sender[order], receiver[order], shifts[order]
    if max_neighbors is not None:
        vec = pos[receiver] - pos[sender] + shifts @ cell
        keep = _cap_order(receiver, sender, np.einsum("ij,ij->i", vec, vec), shifts, int(max_neighbors))
        sender, receiver, shifts = sender[keep], receiver[keep], shifts[keep]
    return sender, receiver, shifts


# ----------------------------------------------------------------------------------------------
# torch


def _complete_cell(cell: torch.Tensor, pbc: list[bool]) -> torch.Tensor:
    """Replace the vectors of non-periodic directions by unit vectors so the cell is invertible.

    Nothing is ever shifted along those directions; they only make fractional coordinates defined.
    """
    periodic = [k for k in range(3) if pbc[k]]
    if len(periodic) == 3:
        return cell
    full = cell.clone()
    if len(periodic) == 2:
        normal = torch.linalg.cross(cell[periodic[0]], cell[periodic[1]])
        full[[k for k in range(3) if not pbc[k]][0]] = normal / normal.norm()
        return full
    a = cell[periodic[0]]
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    e = eye[int(torch.argmin((eye @ a).abs()))]  # the axis least aligned with a
    b = torch.linalg.cross(a, e)
    b = b / b.norm()
    c = torch.linalg.cross(a, b)
    c = c / c.norm()
    others = [k for k in range(3) if not pbc[k]]
    full[others[0]], full[others[1]] = b, c
    return full


def _image_shifts(inv_cell: torch.Tensor, pbc: list[bool], cutoff: float) -> torch.Tensor:
    """Integer shifts that can bring an image within ``cutoff``, for wrapped positions.

    For wrapped fractional coordinates the difference along k lies in (-1, 1), and a vector of
    length <= cutoff has |fractional component k| <= cutoff * |b_k| (b_k: reciprocal vector, a
    column of the inverse cell), so |S_k| <= ceil(cutoff * |b_k|).
    """
    recip = inv_cell.norm(dim=0)
    ranges = []
    for k in range(3):
        n = math.ceil(cutoff * float(recip[k])) if pbc[k] else 0
        ranges.append(range(-n, n + 1))
    shifts = list(itertools.product(*ranges))
    return torch.tensor(shifts, dtype=inv_cell.dtype, device=inv_cell.device)


def _stable_argsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Lexicographic order, first key primary (successive stable sorts, last key first)."""
    order = torch.arange(keys[0].shape[0], device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


@torch.no_grad()
def neighbor_list_torch(
    positions: torch.Tensor,
    cell,
    pbc,
    cutoff: float,
    max_neighbors: int | None = None,
    max_pairs_per_chunk: int = 1 << 22,
):
    """All pairs closer than ``cutoff`` for tensors on any device (same result as :func:`neighbor_list`).

    Args:
        positions: [N,3] Å tensor (its device and dtype are used throughout).
        cell: [3,3] or [1,3,3] Å.
        pbc: bool, [3] or [1,3] bools.
        cutoff: Å.
        max_neighbors: as in :func:`neighbor_list`.
        max_pairs_per_chunk: bound on (senders in a chunk) x N x images held in memory at once.

    Returns:
        sender [E] long, receiver [E] long, unit_shifts [E,3] in ``positions.dtype`` (integer-valued).
    """
    pos = positions.reshape(-1, 3)
    device, dtype = pos.device, pos.dtype
    n = pos.shape[0]
    cell = torch.as_tensor(cell, dtype=dtype, device=device).reshape(3, 3)
    pbc_list = _as_pbc(torch.as_tensor(pbc).cpu().numpy() if torch.is_tensor(pbc) else pbc).tolist()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone(), torch.zeros((0, 3), dtype=dtype, device=device)

    mask_pbc = torch.tensor(pbc_list, dtype=dtype, device=device)
    if any(pbc_list):
        _check_cell(cell.detach().double().cpu().numpy(), np.array(pbc_list))
        full = _complete_cell(cell, pbc_list)
        inv = torch.linalg.inv(full)
        offset = torch.floor(pos @ inv) * mask_pbc  # wrap periodic coordinates into [0, 1)
        wrapped = pos - offset @ full
        shifts = _image_shifts(inv, pbc_list, float(cutoff))
    else:
        offset = torch.zeros_like(pos)
        wrapped = pos
        shifts = torch.zeros((1, 3), dtype=dtype, device=device)
    shift_vectors = shifts @ cell
    zero_shift = (shifts == 0).all(dim=1)
    m = shifts.shape[0]
    chunk = max(1, max_pairs_per_chunk // max(1, n * m))
    cutoff2 = float(cutoff) ** 2
    all_j = torch.arange(n, device=device)

    senders, receivers, images, dist2 = [], [], [], []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        vec = wrapped[None, :, None, :] - wrapped[start:stop, None, None, :] + shift_vectors[None, None, :, :]
        d2 = (vec * vec).sum(dim=-1)  # [chunk, N, M]
        close = d2 < cutoff2
        is_self = (torch.arange(start, stop, device=device)[:, None] == all_j[None, :])[:, :, None] & zero_shift
        close &= ~is_self
        ii, jj, mm = close.nonzero(as_tuple=True)
        senders.append(ii + start)
        receivers.append(jj)
        images.append(mm)
        dist2.append(d2[ii, jj, mm])
    sender = torch.cat(senders)
    receiver = torch.cat(receivers)
    d2 = torch.cat(dist2)
    # Undo the wrapping: pos_w = pos - o @ cell, so S = S' + o_i - o_j for the original positions.
    unit_shifts = shifts[torch.cat(images)] + offset[sender] - offset[receiver]

    order = _stable_argsort([sender, receiver, unit_shifts[:, 0], unit_shifts[:, 1], unit_shifts[:, 2]])
    sender, receiver, unit_shifts, d2 = sender[order], receiver[order], unit_shifts[order], d2[order]
    if max_neighbors is not None:
        order = _stable_argsort([receiver, d2])  # ties keep the (sender, shift) order
        recv_sorted = receiver[order]
        _, counts = torch.unique_consecutive(recv_sorted, return_counts=True)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rank = torch.arange(order.shape[0], device=device) - starts
        keep = torch.sort(order[rank < int(max_neighbors)]).values
        sender, receiver, unit_shifts = sender[keep], receiver[keep], unit_shifts[keep]
    return sender, receiver, unit_shifts
