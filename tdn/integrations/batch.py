"""Many structures in ONE model call: the path :class:`tdn.integrations.torchsim.TDNTorchSimModel` and
:meth:`tdn.TDNCalculator.calculate_batch` share (plain torch: torch-sim is not needed here).

S structures ("systems", N atoms in all) become one graph: each structure's neighbour list is built on its own
(vesin: :func:`tdn.data.neighbors.neighbor_list` on the host, or on the model's device) and the
lists are concatenated with atom offsets, so that every edge stays inside its structure. One model call then gives
``energy [S]``, ``node_energy [N]``, ``forces [N, 3]`` and ``stress [S, 3, 3]``.

Conventions (as :mod:`tdn.runtime` and docs/CONTRACTS.md):

* the atoms of structure ``s`` are the rows ``ptr[s]:ptr[s + 1]``, in order (``system_idx`` sorted);
* ``cell [S, 3, 3]``: ROWS are the cell vectors (ASE), kept in float64 for the shift vectors; the cell of a
  structure without any periodic direction is zeroed (a molecule's dummy box cannot leak into the model);
* ``pbc [S, 3]`` bool, one row per structure: periodic crystals, slabs and molecules mix freely;
* edge vector ``pos[j] - pos[i] + unit_shifts @ cell`` (sender ``i = edge_index[0]``, receiver ``j``), the shift
  vectors computed in float64 without a matmul (:func:`tdn.runtime.shift_vectors`);
* stress in eV/Å^3, ASE sign (``(1/V) dE/d(strain)``); zero for a structure that is not periodic in all three
  directions (its volume is not defined).

Input the model cannot evaluate is refused before it runs, with the structure's index: an empty structure, a
non-finite position, an element the model does not know, an unusable periodic cell, positions whose dtype is not
the model's; atoms closer than :data:`tdn.runtime.MIN_DISTANCE` raise :class:`tdn.runtime.AtomsTooCloseError`
naming the structure and the pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.stress import full_3x3_to_voigt_6_stress
from torch import nn

from ..data import neighbors
from ..data.atoms import cell_problem
from ..runtime import (
    MIN_DISTANCE,
    NEIGHBOR_LISTS,
    GeometryError,
    check_elements,
    closest_pair_error,
    pair_distances_squared,
    pairs_within,
    shift_vectors,
    validate_atoms,
)

__all__ = ["Graph", "SkinNeighbors", "Systems", "build_graph", "check_structures", "evaluate", "evaluate_structures",
           "systems_from_atoms", "systems_from_tensors"]  # fmt: skip

CELL_TOL = 1e-8  # Å (Å^3 for volumes), the tolerance of tdn.data.atoms.cell_problem


@dataclass
class Systems:
    """S structures as tensors on the model's device; see the module docstring for the conventions."""

    positions: torch.Tensor  # [N, 3] model dtype
    atomic_numbers: torch.Tensor  # [N] long
    cell: torch.Tensor  # [S, 3, 3] float64, rows are the cell vectors, zero without any periodic direction
    pbc: torch.Tensor  # [S, 3] bool
    system_idx: torch.Tensor  # [N] long, sorted
    counts: list[int]  # [S] atoms per structure (host)
    host_positions: np.ndarray  # [N, 3] float64 copy (the checks and the host neighbour list read it)
    host_cell: np.ndarray  # [S, 3, 3] float64
    host_pbc: np.ndarray  # [S, 3] bool

    @property
    def num_systems(self) -> int:
        return len(self.counts)

    @property
    def ptr(self) -> list[int]:
        """``[S + 1]`` first atom of every structure, then N."""
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(int).tolist()


