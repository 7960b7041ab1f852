"""Neighbour lists with periodic images.

Convention (docs/CONTRACTS.md): an edge goes from sender i to receiver j, with integer cell shift S,
and its vector is ``pos[j] - pos[i] + S @ cell``. Every pair closer than the cutoff appears in both
directions; an atom is its own neighbour only through a non-zero shift (small periodic cells).
Edges are sorted by (sender, receiver, shift) so results are reproducible.

``neighbor_list`` runs on the CPU with vesin (numpy in, numpy out); inputs vesin's cell list would crash
or crawl on (see :func:`vesin_suits`) go to the torch list instead. ``neighbor_list_torch`` is a
pure-torch version for tensors on any device (a GPU during MD): a vectorised, linear-scaling cell list
(see its docstring); ``_brute_force`` is the O(N^2) reference it is tested against.

Torch geometry (fractional coordinates, shifts times the cell) uses elementwise products and sums
(:func:`rows_times_matrix`), never a matmul, which may run in TF32 on a GPU (``"high"`` float32 matmul
precision: ~5e-4 relative error, enough to misplace atoms in bins and miss pairs near the cutoff).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from .atoms import cell_problem


def _as_pbc(pbc) -> np.ndarray:
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


def _sort_edges(sender, receiver, shifts) -> np.ndarray:
    return np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], receiver, sender))


def _cap_order(receiver: np.ndarray, sender: np.ndarray, d2: np.ndarray, shifts: np.ndarray, max_neighbors: int):
    """Positions of the edges kept when each receiver keeps its ``max_neighbors`` nearest senders."""
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], sender, d2, receiver))
    recv_sorted = receiver[order]
    starts = np.searchsorted(recv_sorted, recv_sorted, side="left")
    rank = np.arange(len(order)) - starts
    return np.sort(order[rank < max_neighbors])


def rows_times_matrix(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``rows @ matrix`` for ``rows [..., 3]`` and ``matrix [3, 3]`` (or broadcastable ``[..., 3, 3]``) as an
    elementwise multiply and sum: full precision whatever the float32 matmul setting (no TF32)."""
    return (rows.unsqueeze(-1) * matrix).sum(dim=-2)


# vesin's CPU cell list caps its cells at this many by scaling the cells per axis down together: a thin axis then
# gets zero cells and the process dies of SIGFPE (vesin 0.6: a flat molecule ~5e5 Å long, a 1e6 x 3 x 3 Å cell).
_VESIN_MAX_CELLS = 1e5
# With mixed periodicity its time grows as cells x cells along the non-periodic axes (measured: ~0.1 s at this
# product, minutes for a wire with one atom 3e4 Å away); the torch list stays linear.
_VESIN_MIXED_WORK = 1e6


