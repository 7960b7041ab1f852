"""Neighbour lists with periodic images, built by vesin (https://github.com/Luthaf/vesin).

Convention (docs/CONTRACTS.md): an edge goes from sender i to receiver j, with integer cell shift S,
and its vector is ``pos[j] - pos[i] + S @ cell``. Every pair closer than the cutoff appears in both
directions; an atom is its own neighbour only through a non-zero shift (small periodic cells).
Edges are sorted by (sender, receiver, shift) so results are reproducible (one sort of an int64 key).

* :func:`neighbor_list`: numpy in, numpy out (training data, the host path of the calculator);
* :func:`neighbor_list_torch`: tensors in, tensors out on their device. On a GPU vesin's CUDA kernels build the
  list (:func:`neighbor_list_device`) and the positions never leave the device; on the CPU it is
  :func:`neighbor_list` without copies.

vesin's CPU cell list dies of SIGFPE on some inputs and crawls on others (see :func:`vesin_risk`): atoms spread over
~1e5 cutoffs along one axis and thin along another, and mixed periodicity with a far atom. Such inputs are split
along their non-periodic axes into pieces vesin handles (exact: a piece keeps every atom within the cutoff of the
atoms it answers for, and only their edges are kept). A periodic cell vesin cannot handle has nothing to split and
raises :class:`NeighborListError`, before vesin runs.

Torch geometry (fractional coordinates, shifts times the cell) uses elementwise products and sums
(:func:`rows_times_matrix`), never a matmul, which may run in TF32 on a GPU (``"high"`` float32 matmul
precision: ~5e-4 relative error).
"""

from __future__ import annotations

import numpy as np
import torch

from .atoms import cell_problem

__all__ = ["NeighborListError", "neighbor_list", "neighbor_list_device", "neighbor_list_torch", "rows_times_matrix",
           "sort_edges", "sort_edges_torch", "vesin_risk"]  # fmt: skip

# vesin's CPU cell list caps its cells at this many by scaling the cells per axis down together: a thin axis then
# gets zero cells and the process dies of SIGFPE (vesin 0.6: a flat molecule ~5e5 Å long, a 1e6 x 3 x 3 Å cell,
# a periodic 2000 x 2000 x 8 Å cell with a 5 Å cutoff; 1000 x 1000 x 8 Å still runs).
VESIN_MAX_CELLS = 1e5
# With mixed periodicity its time grows as cells x cells along the non-periodic axes (measured: ~0.1 s at this
# product, minutes for a wire with one atom 3e4 Å away).
VESIN_MIXED_WORK = 1e6
# A non-periodic axis is split only when it spans at least this many cutoffs: each half then spans at most 3/4.
SPLIT_MIN_CELLS = 8
_PACKED_LIMIT = 1 << 62  # sort keys (sender, receiver, shift code) below this fit an int64


class NeighborListError(ValueError):
    """A periodic cell vesin's cell list cannot handle (it would crash the process)."""