@dataclass
class Graph:
    """The candidate pairs of all structures, atom indices global (offsets added)."""

    edge_index: torch.Tensor  # [2, E] sender, receiver
    unit_shifts: torch.Tensor  # [E, 3] integer-valued, model dtype
    edge_system: torch.Tensor  # [E] structure of every edge
    shift_vectors: torch.Tensor  # [E, 3] unit_shifts @ cell in Å, model dtype (computed in float64)

    def select(self, keep: torch.Tensor) -> Graph:
        """The edges ``keep [E']`` (indices)."""
        return Graph(self.edge_index.index_select(1, keep), self.unit_shifts[keep], self.edge_system[keep],
                     self.shift_vectors[keep])  # fmt: skip


# ------------------------------------------------------------------------------------------------ input
def check_structures(structures: Sequence[Atoms], elements: Sequence[int], first: int = 0) -> None:
    """:func:`tdn.runtime.validate_atoms` for every structure; the error keeps its type and gets the prefix
    ``"structure k: "`` (``k`` counted from ``first``)."""
    for k, atoms in enumerate(structures):
        try:
            validate_atoms(atoms, elements)
        except (ValueError, KeyError) as err:
            raise type(err)(f"structure {first + k}: {err}") from None


def systems_from_atoms(structures: Sequence[Atoms], device: torch.device, dtype: torch.dtype) -> Systems:
    """ASE structures (checked with :func:`check_structures` first) as :class:`Systems`."""
    counts = [len(atoms) for atoms in structures]
    host_positions = np.concatenate([np.asarray(a.positions, dtype=np.float64) for a in structures]).reshape(-1, 3)
    host_pbc = np.stack([np.asarray(a.pbc, dtype=bool) for a in structures]).reshape(-1, 3)
    host_cell = np.stack([np.asarray(a.cell, dtype=np.float64) for a in structures]).reshape(-1, 3, 3)
    host_cell[~host_pbc.any(axis=1)] = 0.0
    numbers = np.concatenate([a.numbers for a in structures])
    return Systems(
        positions=torch.from_numpy(host_positions).to(device=device, dtype=dtype),
        atomic_numbers=torch.as_tensor(numbers, dtype=torch.long, device=device),
        cell=torch.from_numpy(host_cell).to(device),
        pbc=torch.from_numpy(host_pbc).to(device),
        system_idx=torch.repeat_interleave(torch.arange(len(counts), device=device),
                                           torch.as_tensor(counts, device=device)),  # fmt: skip
        counts=counts,
        host_positions=host_positions,
        host_cell=host_cell,
        host_pbc=host_pbc,
    )