def vesin_suits(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> bool:
    """Whether vesin's CPU cell list handles these atoms safely and fast, by redoing its choice of cells: per axis
    ``max(trunc(width / cutoff), 1)``, ``width`` the cell's perpendicular width (periodic) or the atoms' extent.
    Above ``_VESIN_MAX_CELLS`` vesin rescales them keeping their ratios: ``False`` when an axis would keep fewer than
    two (zero crashes), and for mixed periodicity above ``_VESIN_MIXED_WORK``. The torch list takes those cases.
    """
    full = _complete_cell(cell, pbc.tolist())
    inverse = np.linalg.inv(full)
    heights = 1.0 / np.linalg.norm(inverse, axis=0)
    frac = positions @ inverse  # along a non-periodic axis: Å along the completed cell's unit vector
    extent = frac.max(axis=0) - frac.min(axis=0)
    cells = np.maximum(np.trunc(np.where(pbc, heights, extent) / cutoff), 1.0)
    if not np.isfinite(cells).all():
        return False
    if pbc.any() and not pbc.all() and np.prod(cells) * np.prod(cells[~pbc]) > _VESIN_MIXED_WORK:
        return False
    if np.prod(cells) <= _VESIN_MAX_CELLS:
        return True
    ratio_xy, ratio_yz = cells[0] / cells[1], cells[1] / cells[2]
    z = np.cbrt(_VESIN_MAX_CELLS / (ratio_xy * ratio_yz * ratio_yz))
    y = ratio_yz * np.trunc(z)
    x = ratio_xy * np.trunc(y)
    return min(x, y, z) >= 2.0


def neighbor_list(positions, cell, pbc, cutoff: float, max_neighbors: int | None = None):
    """All pairs closer than ``cutoff``, on the CPU (vesin; the torch list where vesin would crash or crawl,
    see :func:`vesin_suits`).

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
    if not np.isfinite(pos).all():
        raise ValueError("non-finite positions: the neighbour list needs finite coordinates")
    if not vesin_suits(pos, cell, pbc, float(cutoff)):
        sender, receiver, shifts = neighbor_list_torch(
            torch.from_numpy(pos), torch.from_numpy(cell), torch.from_numpy(pbc), cutoff, max_neighbors
        )
        return sender.numpy(), receiver.numpy(), shifts.round().long().numpy()
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

_KEY_BITS = 21  # bits per axis of a bin key: three fields in a non-negative int64
_KEY_MAX = (1 << _KEY_BITS) - 1
_PACKED_LIMIT = 1 << 62  # sort keys (sender, receiver, shift code) below this fit an int64


def _complete_cell(cell: np.ndarray, pbc: list[bool]) -> np.ndarray:
    """The cell with the vectors of non-periodic directions replaced by orthonormal vectors.

    They are orthogonal to the periodic vectors (and to each other), so the fractional coordinate
    along such a direction is a Cartesian length in Å; nothing is ever shifted along them. A cell
    without periodic directions becomes the identity (a molecule: fractional = Cartesian).
    """
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


def _stable_argsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Lexicographic order, first key primary (successive stable sorts, last key first)."""
    order = torch.arange(keys[0].shape[0], device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def _bin_key(columns: list[torch.Tensor]) -> torch.Tensor:
    """One int64 per bin from three non-negative bin coordinates of at most ``_KEY_BITS`` bits."""
    return (columns[0] << (2 * _KEY_BITS)) | (columns[1] << _KEY_BITS) | columns[2]


def _cell_list(
    pos: torch.Tensor,
    cell: torch.Tensor,
    cell_host: np.ndarray,
    pbc: list[bool],
    cutoff: float,
    max_pairs_per_chunk: int,
    with_d2: bool = False,
    bins_per_cutoff: int = 1,
):
    """Pairs within ``cutoff`` by a cell list (the algorithm is described in neighbor_list_torch).

    Returns sender, receiver, unit_shifts (float, integer-valued) and, with ``with_d2``, the squared
    distances (else None), sorted by (sender, receiver, shift).
    """
    device, dtype = pos.device, pos.dtype
    n = pos.shape[0]
    p = int(bins_per_cutoff)

    # Geometry, on the host (before any work is queued on the device, so the uploads wait for nothing).
    # Bins at least ``width`` wide (Å, perpendicular to their faces) along each axis: ``counts[k]`` of
    # them across a periodic axis; along a non-periodic one (where the completed cell's vector is a unit
    # vector, so fractional coordinates are Å) an unbounded grid from the lowest atom, clamped to the
    # key range (merging the farthest bins costs candidates, never pairs). ``reach[k]`` bin offsets
    # either side cover the cutoff; along a periodic axis thinner than the cutoff it exceeds the number
    # of bins, and the offsets that wrap around the cell more than once are the further periodic images.
    full = _complete_cell(cell_host, pbc)
    inv_host = np.linalg.inv(full)
    heights = 1.0 / np.linalg.norm(inv_host, axis=0)  # perpendicular widths of the (completed) cell
    margin = 1e-6 if dtype == torch.float64 else 1e-4  # relative, against rounding of the coordinates
    width = cutoff * (1.0 + margin) / p
    counts, reach, bin_widths = [], [], []
    for k in range(3):
        if pbc[k]:
            counts.append(int(min(max(heights[k] // width, 1), _KEY_MAX - 2 * p)))
            reach.append(math.ceil(cutoff * (1.0 + 1e-9) * counts[k] / heights[k]))
            bin_widths.append(heights[k] / counts[k])
        else:
            counts.append(0)
            reach.append(p)
            bin_widths.append(width)
    bin_widths = np.array(bin_widths)
    # Distances to bins. A vector v with v . n_k = t_k along the unit normals n_k of the bin faces has
    # |v|^2 = t^T Q t with Q = (N N^T)^-1 (N: rows n_k), so |v|^2 >= lam |t|^2, lam = Q's least
    # eigenvalue (1 in an orthogonal cell): a bin whose gaps t_k to a point satisfy lam |t|^2 >= cutoff^2
    # holds no neighbour of it.
    normals = (inv_host / np.linalg.norm(inv_host, axis=0)).T
    lam = float(np.linalg.eigvalsh(np.linalg.inv(normals @ normals.T)).min())
    reach2 = (cutoff * (1.0 + margin)) ** 2 / lam
    # Half of the bin offsets, lexicographically >= 0: each unordered pair of atoms (and image) is
    # found once, from the atom whose offset to the other is positive, or, in the same bin, from the
    # first of the two; the other direction is its mirror (j, i, -S). Offsets whose bins are out of
    # reach from anywhere in a bin are dropped.
    offsets = np.array(list(itertools.product(*(range(-r, r + 1) for r in reach))))
    offsets = offsets[offsets.shape[0] // 2 :]  # offsets[0] = (0, 0, 0)
    offsets = offsets[((np.maximum(np.abs(offsets) - 1, 0) * bin_widths) ** 2).sum(axis=1) < reach2]
    m = offsets.shape[0]
    floats = torch.tensor(np.concatenate([inv_host.reshape(-1), bin_widths]), dtype=dtype).to(device)
    inv, gap_widths = floats[:9].view(3, 3), floats[9:]
    ints = torch.tensor(np.concatenate([offsets.reshape(-1), pbc]), dtype=torch.long).to(device)
    offsets, periodic = ints[: 3 * m].view(m, 3), ints[3 * m :].bool()

    # Wrap the periodic fractional coordinates into [0, 1); remember by how many cells (``wrap``).
    frac = rows_times_matrix(pos, inv)
    wrap = torch.where(periodic, torch.floor(frac), torch.zeros_like(frac))
    frac = frac - wrap
    wrapped = pos - rows_times_matrix(wrap, cell)
    # Bin coordinates, stored + p so that moved ones stay >= 0, and the place of each atom in its bin.
    columns, inside = [], []
    for k in range(3):
        if pbc[k]:
            scaled = frac[:, k] * counts[k]
            column = torch.floor(scaled).clamp_(0, counts[k] - 1)
        else:
            scaled = (frac[:, k] - frac[:, k].min()) / width
            column = torch.floor(scaled).clamp_(0, _KEY_MAX - 2 * p)
        inside.append(scaled - column)  # in bin widths; in [0, 1] but for clamped atoms
        columns.append(column.long() + p)
    # Atoms sorted by bin (ties by index); from here on atoms are numbered in that order.
    sorted_keys, atom_order = torch.sort(_bin_key(columns), stable=True)
    bins = torch.stack(columns, dim=1).index_select(0, atom_order)  # [N, 3]
    inside = torch.stack(inside, dim=1).index_select(0, atom_order)  # [N, 3]
    wrapped = wrapped.index_select(0, atom_order)
    coords = [wrapped[:, k].contiguous() for k in range(3)]

    def moved_bins(b: torch.Tensor, d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bin coordinate along k of bins ``b`` moved by offsets ``d`` (broadcast), and the cell shift."""
        moved = b + d
        if not pbc[k]:
            return moved, None
        shift = torch.div(moved - p, counts[k], rounding_mode="floor")
        return moved - shift * counts[k], shift

    keys = _bin_key([moved_bins(bins[:, k, None], offsets[None, :, k], k)[0] for k in range(3)])  # [N, M]
    first = torch.searchsorted(sorted_keys, keys)
    last = torch.searchsorted(sorted_keys, keys, right=True)
    first[:, 0] = torch.arange(1, n + 1, device=device)  # own bin: only the atoms after this one
    size = (last - first).clamp_(min=0)
    # Per atom, the bins out of its reach: gaps along each axis, from its place in its bin.
    d = offsets.to(dtype)[None, :, :]
    u = inside[:, None, :]
    gap = torch.maximum(torch.maximum(d - u, u - d - 1), torch.zeros((), dtype=dtype, device=device))
    gap2 = (gap * gap_widths).square_().sum(dim=2)
    size.masked_fill_(gap2 >= reach2, 0)
    per_atom = size.sum(dim=1).cumsum(0)

    # The shift of an edge i -> j is S = S' + wrap[i] - wrap[j], with S' the shift of the bin offset
    # (|S'_k| <= reach + 1) and |wrap[i] - wrap[j]| at most the spread of ``wrap``. It is coded as one
    # integer increasing with S lexicographically: digit S_k + bound_k in base 2 bound_k + 1 per axis.
    # Host sync: the number of candidate pairs and the spreads.
    spread = (wrap.amax(dim=0) - wrap.amin(dim=0)).long()
    total, *spread = torch.cat([per_atom[-1:], spread]).tolist()
    bound = [reach[k] + 1 + spread[k] if pbc[k] else 0 for k in range(3)]
    radix = [2 * b + 1 for b in bound]
    digit = [radix[1] * radix[2], radix[2], 1]
    weight = radix[0] * radix[1] * radix[2]
    if weight >= 1 << 62:  # shift codes must fit an int64
        raise ValueError(f"atoms are too far from the cell (up to {max(spread)} cells apart): wrap the positions")
    bound_t, digit_t = torch.tensor([bound, digit]).to(device)
    wrap_code = (wrap.long() * digit_t).sum(dim=1).index_select(0, atom_order)
    packed = n * n * weight < _PACKED_LIMIT  # (sender, receiver, code) as one int64

    # Chunks of consecutive atoms with about ``max_pairs_per_chunk`` candidates each.
    chunks = -(-total // max(1, int(max_pairs_per_chunk)))
    if chunks > 1:
        targets = torch.arange(1, chunks, device=device) * total // chunks
        bounds = torch.searchsorted(per_atom, targets, right=True).clamp_(1, n)  # atoms up to ~each target
        bounds = torch.unique(torch.cat([bounds, bounds.new_full((1,), n)]))
        sizes = per_atom[bounds - 1] - torch.cat([per_atom.new_zeros(1), per_atom[bounds[:-1] - 1]])
        ends, sizes = torch.stack([bounds, sizes]).tolist()
    else:
        ends, sizes = [n], [total]

    keys, parts, dist2 = [], [], []
    start = 0
    cutoff2 = cutoff * cutoff
    for stop, pairs in zip(ends, sizes):
        c = stop - start
        # Per (atom, offset): the cell shift S', the point the bin's atoms are measured from, and the
        # code of S' + wrap[atom].
        image = torch.zeros((c, m, 3), dtype=torch.long, device=device)
        for k in range(3):
            if pbc[k]:
                image[:, :, k] = moved_bins(bins[start:stop, k, None], offsets[None, :, k], k)[1]
        base = (wrapped[start:stop, None, :] - rows_times_matrix(image.to(dtype), cell)).reshape(-1, 3)
        image_code = ((image + bound_t) * digit_t).sum(dim=2).add_(wrap_code[start:stop, None]).reshape(-1)
        # Expand each (atom, offset) into the run of atoms of that bin; keep those within the cutoff.
        sz = size[start:stop].reshape(-1)
        segment = torch.repeat_interleave(torch.arange(c * m, device=device), sz, output_size=pairs)
        into = first[start:stop].reshape(-1) - (torch.cumsum(sz, 0) - sz)
        receiver = into.index_select(0, segment).add_(torch.arange(pairs, device=device))
        d2 = None
        for k in range(3):
            diff = coords[k].index_select(0, receiver).sub_(base[:, k].contiguous().index_select(0, segment))
            d2 = diff.mul_(diff) if d2 is None else d2.addcmul_(diff, diff)
        sel = (d2 < cutoff2).nonzero().squeeze(1)
        segment = segment.index_select(0, sel)
        receiver = receiver.index_select(0, sel)
        code = image_code.index_select(0, segment).sub_(wrap_code.index_select(0, receiver))
        sender = atom_order.index_select(0, torch.div(segment, m, rounding_mode="floor").add_(start))
        receiver = atom_order.index_select(0, receiver)
        # Both directions: the mirror of (i, j, S) is (j, i, -S), whose digits are radix - 1 - digit.
        if packed:
            keys += [(sender * n + receiver) * weight + code, (receiver * n + sender) * weight + (weight - 1 - code)]
        else:
            parts += [(sender, receiver, code), (receiver, sender, weight - 1 - code)]
        if with_d2:
            dist2 += [d2.index_select(0, sel)] * 2
        start = stop

    # Sort by (sender, receiver, shift), in the original numbering.
    if packed:
        key, order = torch.sort(torch.cat(keys))
        code = key.remainder(weight)
        pair = key.div_(weight, rounding_mode="floor")
        sender, receiver = pair.div(n, rounding_mode="floor"), pair.remainder_(n)
    else:
        sender, receiver, code = (torch.cat(x) for x in zip(*parts))
        order = _stable_argsort([sender, receiver, code])
        sender, receiver, code = (x.index_select(0, order) for x in (sender, receiver, code))
    shifts = [torch.div(code, digit[k], rounding_mode="floor").remainder_(radix[k]).sub_(bound[k]) for k in range(3)]
    d2 = torch.cat(dist2).index_select(0, order) if with_d2 else None
    return sender, receiver, torch.stack(shifts, dim=1).to(dtype), d2


@torch.no_grad()
def _brute_force(positions: torch.Tensor, cell, pbc, cutoff: float, max_pairs_per_chunk: int = 1 << 22):
    """Reference O(N^2 x images) search: every pair and every image that can reach the cutoff.

    The previous implementation of :func:`neighbor_list_torch` (same arguments and results, without
    ``max_neighbors``), kept to test the cell list against; slow beyond a few hundred atoms.
    """
    pos = positions.detach().reshape(-1, 3)
    device, dtype = pos.device, pos.dtype
    n = pos.shape[0]
    cell = torch.as_tensor(cell, dtype=dtype, device=device).reshape(3, 3)
    pbc = _as_pbc(torch.as_tensor(pbc).cpu().numpy() if torch.is_tensor(pbc) else pbc).tolist()
    cell_host = cell.double().cpu().numpy()
    if any(pbc):
        _check_cell(cell_host, np.array(pbc))
    inv_host = np.linalg.inv(_complete_cell(cell_host, pbc))
    inv = torch.tensor(inv_host, dtype=dtype, device=device)
    frac = rows_times_matrix(pos, inv)
    wrap = torch.where(torch.tensor(pbc, device=device), torch.floor(frac), torch.zeros_like(frac))
    wrapped = pos - rows_times_matrix(wrap, cell)
    # Wrapped fractional differences along k lie in (-1, 1) and a vector no longer than the cutoff
    # has |fractional component k| <= cutoff * |reciprocal vector k|, so |S_k| <= ceil(that).
    recip = np.linalg.norm(inv_host, axis=0)
    ranges = [range(-(r := math.ceil(cutoff * recip[k])), r + 1) if pbc[k] else range(1) for k in range(3)]
    shifts = torch.tensor(list(itertools.product(*ranges)), dtype=dtype, device=device)
    shift_vectors = rows_times_matrix(shifts, cell)
    zero_shift = (shifts == 0).all(dim=1)
    m = shifts.shape[0]
    chunk = max(1, max_pairs_per_chunk // max(1, n * m))
    all_j = torch.arange(n, device=device)
    senders, receivers, images = [], [], []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        vec = wrapped[None, :, None, :] - wrapped[start:stop, None, None, :] + shift_vectors[None, None, :, :]
        close = (vec * vec).sum(dim=-1) < cutoff * cutoff  # [chunk, N, M]
        close &= ~((torch.arange(start, stop, device=device)[:, None] == all_j[None, :])[:, :, None] & zero_shift)
        ii, jj, mm = close.nonzero(as_tuple=True)
        senders.append(ii + start)
        receivers.append(jj)
        images.append(mm)
    sender = torch.cat(senders)
    receiver = torch.cat(receivers)
    unit_shifts = shifts[torch.cat(images)] + wrap[sender] - wrap[receiver]
    order = _stable_argsort([sender, receiver, unit_shifts[:, 0], unit_shifts[:, 1], unit_shifts[:, 2]])
    return sender[order], receiver[order], unit_shifts[order]


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

    A cell list, linear in the number of atoms and vectorised (the only Python loops are over the
    three axes and over chunks of candidate pairs, not over atoms, bins or bin offsets):

    1. fractional coordinates in the cell, with the vectors of non-periodic directions replaced by
       orthonormal ones (so a molecule, even with a zero cell, is binned in Cartesian space from its
       lowest atom: a bounding box); periodic coordinates are wrapped into [0, 1);
    2. bins at least ``cutoff`` wide perpendicular to their faces (skewed cells too); along a
       periodic axis thinner than the cutoff, one bin and as many bin offsets either side as the
       cutoff needs (from the perpendicular width): offsets that wrap around the cell are the
       periodic images, so an atom meets its own images and a pair all of its images, each once;
    3. atoms sorted by an int64 bin key; for every atom and every bin offset in one half-space
       (14 of 27 when the cell is at least one cutoff wide), two ``searchsorted`` give the run of
       atoms in that bin; bins out of the atom's reach are skipped (a lower bound on the distance from
       the atom to the bin); runs are expanded into candidate pairs (``repeat_interleave``), at most
       ``max_pairs_per_chunk`` at a time, and filtered by distance; every pair found gives both edges
       (i, j, S) and (j, i, -S), so the list is exactly symmetric;
    4. one sort of an int64 key (sender, receiver, shift), from which the outputs are decoded.

    Host synchronisation: the cell and pbc (bin counts and offsets depend on them), the number of
    candidate pairs (chunk sizes) and, per chunk, the number of edges kept.

    Args:
        positions: [N,3] Å tensor (its device and dtype are used throughout).
        cell: [3,3] or [1,3,3] Å (ignored along non-periodic directions; may be zero for a molecule).
        pbc: bool, [3] or [1,3] bools.
        cutoff: Å.
        max_neighbors: as in :func:`neighbor_list`.
        max_pairs_per_chunk: bound on the candidate pairs held in memory at once (chunks hold whole
            atoms, so one atom of a tiny cell with a large cutoff may exceed it).

    Returns:
        sender [E] long, receiver [E] long, unit_shifts [E,3] in ``positions.dtype`` (integer-valued),
        sorted by (sender, receiver, shift).
    """
    pos = positions.detach().reshape(-1, 3)
    device, dtype = pos.device, pos.dtype
    n = pos.shape[0]
    cell = torch.as_tensor(cell, dtype=dtype, device=device).reshape(3, 3)
    if torch.is_tensor(pbc) and pbc.device == device:  # one copy to the host for both
        host = torch.cat([cell.detach().reshape(-1), pbc.reshape(-1).to(dtype)]).double().cpu().numpy()
        cell_host, pbc_list = host[:9].reshape(3, 3), _as_pbc(host[9:] != 0).tolist()
    else:
        cell_host = cell.detach().double().cpu().numpy()
        pbc_list = _as_pbc(torch.as_tensor(pbc).cpu().numpy() if torch.is_tensor(pbc) else pbc).tolist()
    cutoff = float(cutoff)
    if any(pbc_list):
        _check_cell(cell_host, np.array(pbc_list))
    if n == 0 or cutoff <= 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone(), torch.zeros((0, 3), dtype=dtype, device=device)

    sender, receiver, unit_shifts, d2 = _cell_list(
        pos, cell, cell_host, pbc_list, cutoff, max_pairs_per_chunk, with_d2=max_neighbors is not None
    )
    if max_neighbors is not None:
        order = _stable_argsort([receiver, d2])  # ties keep the (sender, shift) order
        recv_sorted = receiver[order]
        _, counts = torch.unique_consecutive(recv_sorted, return_counts=True)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rank = torch.arange(order.shape[0], device=device) - starts
        keep = torch.sort(order[rank < int(max_neighbors)]).values
        sender, receiver, unit_shifts = sender[keep], receiver[keep], unit_shifts[keep]
    return sender, receiver, unit_shifts