# ------------------------------------------------------------------------------------------------ geometry
def rows_times_matrix(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``rows @ matrix`` for ``rows [..., 3]`` and ``matrix [3, 3]`` (or broadcastable ``[..., 3, 3]``) as an
    elementwise multiply and sum: full precision whatever the float32 matmul setting (no TF32)."""
    return (rows.unsqueeze(-1) * matrix).sum(dim=-2)


def _as_pbc(pbc) -> np.ndarray:
    if torch.is_tensor(pbc):
        pbc = pbc.detach().cpu().numpy()
    arr = np.asarray(pbc, dtype=bool).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3:
        raise ValueError(f"pbc must be a bool or three bools, got {pbc!r}")
    return arr


def _check_cell(cell: np.ndarray, pbc: np.ndarray) -> None:
    problem = cell_problem(cell, pbc)
    if problem:
        raise ValueError(f"{problem} (a zero cell vector or volume where periodic)")


def _complete_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """The cell with the vectors of non-periodic directions replaced by orthonormal vectors, orthogonal to the
    periodic ones: the fractional coordinate along such a direction is a length in Å that no periodic image
    changes (a molecule: the identity, fractional = Cartesian)."""
    periodic = [k for k in range(3) if pbc[k]]
    others = [k for k in range(3) if not pbc[k]]
    full = np.array(cell, dtype=np.float64).reshape(3, 3)
    if len(periodic) == 3:
        return full
    if not periodic:
        return np.eye(3)
    if len(periodic) == 2:
        normal = np.cross(full[periodic[0]], full[periodic[1]])
        norm = np.linalg.norm(normal)
        if norm < 1e-12 * np.prod(np.linalg.norm(full[periodic], axis=1)):
            raise ValueError(f"the two periodic cell vectors are parallel: {full[periodic].tolist()}")
        full[others[0]] = normal / norm
        return full
    a = full[periodic[0]]
    e = np.eye(3)[int(np.argmin(np.abs(a)))]  # the axis least aligned with a
    b = np.cross(a, e)
    b /= np.linalg.norm(b)
    c = np.cross(a, b)
    c /= np.linalg.norm(c)
    full[others[0]], full[others[1]] = b, c
    return full


def _cells(low: np.ndarray, high: np.ndarray, heights: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """vesin's cells per axis before it rescales them: ``max(trunc(width / cutoff), 1)``, ``width`` the cell's
    perpendicular width (periodic) or the atoms' extent ``high - low`` in fractional units (Å, non-periodic)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.maximum(np.trunc(np.where(pbc, heights, high - low) / cutoff), 1.0)


def vesin_risk(cells: np.ndarray, pbc: np.ndarray) -> str | None:
    """``"crash"`` if vesin's CPU cell list would die on these cells per axis (:func:`_cells`), ``"slow"`` if it
    would crawl (mixed periodicity above :data:`VESIN_MIXED_WORK`), else None. Above :data:`VESIN_MAX_CELLS` cells
    vesin rescales them keeping their ratios, truncating each: an axis left with none is the crash (SIGFPE). The
    rescaled counts are rounded down a little further here, so that a count on the edge counts as a crash."""
    if not np.isfinite(cells).all():
        return "crash"
    if np.prod(cells) > VESIN_MAX_CELLS:
        down = 1.0 - 1e-9
        ratio_xy, ratio_yz = cells[0] / cells[1], cells[1] / cells[2]
        z = np.trunc(np.cbrt(VESIN_MAX_CELLS / (ratio_xy * ratio_yz * ratio_yz)) * down)
        y = np.trunc(ratio_yz * z * down)
        if min(np.trunc(ratio_xy * y * down), y, z) < 1.0:
            return "crash"
    if pbc.any() and not pbc.all() and np.prod(cells) * np.prod(cells[~pbc]) > VESIN_MIXED_WORK:
        return "slow"
    return None


# ------------------------------------------------------------------------------------------------ host path
def _vesin(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    import vesin

    box = cell if pbc.any() else np.zeros((3, 3))
    calculator = vesin.NeighborList(cutoff=cutoff, full_list=True)
    i, j, shifts = calculator.compute(points=pos, box=box, periodic=pbc.tolist(), quantities="ijS")
    return i.view(np.int64), j.view(np.int64), shifts.reshape(-1, 3)  # uint64 below 2^63: a view; int32 shifts


def _split_axis(cells: np.ndarray, pbc: np.ndarray) -> int | None:
    """The non-periodic axis with the most cells, if splitting it shrinks the problem; else None."""
    candidates = [k for k in range(3) if not pbc[k] and cells[k] >= SPLIT_MIN_CELLS]
    return max(candidates, key=lambda k: cells[k]) if candidates else None


def _crash_error(cells: np.ndarray, heights: np.ndarray, pbc: np.ndarray, cutoff: float) -> NeighborListError:
    widths = " x ".join(f"{h:.4g}" if p else "-" for h, p in zip(heights, pbc))
    return NeighborListError(
        f"the neighbour list cannot be built: the periodic cell is {widths} Å wide (perpendicular widths) for a "
        f"cutoff of {cutoff:g} Å, {' x '.join(f'{c:.0f}' for c in cells)} cells of vesin's cell list; above "
        f"{VESIN_MAX_CELLS:.0e} cells it rescales them and a thin axis gets none (the process would die of SIGFPE). "
        "Such proportions are not supported: shorten the long periodic axis (or make it non-periodic) or widen the "
        "thin ones"
    )


def _halves(members: np.ndarray, core: np.ndarray, coordinate: np.ndarray, cutoff: float) -> list | None:
    """``members`` split at the middle of ``coordinate``: per half, its atoms and every atom within the cutoff of
    them along that (non-periodic) axis, and which of them it answers for. None if a half would keep every atom."""
    middle = 0.5 * (coordinate.min() + coordinate.max())
    halves = []
    for side in (coordinate < middle, coordinate >= middle):
        side_core = core & side
        if side_core.any():
            low, high = coordinate[side_core].min() - cutoff, coordinate[side_core].max() + cutoff
            inside = (coordinate >= low) & (coordinate <= high)
            if inside.all():
                return None
            halves.append((members[inside], side_core[inside]))
    return halves


def _raw_pairs(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    """Unsorted ``(i, j, S)`` of all pairs, from vesin, on pieces it handles (module docstring)."""
    inverse = np.linalg.inv(_complete_cell(cell, pbc))
    heights = 1.0 / np.linalg.norm(inverse, axis=0)
    frac = pos @ inverse  # along a non-periodic axis: Å, unchanged by periodic images
    work = [(np.arange(len(pos)), np.ones(len(pos), dtype=bool))]  # (atoms of a piece, whether it answers for them)
    parts = []
    while work:
        members, core = work.pop()
        x = frac[members]
        cells = _cells(x.min(axis=0), x.max(axis=0), heights, pbc, cutoff)
        risk = vesin_risk(cells, pbc)
        axis = None if risk is None else _split_axis(cells, pbc)
        halves = None if axis is None else _halves(members, core, x[:, axis], cutoff)
        if halves is not None:
            work += halves
            continue
        if risk == "crash":
            raise _crash_error(cells, heights, pbc, cutoff)
        if len(members) == len(pos) and core.all():  # one piece answering for every atom: the common case
            return _vesin(pos, cell, pbc, cutoff)
        i, j, s = _vesin(pos[members], cell, pbc, cutoff)
        keep = core[i]
        parts.append((members[i[keep]], members[j[keep]], s[keep]))
    return tuple(np.concatenate(column) for column in zip(*parts))


def sort_edges(sender: np.ndarray, receiver: np.ndarray, shifts: np.ndarray, n: int):
    """Edges in the order (sender, receiver, shift), by ONE sort of an int64 key when it fits (a lexicographic
    sort otherwise): int64 indices and integer shifts in, int64 out.

    The key packs sender, receiver and the three shifts (counted from the smallest, one bit width for all three:
    numpy's reductions along the short axis of an ``[E, 3]`` array are ~20x slower than over all of it) into bit
    fields; it is built, sorted and decoded in place, with shifts and masks instead of divisions (millions of edges:
    every temporary array and every division shows)."""
    if len(sender) == 0:
        return sender, receiver, shifts.astype(np.int64)
    low = int(shifts.min())
    bits, index_bits = max(int(shifts.max()) - low, 1).bit_length(), max(n - 1, 1).bit_length()
    if 2 * index_bits + 3 * bits > 62:
        order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], receiver, sender))
        return sender[order], receiver[order], shifts[order].astype(np.int64)
    key = sender << index_bits
    key |= receiver
    for k in range(3):
        key <<= bits
        key += shifts[:, k]
    key -= low * ((1 << 2 * bits) + (1 << bits) + 1)  # every shift field counted from low
    key.sort()
    out = np.empty((len(key), 3), dtype=np.int64)
    for k in (2, 1, 0):
        np.bitwise_and(key, (1 << bits) - 1, out=out[:, k])
        key >>= bits
    out += low
    receiver = key & ((1 << index_bits) - 1)
    key >>= index_bits
    return key, receiver, out