def systems_from_tensors(
    positions: torch.Tensor,  # [N, 3]
    cell: torch.Tensor,  # [S, 3, 3] rows are the cell vectors
    pbc: torch.Tensor,  # [S, 3] bool
    atomic_numbers: torch.Tensor,  # [N]
    system_idx: torch.Tensor,  # [N]
    elements: Sequence[int],
    dtype: torch.dtype,
) -> Systems:
    """Checked :class:`Systems` from tensors (a torch-sim state). One host copy of the positions, cell, pbc, atomic
    numbers and structure indices; any problem is a ValueError (UnknownElementError for an element, a
    :class:`tdn.runtime.GeometryError` for a non-finite position) naming the structure, and the atom counted
    within it."""
    if positions.dtype != dtype:
        raise ValueError(f"positions are {_name(positions.dtype)} but the model runs in {_name(dtype)}: build the "
                         f"state in the model's dtype (model.dtype)")  # fmt: skip
    if cell.dtype != positions.dtype:
        raise ValueError(f"mixed dtypes: positions are {_name(positions.dtype)} but the cell is {_name(cell.dtype)}")
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must be [N, 3], got {list(positions.shape)}")
    n, s = positions.shape[0], cell.shape[0]
    if s == 0:
        raise ValueError("no structure to evaluate (the cell has no rows)")
    if cell.shape != (s, 3, 3) or pbc.shape != (s, 3):
        raise ValueError(f"cell must be [S, 3, 3] and pbc [S, 3], got {list(cell.shape)} and {list(pbc.shape)}")
    if atomic_numbers.shape != (n,) or system_idx.shape != (n,):
        raise ValueError(f"atomic_numbers and system_idx must be [N] = [{n}], got {list(atomic_numbers.shape)} and "
                         f"{list(system_idx.shape)}")  # fmt: skip
    system_idx = system_idx.long()
    host_positions = positions.detach().double().cpu().numpy()
    host_cell = cell.detach().double().cpu().numpy().copy()
    host_pbc = pbc.detach().bool().cpu().numpy()
    host_index = system_idx.cpu().numpy()
    numbers = atomic_numbers.long()
    if n and (np.diff(host_index) < 0).any():
        raise ValueError("system_idx must be sorted: the atoms of each structure contiguous, structures in order")
    if n and (host_index[0] < 0 or host_index[-1] >= s):
        raise ValueError(f"system_idx must lie in 0..{s - 1} (one cell per structure), got {host_index.min()}.."
                         f"{host_index.max()}")  # fmt: skip
    counts = np.bincount(host_index, minlength=s).tolist() if n else [0] * s
    for k, count in enumerate(counts):
        if count == 0:
            raise ValueError(f"structure {k} is empty (no atom has system_idx {k}): nothing to evaluate")
    ptr = np.concatenate([[0], np.cumsum(counts)])
    _check_finite(host_positions, ptr)
    host_numbers = numbers.cpu().numpy()
    known = np.isin(host_numbers, np.asarray(elements))
    if not known.all():
        k = int(np.searchsorted(ptr, int(np.flatnonzero(~known)[0]), side="right") - 1)
        try:
            check_elements(host_numbers[ptr[k] : ptr[k + 1]], elements)
        except KeyError as err:
            raise type(err)(f"structure {k}: {err}") from None
    _check_cells(host_cell, host_pbc)
    host_cell[~host_pbc.any(axis=1)] = 0.0
    return Systems(
        positions=positions,
        atomic_numbers=numbers,
        cell=torch.from_numpy(host_cell).to(positions.device),
        pbc=torch.from_numpy(host_pbc).to(positions.device),
        system_idx=system_idx,
        counts=counts,
        host_positions=host_positions,
        host_cell=host_cell,
        host_pbc=host_pbc,
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_finite(host_positions: np.ndarray, ptr: np.ndarray) -> None:
    finite = np.isfinite(host_positions).all(axis=1)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        k = int(np.searchsorted(ptr, first, side="right") - 1)
        bad = np.flatnonzero(~finite[ptr[k] : ptr[k + 1]])
        raise GeometryError(f"structure {k}: non-finite position of atom {bad[0]}: {host_positions[first].tolist()}"
                            + (f" (and {len(bad) - 1} more atoms of it)" if len(bad) > 1 else ""))  # fmt: skip


def _check_cells(cell: np.ndarray, pbc: np.ndarray) -> None:
    """:func:`tdn.data.atoms.cell_problem` for every structure it could apply to (a vectorised pre-check of the
    same rule finds them)."""
    lengths = np.linalg.norm(cell, axis=2)  # [S, 3]
    bad_vector = pbc & ~(np.isfinite(cell).all(axis=2) & (lengths >= CELL_TOL))
    with np.errstate(invalid="ignore"):
        flat = pbc.all(axis=1) & ~(np.abs(np.linalg.det(np.nan_to_num(cell))) >= CELL_TOL)
    for k in np.flatnonzero(bad_vector.any(axis=1) | flat):
        problem = cell_problem(cell[k], pbc[k])
        if problem:
            raise ValueError(f"structure {k}: {problem}: set a cell or turn periodicity off")


# ------------------------------------------------------------------------------------------------ graph
def build_graph(systems: Systems, cutoff: float, method: str = "auto") -> Graph:
    """Every structure's pairs within ``cutoff``, concatenated with atom offsets.

    ``method``: ``"vesin"`` vesin on the host (:func:`tdn.data.neighbors.neighbor_list`, one upload of all edges),
    ``"torch"`` vesin on the positions' device (:func:`tdn.data.neighbors.neighbor_list_torch`), ``"auto"`` torch
    on an accelerator, vesin on the CPU (as :func:`tdn.runtime.neighbor_list`); the same edges either way."""
    method = _list_method(method, systems.positions.device)
    return _assemble(systems, [_system_pairs(systems, k, cutoff, method) for k in range(systems.num_systems)], method)


def _list_method(method: str, device: torch.device) -> str:
    if method not in NEIGHBOR_LISTS:
        raise ValueError(f"neighbor_list must be one of {NEIGHBOR_LISTS}, got {method!r}")
    return ("vesin" if device.type == "cpu" else "torch") if method == "auto" else method


def _system_pairs(systems: Systems, k: int, cutoff: float, method: str) -> tuple:
    """``(i, j, unit_shifts)`` of structure ``k``, atom indices within it: numpy arrays ("vesin") or tensors."""
    a, b = systems.ptr[k], systems.ptr[k + 1]
    if method == "vesin":
        return neighbors.neighbor_list(systems.host_positions[a:b], systems.host_cell[k], systems.host_pbc[k], cutoff)
    return neighbors.neighbor_list_torch(systems.positions[a:b].detach(), systems.cell[k], systems.pbc[k], cutoff)


def _assemble(systems: Systems, pairs: Sequence[tuple], method: str) -> Graph:
    """The structures' pairs (:func:`_system_pairs`) as one :class:`Graph`: atom offsets added, shift vectors."""
    device, dtype = systems.positions.device, systems.positions.dtype
    offsets = systems.ptr[:-1]
    counts = [len(i) for i, _, _ in pairs]
    if method == "vesin":
        edge_index = torch.from_numpy(np.stack([np.concatenate([i + a for (i, _, _), a in zip(pairs, offsets)]),
                                                np.concatenate([j + a for (_, j, _), a in zip(pairs, offsets)])]))
        edge_index = edge_index.to(device)
        unit_shifts = torch.from_numpy(np.concatenate([s for _, _, s in pairs]).astype(np.float64)).to(device)
    else:
        edge_index = torch.stack([torch.cat([i + a for (i, _, _), a in zip(pairs, offsets)]),
                                  torch.cat([j + a for (_, j, _), a in zip(pairs, offsets)])])  # fmt: skip
        unit_shifts = torch.cat([s for _, _, s in pairs]).to(torch.float64)
    edge_system = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                          torch.as_tensor(counts, device=device))  # fmt: skip
    vectors = shift_vectors(unit_shifts, systems.cell.index_select(0, edge_system), dtype)  # [E, 3]
    return Graph(edge_index, unit_shifts.to(dtype), edge_system, vectors)


class SkinNeighbors:
    """:func:`build_graph` at ``cutoff + skin``, reused from call to call (an MD or relaxation step): the rule of
    :class:`tdn.TDNCalculator`, per structure of a batch. A structure's pairs are rebuilt once one of its atoms has
    moved more than ``skin / 2``; all are rebuilt when the structures changed (their number, atoms, atomic numbers,
    cells or pbc). On the CPU the candidates within the cutoff are selected at every call
    (:func:`tdn.runtime.pairs_within`), elsewhere they all go to the model (pairs beyond the cutoff contribute
    exactly zero). ``skin = 0`` builds the exact list at every call. ``builds`` counts the calls that rebuilt
    something, ``system_builds`` the structures rebuilt.
    """

    def __init__(self, cutoff: float, skin: float = 0.5, method: str = "auto") -> None:
        if not skin >= 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        _list_method(method, torch.device("cpu"))
        self.cutoff, self.skin, self.method = float(cutoff), float(skin), method
        self.builds = self.system_builds = 0
        self._built: tuple | None = None  # copies of what the builds saw (the caller may change its tensors)
        self._pairs: list[tuple] = []  # per structure, see _system_pairs
        self._graph: Graph | None = None

    def __call__(self, systems: Systems) -> Graph:
        if self.skin == 0:
            self.builds, self.system_builds = self.builds + 1, self.system_builds + systems.num_systems
            return build_graph(systems, self.cutoff, self.method)
        stale = self._stale(systems)
        if stale:
            method = _list_method(self.method, systems.positions.device)
            if len(stale) == systems.num_systems:
                self._pairs = [None] * systems.num_systems
                self._built = (list(systems.counts), systems.host_positions.copy(), systems.host_cell.copy(),
                               systems.host_pbc.copy(), systems.atomic_numbers.clone())  # fmt: skip
            ptr, reference = systems.ptr, self._built[1]
            for k in stale:
                self._pairs[k] = _system_pairs(systems, k, self.cutoff + self.skin, method)
                reference[ptr[k]:ptr[k + 1]] = systems.host_positions[ptr[k]:ptr[k + 1]]
            self._graph = _assemble(systems, self._pairs, method)
            self.builds, self.system_builds = self.builds + 1, self.system_builds + len(stale)
        graph = self._graph
        if systems.positions.device.type != "cpu":
            return graph
        return graph.select(pairs_within(systems.positions.detach(), graph.edge_index, graph.shift_vectors,
                                         self.cutoff))  # fmt: skip

    def _stale(self, systems: Systems) -> list[int]:
        """The structures whose pairs must be rebuilt: all of them if the structures changed."""
        everything = list(range(systems.num_systems))
        if self._built is None:
            return everything
        counts, positions, cell, pbc, numbers = self._built
        if (counts != systems.counts or not np.array_equal(cell, systems.host_cell)
                or not np.array_equal(pbc, systems.host_pbc) or not torch.equal(numbers, systems.atomic_numbers)):
            return everything
        moved = systems.host_positions - positions
        squared = np.einsum("ij,ij->i", moved, moved)  # [N]
        farthest = np.maximum.reduceat(squared, systems.ptr[:-1])  # [S]: every structure has atoms
        return np.flatnonzero(farthest > (0.5 * self.skin) ** 2).tolist()