def _cap_order(receiver: np.ndarray, sender: np.ndarray, d2: np.ndarray, shifts: np.ndarray, max_neighbors: int):
    """Positions of the edges kept when each receiver keeps its ``max_neighbors`` nearest senders."""
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], sender, d2, receiver))
    recv_sorted = receiver[order]
    starts = np.searchsorted(recv_sorted, recv_sorted, side="left")
    rank = np.arange(len(order)) - starts
    return np.sort(order[rank < max_neighbors])


def neighbor_list(positions, cell, pbc, cutoff: float, max_neighbors: int | None = None):
    """All pairs closer than ``cutoff``, on the CPU with vesin.

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

    Raises:
        ValueError: non-finite positions, a zero or degenerate periodic cell; :class:`NeighborListError` for a
        periodic cell vesin cannot handle (module docstring).
    """
    pos = np.ascontiguousarray(np.asarray(positions, dtype=np.float64).reshape(-1, 3))
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = _as_pbc(pbc)
    if pbc.any():
        _check_cell(cell, pbc)
    if len(pos) == 0 or cutoff <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros((0, 3), dtype=np.int64)
    if not np.isfinite(pos).all():
        raise ValueError("non-finite positions: the neighbour list needs finite coordinates")
    sender, receiver, shifts = sort_edges(*_raw_pairs(pos, cell, pbc, float(cutoff)), len(pos))
    if max_neighbors is not None:
        vec = pos[receiver] - pos[sender] + shifts @ cell
        keep = _cap_order(receiver, sender, np.einsum("ij,ij->i", vec, vec), shifts, int(max_neighbors))
        sender, receiver, shifts = sender[keep], receiver[keep], shifts[keep]
    return sender, receiver, shifts