# ------------------------------------------------------------------------------------------------ model
# On a CPU a graph of 64 x 500 Cu atoms (1.4M edges) evaluates 20 % slower per structure than the same structures
# in groups of ~4,000 atoms, whose edge tensors stay closer to the caches (and 13 % faster than one structure at a
# time); an accelerator wants the whole graph. docs/benchmarks/NOTES.md, batched evaluation.
CPU_GROUP_ATOMS = 4096


def evaluate(model: nn.Module, systems: Systems, graph: Graph, *, compute_forces: bool = True,
             compute_stress: bool = False, first: int = 0,
             group_atoms: int | None = None) -> dict[str, torch.Tensor | None]:  # fmt: skip
    """All structures of one graph: ``energy [S]``, ``node_energy [N]``, ``forces [N, 3]`` (or None),
    ``stress [S, 3, 3]`` (or None; zero where not periodic in all three directions), detached, in the model's
    dtype and on its device. Atoms closer than :data:`MIN_DISTANCE` raise AtomsTooCloseError naming the structure
    (counted from ``first``) and the pair: one host read of the shortest pair distance per structure.

    One model call on an accelerator; on a CPU one per group of consecutive structures of at most ``group_atoms``
    atoms (default :data:`CPU_GROUP_ATOMS`; a larger structure alone), the same numbers."""
    limit = group_atoms if group_atoms is not None else (CPU_GROUP_ATOMS if systems.positions.is_cpu else None)
    groups = _groups(systems.counts, limit)
    if len(groups) == 1:
        return _evaluate_graph(model, systems, graph, compute_forces, compute_stress, first)
    ptr, edge_ptr = systems.ptr, _edge_ptr(graph, systems.num_systems)
    parts = [_evaluate_graph(model, *_subset(systems, graph, a, b, ptr, edge_ptr), compute_forces, compute_stress,
                             first + a) for a, b in groups]  # fmt: skip
    return {key: None if parts[0][key] is None else torch.cat([part[key] for part in parts]) for key in parts[0]}


def _groups(counts: Sequence[int], limit: int | None) -> list[tuple[int, int]]:
    """Consecutive structures ``[a, b)`` of at most ``limit`` atoms together (a larger one alone)."""
    if limit is None:
        return [(0, len(counts))]
    groups, start, atoms = [], 0, 0
    for k, count in enumerate(counts):
        if k > start and atoms + count > limit:
            groups.append((start, k))
            start, atoms = k, 0
        atoms += count
    groups.append((start, len(counts)))
    return groups


def _edge_ptr(graph: Graph, num_systems: int) -> list[int]:
    """``[S + 1]`` first edge of every structure (the edges are grouped by structure, in order), then E."""
    counts = torch.bincount(graph.edge_system, minlength=num_systems).tolist()
    return np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()


def _subset(systems: Systems, graph: Graph, a: int, b: int, ptr: list[int], edge_ptr: list[int]) -> tuple:
    """Structures ``[a, b)`` as their own :class:`Systems` and :class:`Graph` (atom and structure indices from 0)."""
    atoms, edges = slice(ptr[a], ptr[b]), slice(edge_ptr[a], edge_ptr[b])
    part = Systems(systems.positions[atoms], systems.atomic_numbers[atoms], systems.cell[a:b], systems.pbc[a:b],
                   systems.system_idx[atoms] - a, systems.counts[a:b], systems.host_positions[atoms],
                   systems.host_cell[a:b], systems.host_pbc[a:b])  # fmt: skip
    sub = Graph(graph.edge_index[:, edges] - ptr[a], graph.unit_shifts[edges], graph.edge_system[edges] - a,
                graph.shift_vectors[edges])  # fmt: skip
    return part, sub


def _evaluate_graph(model: nn.Module, systems: Systems, graph: Graph, compute_forces: bool, compute_stress: bool,
                    first: int) -> dict[str, torch.Tensor | None]:  # fmt: skip
    """:func:`evaluate` in one model call."""
    pos, s = systems.positions, systems.num_systems
    element_index = model.element_index(systems.atomic_numbers)  # [N]
    if compute_stress:
        batch = SimpleNamespace(pos=pos, atomic_numbers=systems.atomic_numbers, edge_index=graph.edge_index,
                                unit_shifts=graph.unit_shifts, cell=systems.cell.to(pos.dtype),
                                batch=systems.system_idx, num_graphs=s)  # fmt: skip
        out = model(batch, compute_forces=compute_forces, compute_stress=True, training=False)
        periodic = systems.pbc.all(dim=1).view(s, 1, 1)
        stress = torch.where(periodic, out["stress"], torch.zeros_like(out["stress"]))
        result = {"energy": out["energy"], "node_energy": out["node_energy"], "forces": out["forces"],
                  "stress": stress}  # fmt: skip
    else:
        result = _energy_and_forces(model, pos, element_index, graph, systems.system_idx, s, compute_forces)
    with torch.no_grad():
        d2 = pair_distances_squared(pos.detach(), graph.edge_index, graph.shift_vectors)  # [E]
        closest = d2.new_full((s,), torch.inf).scatter_reduce(0, graph.edge_system, d2, "amin")  # [S]
    too_close = torch.nonzero(closest < MIN_DISTANCE**2).flatten().tolist()
    if too_close:
        k = too_close[0]
        d2 = torch.where(graph.edge_system == k, d2, torch.inf)
        raise closest_pair_error(d2, graph.edge_index, graph.unit_shifts, systems.ptr[k], structure=first + k)
    return result