# ------------------------------------------------------------------------------------------------ device path
def _stable_argsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Lexicographic order, first key primary (successive stable sorts, last key first)."""
    order = torch.arange(keys[0].shape[0], device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def sort_edges_torch(sender: torch.Tensor, receiver: torch.Tensor, shifts: torch.Tensor, n: int):
    """:func:`sort_edges` for int64 tensors on any device (one host sync: the shift range)."""
    if sender.shape[0] == 0:
        return sender, receiver, shifts
    low, high = torch.stack([shifts.min(), shifts.max()]).tolist()
    bits, index_bits = max(high - low, 1).bit_length(), max(n - 1, 1).bit_length()
    if 2 * index_bits + 3 * bits > 62:
        order = _stable_argsort([sender, receiver, shifts[:, 0], shifts[:, 1], shifts[:, 2]])
        return sender[order], receiver[order], shifts[order]
    key = (sender << index_bits) | receiver
    for k in range(3):
        key = (key << bits) + shifts[:, k]
    key = torch.sort(key - low * ((1 << 2 * bits) + (1 << bits) + 1)).values
    mask = (1 << bits) - 1
    columns = [(key >> (2 - k) * bits) & mask for k in range(3)]
    pair = key >> 3 * bits
    return pair >> index_bits, pair & ((1 << index_bits) - 1), torch.stack(columns, dim=1) + low


def _device_risk(pos: torch.Tensor, cell_host: np.ndarray, pbc: np.ndarray, cutoff: float) -> str | None:
    """:func:`vesin_risk` of device positions: the extents from one copy of six numbers to the host."""
    inverse = np.linalg.inv(_complete_cell(cell_host, pbc))
    frac = rows_times_matrix(pos, torch.tensor(inverse, dtype=pos.dtype, device=pos.device))
    low, high = torch.cat([frac.amin(dim=0), frac.amax(dim=0)]).double().cpu().numpy().reshape(2, 3)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise ValueError("non-finite positions: the neighbour list needs finite coordinates")
    return vesin_risk(_cells(low, high, 1.0 / np.linalg.norm(inverse, axis=0), pbc, cutoff), pbc)


def _cap_torch(sender, receiver, shifts, pos, cell, max_neighbors: int):
    vec = pos.index_select(0, receiver) - pos.index_select(0, sender) + rows_times_matrix(shifts.to(pos.dtype), cell)
    order = _stable_argsort([receiver, vec.square().sum(dim=1)])  # ties keep the (sender, shift) order
    _, counts = torch.unique_consecutive(receiver[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(order.shape[0], device=order.device) - starts
    keep = torch.sort(order[rank < int(max_neighbors)]).values
    return sender[keep], receiver[keep], shifts[keep]


@torch.no_grad()
def neighbor_list_torch(positions: torch.Tensor, cell, pbc, cutoff: float, max_neighbors: int | None = None):
    """All pairs closer than ``cutoff`` for tensors on any device vesin runs on (the CPU, CUDA): the result of
    :func:`neighbor_list`, as tensors on ``positions.device``.

    CUDA tensors take :func:`neighbor_list_device` (vesin's CUDA cell list: the positions stay on the GPU); CPU
    tensors :func:`neighbor_list` (no copies; numpy's sort is the fastest there), and so do tensors on a device
    vesin has no kernel for (copied to the host, the edges copied back).

    Args:
        positions: [N,3] Å tensor (its device is used throughout).
        cell: [3,3] or [1,3,3] Å (ignored along non-periodic directions; may be zero for a molecule).
        pbc: bool, [3] or [1,3] bools.
        cutoff, max_neighbors: as in :func:`neighbor_list`.

    Returns:
        sender [E] long, receiver [E] long, unit_shifts [E,3] in ``positions.dtype`` (integer-valued),
        sorted by (sender, receiver, shift).
    """
    pos = positions.detach().reshape(-1, 3)
    if pos.device.type == "cuda" and pos.shape[0] > 0 and cutoff > 0:
        return neighbor_list_device(pos, cell, pbc, cutoff, max_neighbors)
    cell_host = torch.as_tensor(cell).detach().reshape(3, 3).double().cpu().numpy()
    out = neighbor_list(pos.double().cpu().numpy(), cell_host, _as_pbc(pbc), cutoff, max_neighbors)
    sender, receiver, shifts = (torch.from_numpy(x).to(pos.device) for x in out)
    return sender, receiver, shifts.to(pos.dtype)


@torch.no_grad()
def neighbor_list_device(positions: torch.Tensor, cell, pbc, cutoff: float, max_neighbors: int | None = None):
    """:func:`neighbor_list_torch` computed on ``positions.device`` whatever it is: vesin on the device's tensors
    and one ``torch.sort`` there. Host syncs: the cell and pbc, six numbers (the atoms' extent, for
    :func:`vesin_risk`), the edge count and the shift range. An input vesin's cell list would crash or crawl on
    takes the host path (:func:`neighbor_list`, split into pieces) and its edges are copied to the device.
    vesin runs on the CPU and on CUDA devices only (a ValueError for others)."""
    pos = positions.detach().reshape(-1, 3)
    device, dtype = pos.device, pos.dtype
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"vesin has no neighbour list for {device.type} tensors: use neighbor_list_torch")
    cell_t = torch.as_tensor(cell, device=device).detach().reshape(3, 3).to(torch.float64)
    cell_host, pbc_host = cell_t.cpu().numpy(), _as_pbc(pbc)
    cutoff = float(cutoff)
    if pbc_host.any():
        _check_cell(cell_host, pbc_host)
    if pos.shape[0] == 0 or cutoff <= 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone(), torch.zeros((0, 3), dtype=dtype, device=device)
    if _device_risk(pos, cell_host, pbc_host, cutoff) is not None:  # rare: split on the host
        out = neighbor_list(pos.double().cpu().numpy(), cell_host, pbc_host, cutoff, max_neighbors)
        sender, receiver, shifts = (torch.from_numpy(x).to(device) for x in out)
        return sender, receiver, shifts.to(dtype)
    import vesin

    box = cell_t if pbc_host.any() else torch.zeros_like(cell_t)
    i, j, s = vesin.NeighborList(cutoff=cutoff, full_list=True).compute(
        points=pos.to(torch.float64).contiguous(), box=box, periodic=torch.as_tensor(pbc_host, device=device),
        quantities="ijS")  # fmt: skip
    sender, receiver, shifts = sort_edges_torch(i.to(torch.long), j.to(torch.long), s.to(torch.long), pos.shape[0])
    if max_neighbors is not None:
        sender, receiver, shifts = _cap_torch(sender, receiver, shifts, pos.double(), cell_t, max_neighbors)
    return sender, receiver, shifts.to(dtype)