def _energy_and_forces(model: nn.Module, pos: torch.Tensor, element_index: torch.Tensor, graph: Graph,
                       system_idx: torch.Tensor, num_systems: int,
                       compute_forces: bool) -> dict[str, torch.Tensor | None]:  # fmt: skip
    """The model's energy network directly, with the exact shift vectors (no strain, no stress)."""
    if not compute_forces:
        with torch.no_grad():
            node_energy = model.node_energies(pos, element_index, graph.edge_index, graph.shift_vectors)  # [N]
        energy = node_energy.new_zeros(num_systems).index_add_(0, system_idx, node_energy)  # [S]
        return {"energy": energy, "node_energy": node_energy, "forces": None, "stress": None}
    pos = pos.detach().requires_grad_(True)
    with torch.enable_grad():
        node_energy = model.node_energies(pos, element_index, graph.edge_index, graph.shift_vectors)  # [N]
        grad = None
        if node_energy.requires_grad:  # False only without any edge
            (grad,) = torch.autograd.grad(node_energy.sum(), pos, allow_unused=True)
    node_energy = node_energy.detach()
    energy = node_energy.new_zeros(num_systems).index_add_(0, system_idx, node_energy)  # [S]
    forces = torch.zeros_like(pos) if grad is None else grad.neg()  # [N, 3]
    return {"energy": energy, "node_energy": node_energy, "forces": forces.detach(), "stress": None}


# ------------------------------------------------------------------------------------------------ ASE batches
def evaluate_structures(model: nn.Module, structures: Sequence[Atoms], properties: Sequence[str] = ("energy", "forces"),
                        batch_size: int = 16, neighbor_list: str = "auto") -> list[dict[str, Any]]:  # fmt: skip
    """ASE structures, ``batch_size`` per model call; one dict per structure with ``energy``, ``free_energy``,
    ``energies``, ``forces`` and, when ``"stress"`` is in ``properties`` and the structure is fully periodic,
    ``stress`` (Voigt, ASE sign). Everything is checked before the model runs; each call brings its results to
    the host in one transfer. ``model``: a prepared model (:func:`tdn.runtime.prepare_model`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    structures = list(structures)
    elements = list(model.config.elements)
    check_structures(structures, elements)
    cutoff = float(model.config.cutoff)
    tensor = next(iter(model.buffers()))
    device, dtype = tensor.device, model.dtype
    want_stress = "stress" in properties
    results: list[dict[str, Any]] = []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        systems = systems_from_atoms(chunk, device, dtype)
        graph = build_graph(systems, cutoff, neighbor_list)
        stress = want_stress and bool(systems.host_pbc.all(axis=1).any())
        out = evaluate(model, systems, graph, compute_stress=stress, first=start)
        host = _to_host(out, ("energy", "node_energy", "forces") + (("stress",) if stress else ()))
        ptr = systems.ptr
        for b, atoms in enumerate(chunk):
            energy = float(host["energy"][b])
            result: dict[str, Any] = {
                "energy": energy,
                "free_energy": energy,
                "energies": host["node_energy"][ptr[b] : ptr[b + 1]].copy(),
                "forces": host["forces"][ptr[b] : ptr[b + 1]].copy(),
            }
            if stress and atoms.pbc.all():
                result["stress"] = full_3x3_to_voigt_6_stress(host["stress"][b])
            results.append(result)
    return results


def _to_host(out: dict[str, torch.Tensor | None], names: Sequence[str]) -> dict[str, np.ndarray]:
    """``out[name]`` for every name as float64 numpy arrays, in ONE device-to-host transfer."""
    parts = [out[name] for name in names]
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in parts])
    host = flat.cpu().numpy()
    arrays, offset = {}, 0
    for name, tensor in zip(names, parts):
        arrays[name] = host[offset : offset + tensor.numel()].reshape(tensor.shape)
        offset += tensor.numel()
    return arrays
