"""ASE calculator for tdn models: energy, free_energy, energies, forces, stress.

An MD step is designed not to be dominated by Python and host-side work, and to make the host wait for the device
only once:

* the neighbour list is built with a skin (``cutoff + skin``), on the model's device (see ``neighbor_list``), and
  reused until some atom has moved more than ``skin / 2`` (or the cell, the atomic numbers or pbc changed), which
  is measured on the host from the positions ASE hands over (no device work);
* between rebuilds the model gets ALL the candidate pairs, the same ``edge_index`` tensor at every step (as
  :class:`tdn.dynamics.TorchDynamics`): the radial envelope is exactly zero at ``r >= cutoff`` and the radial MLP
  maps 0 to 0, so pairs beyond the cutoff contribute exactly nothing. No per-step ``nonzero`` selection, and what
  is derived from ``edge_index`` (the fused convolution's edge sort, :func:`tdn._cache.cached_on`) is reused;
* what does not change between steps (atomic numbers, cell, pbc, shift vectors) is cached on the device; a step
  copies the positions there (non-blocking, through pinned memory on CUDA) and brings the results back in ONE
  transfer: energy, per-atom energies, forces, stress and the shortest pair distance, packed into one buffer;
* that distance (candidate pairs, periodic images included) guards against atoms on top of each other, which give
  NaN energies and forces: closer than :data:`MIN_DISTANCE` raises :class:`AtomsTooCloseError` naming the pair;
* shift vectors are computed without matmuls (:func:`tdn.data.neighbors.rows_times_matrix`): exact whatever
  ``torch.set_float32_matmul_precision`` says; the model's parameters are frozen (autograd follows the positions).

Usage, as with MACE's calculator::

    from tdn import TDNCalculator
    atoms.calc = TDNCalculator("model.pt", device="cuda", default_dtype="float32")
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    results = atoms.calc.calculate_batch(list_of_atoms)        # screening: one model call per chunk
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress
from torch import nn
from torch_geometric.data import Batch, Data

from .runtime import (
    MIN_DISTANCE,
    NEIGHBOR_LISTS,
    check_positions,
    closest_pair_error,
    compile_energy,
    model_dtype,
    neighbor_list,
    pair_distances_squared,
    prepare_model,
    shift_vectors,
    validate_atoms,
)


@dataclass
class _System:
    """The parts of the input that stay fixed between MD steps, as device tensors."""

    numbers: np.ndarray
    pbc: np.ndarray
    cell: np.ndarray
    graph: Data  # atomic_numbers, cell, pbc, batch, ptr, natoms; pos and edges are set per call
    element_index: torch.Tensor  # [N], the model's element rows


@dataclass
class _Neighbors:
    """Candidate pairs within ``cutoff + skin`` of the positions ``reference``."""

    reference: np.ndarray  # [N, 3] float64, host: the displacement check needs no device work
    edge_index: torch.Tensor  # [2, E]
    unit_shifts: torch.Tensor  # [E, 3]
    shift_vectors: torch.Tensor  # [E, 3] unit_shifts @ cell, Å, model dtype


class TDNCalculator(Calculator):
    """ASE calculator for a tdn model file (``tdn.save_model``) or a model object.

    Args:
        model_path: path of an exported model, or a :class:`tdn.models.TDNModel` (used in place: put in eval
            mode, its parameters frozen, moved to ``device`` / ``default_dtype``).
        device: torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        default_dtype: ``"float32"`` (fast) or ``"float64"`` (for force/stress tests, phonons, tight relaxations).
        compile: ``torch.compile`` the model's energy function (experimental; falls back with a warning).
        skin: neighbour-list skin in Å; the list is rebuilt once an atom has moved more than ``skin / 2``.
            ``0`` rebuilds at every new geometry.
        neighbor_list: ``"auto"`` (the pure-torch cell list on an accelerator, vesin's CPU cell list on the CPU),
            ``"torch"`` or ``"vesin"`` (edges copied to the device), see :func:`neighbor_list`.

    Properties: ``energy``, ``free_energy`` (the same, eV), ``energies`` (per atom, eV), ``forces`` (eV/Å),
    ``stress`` (Voigt, eV/Å^3, ASE sign; fully periodic cells only, otherwise PropertyNotImplementedError).
    Atoms closer than :data:`MIN_DISTANCE` raise :class:`AtomsTooCloseError`.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model_path: str | Path | nn.Module,
        device: str | torch.device = "cpu",
        default_dtype: str = "float32",
        compile: bool = False,
        skin: float = 0.5,
        neighbor_list: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if skin < 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        if neighbor_list not in NEIGHBOR_LISTS:
            raise ValueError(f"neighbor_list must be one of {NEIGHBOR_LISTS}, got {neighbor_list!r}")
        self.neighbor_list = neighbor_list
        self.device = torch.device(device)
        self.dtype = model_dtype(default_dtype)
        self.skin = float(skin)
        self.model = prepare_model(model_path, self.device, self.dtype)
        self.cutoff = float(self.model.config.cutoff)
        self.elements = list(self.model.config.elements)
        if compile:
            compile_energy(self.model)
        # Caches that check themselves (atomic numbers, pbc and cell compared, displacement measured), so they
        # survive ASE's reset() on every new geometry (older ASE versions call it from get_property).
        self._system: _System | None = None
        self._neighbors: _Neighbors | None = None
        self.neighbor_list_builds = 0  # how often the list was (re)built: for tests and diagnostics
        self.num_edges = 0  # pairs given to the model at the last call: within cutoff + skin

    @property
    def e0_kind(self) -> str:
        """What the model's per-element reference energies (E0) are (``ModelConfig.e0_kind``: "isolated",
        "fitted", ...), ``"unknown"`` for a model that does not record it."""
        return str(getattr(self.model.config, "e0_kind", "unknown"))

    # ---------------------------------------------------------------------------------------------- ASE API
    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] | None = None,
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        properties = list(properties or ["energy"])
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        want_stress = "stress" in properties
        if want_stress and not atoms.pbc.all():
            raise PropertyNotImplementedError(f"stress needs a fully periodic cell, got pbc={atoms.pbc.tolist()}")
        graph = self._prepare(atoms)
        nb = self._neighbors
        if want_stress:
            out = self.model(graph, compute_forces=True, compute_stress=True)
        else:  # the energy network directly, with the cached shift vectors (as TorchDynamics)
            out = _energy_and_forces(self.model, graph.pos, self._system.element_index, nb.edge_index,
                                     nb.shift_vectors, graph.batch, 1)  # fmt: skip
        with torch.no_grad():
            d2 = pair_distances_squared(graph.pos, nb.edge_index, nb.shift_vectors)
            closest = torch.cat([d2, d2.new_full((1,), torch.inf)]).amin().view(1)
        host = _fetch(out, want_stress, closest)
        if host["closest"][0] < MIN_DISTANCE**2:
            raise closest_pair_error(d2, nb.edge_index, nb.unit_shifts)
        self.results = _results(host, 0, 0, len(atoms), want_stress)

    # ---------------------------------------------------------------------------------------------- batches
    def calculate_batch(
        self,
        structures: Sequence[Atoms],
        properties: Sequence[str] = ("energy", "forces"),
        batch_size: int = 16,
    ) -> list[dict[str, Any]]:
        """Evaluate many structures, ``batch_size`` per model call; one result dict per structure.

        Each dict has ``energy``, ``free_energy``, ``energies``, ``forces`` and, when ``"stress"`` is in
        ``properties`` and the structure is fully periodic, ``stress`` (Voigt). Invalid input raises before
        the model runs, naming the structure and the atom; atoms closer than :data:`MIN_DISTANCE` raise
        :class:`AtomsTooCloseError` naming the structure and the pair.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        structures = list(structures)
        for k, atoms in enumerate(structures):
            try:
                validate_atoms(atoms, self.elements)
            except (ValueError, KeyError) as err:
                raise type(err)(f"structure {k}: {err}") from None
        want_stress = "stress" in properties
        results: list[dict[str, Any]] = []
        for start in range(0, len(structures), batch_size):
            chunk = structures[start : start + batch_size]
            batch = Batch.from_data_list([self._graph_fresh(atoms) for atoms in chunk])
            stress = want_stress and any(atoms.pbc.all() for atoms in chunk)
            edge_graph = batch.batch.index_select(0, batch.edge_index[0])
            shifts = shift_vectors(batch.unit_shifts, batch.cell64.index_select(0, edge_graph), self.dtype)
            if stress:
                out = self.model(batch, compute_forces=True, compute_stress=True)
            else:
                out = _energy_and_forces(self.model, batch.pos, self.model.element_index(batch.atomic_numbers),
                                         batch.edge_index, shifts, batch.batch, len(chunk))  # fmt: skip
            with torch.no_grad():
                d2 = pair_distances_squared(batch.pos, batch.edge_index, shifts)
                closest = d2.new_full((len(chunk),), torch.inf).scatter_reduce(0, edge_graph, d2, "amin")
            host = _fetch(out, stress, closest)
            ptr = np.cumsum([0] + [len(atoms) for atoms in chunk]).tolist()  # batch.ptr, without a device read
            for b, atoms in enumerate(chunk):
                if host["closest"][b] < MIN_DISTANCE**2:
                    d2 = torch.where(edge_graph == b, d2, torch.inf)
                    raise closest_pair_error(d2, batch.edge_index, batch.unit_shifts, ptr[b], structure=start + b)
                results.append(_results(host, b, ptr[b], ptr[b + 1], stress and atoms.pbc.all()))
        return results

    # ---------------------------------------------------------------------------------------------- internals
    def _prepare(self, atoms: Atoms) -> Data:
        """The model input for ``atoms``, reusing cached tensors and the neighbour list where still valid: the
        candidate pairs within ``cutoff + skin`` (``edge_index``, ``unit_shifts``), the same tensors between
        rebuilds."""
        positions = np.asarray(atoms.positions, dtype=np.float64)
        system = self._system
        if system is None or not _same_system(system, atoms):
            validate_atoms(atoms, self.elements)
            system = self._system = self._make_system(atoms)
            self._neighbors = None
        else:
            check_positions(positions)
        graph = system.graph
        pos = self._upload(positions)
        neighbors = self._neighbors
        if neighbors is None or self._moved_too_far(positions, neighbors.reference):
            neighbors = self._neighbors = self._build_neighbors(pos, positions, system)
        graph.pos = pos
        graph.edge_index, graph.unit_shifts = neighbors.edge_index, neighbors.unit_shifts
        self.num_edges = neighbors.edge_index.shape[1]
        return graph

    def _upload(self, positions: np.ndarray) -> torch.Tensor:
        """Positions as a new device tensor in the model dtype; on CUDA through pinned memory, non-blocking."""
        host = torch.from_numpy(np.ascontiguousarray(positions))
        if self.device.type == "cuda":
            # The caching host allocator keeps a pinned block until the copies queued from it are done.
            staging = torch.empty(host.shape, dtype=self.dtype, pin_memory=True)
            staging.copy_(host)
            return staging.to(self.device, non_blocking=True)
        return host.to(device=self.device, dtype=self.dtype, copy=True)  # a copy: ASE may change its array

    def _make_system(self, atoms: Atoms) -> _System:
        graph = self._make_graph(atoms)
        element_index = self.model.element_index(graph.atomic_numbers)  # once per system: it checks the elements
        return _System(atoms.numbers.copy(), atoms.pbc.copy(), np.array(atoms.cell), graph, element_index)

    def _make_graph(self, atoms: Atoms) -> Data:
        n = len(atoms)
        device = self.device
        # As tdn.data.atoms_to_graph: a molecule's dummy box is zeroed so that it cannot leak into the model.
        cell = np.asarray(atoms.cell, dtype=np.float64) if atoms.pbc.any() else np.zeros((3, 3))
        graph = Data(
            atomic_numbers=torch.as_tensor(atoms.numbers, dtype=torch.long, device=device),
            cell=torch.from_numpy(cell).to(device=device, dtype=self.dtype).view(1, 3, 3),
            pbc=torch.as_tensor(atoms.pbc, device=device).view(1, 3),
            batch=torch.zeros(n, dtype=torch.long, device=device),
            ptr=torch.tensor([0, n], device=device),
            natoms=torch.tensor([n], device=device),
        )
        graph.cell64 = torch.from_numpy(cell).to(device).view(1, 3, 3)  # the exact cell, for the shift vectors
        return graph

    def _moved_too_far(self, positions: np.ndarray, reference: np.ndarray) -> bool:
        moved = positions - reference if positions.shape == reference.shape else np.full((1, 3), np.inf)
        return float(np.einsum("ij,ij->i", moved, moved).max(initial=0.0)) > (0.5 * self.skin) ** 2

    def _build_neighbors(self, pos: torch.Tensor, positions: np.ndarray, system: _System) -> _Neighbors:
        graph = system.graph
        edge_index, unit_shifts = neighbor_list(pos, graph.cell, graph.pbc, self.cutoff + self.skin, self.neighbor_list)
        self.neighbor_list_builds += 1
        vectors = shift_vectors(unit_shifts, graph.cell64, self.dtype)
        return _Neighbors(positions.copy(), edge_index, unit_shifts, vectors)

    def _graph_fresh(self, atoms: Atoms) -> Data:
        """A stand-alone graph with its own neighbour list (batched evaluation)."""
        graph = self._make_graph(atoms)
        graph.pos = torch.as_tensor(atoms.positions, device=self.device).to(self.dtype)
        graph.edge_index, graph.unit_shifts = neighbor_list(
            graph.pos, graph.cell, graph.pbc, self.cutoff, self.neighbor_list
        )
        del graph.batch, graph.ptr  # Batch.from_data_list makes its own
        return graph


# ------------------------------------------------------------------------------------------------ helpers
def _same_system(system: _System, atoms: Atoms) -> bool:
    return (
        len(system.numbers) == len(atoms)
        and np.array_equal(system.numbers, atoms.numbers)
        and np.array_equal(system.pbc, atoms.pbc)
        and np.array_equal(system.cell, np.asarray(atoms.cell))
    )


def _energy_and_forces(model: nn.Module, pos: torch.Tensor, element_index: torch.Tensor, edge_index: torch.Tensor,
                       edge_shift: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> dict[str, Any]:  # fmt: skip
    """``energy [B]``, ``node_energy [N]`` and ``forces [N, 3]`` from the model's energy network (no stress)."""
    pos = pos.detach().requires_grad_(True)
    with torch.enable_grad():
        node_energy = model.node_energies(pos, element_index, edge_index, edge_shift)
        grad = None
        if node_energy.requires_grad:  # False only without any edge
            (grad,) = torch.autograd.grad(node_energy.sum(), pos, allow_unused=True)
    node_energy = node_energy.detach()
    energy = node_energy.new_zeros(num_graphs).index_add_(0, batch, node_energy)
    forces = torch.zeros_like(pos) if grad is None else grad.neg()
    return {"energy": energy, "node_energy": node_energy, "forces": forces.detach(), "stress": None}


def _fetch(out: dict[str, torch.Tensor | None], with_stress: bool, closest: torch.Tensor) -> dict[str, np.ndarray]:
    """The results as float64 numpy arrays, brought to the host in ONE transfer (one sync on an accelerator):
    ``energy [B]``, ``node_energy [N]``, ``forces [N, 3]``, ``stress [B, 3, 3]`` (with_stress) and ``closest [B]``
    (the shortest squared pair distance)."""
    names = ("energy", "node_energy", "forces") + (("stress",) if with_stress else ())
    parts = {**{name: out[name] for name in names}, "closest": closest}
    with torch.no_grad():
        dtype = torch.promote_types(out["forces"].dtype, closest.dtype)
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in parts.values()])
    host = np.asarray(flat.cpu().numpy(), dtype=np.float64)
    arrays, offset = {}, 0
    for key, tensor in parts.items():
        size = tensor.numel()
        arrays[key] = host[offset : offset + size].reshape(tensor.shape)
        offset += size
    return arrays


def _results(host: dict[str, np.ndarray], b: int, start: int, stop: int, with_stress: bool) -> dict[str, Any]:
    """Results of graph ``b`` (atoms ``start:stop``), ASE conventions."""
    energy = float(host["energy"][b])
    results: dict[str, Any] = {
        "energy": energy,
        "free_energy": energy,
        "energies": host["node_energy"][start:stop].copy(),
        "forces": host["forces"][start:stop].copy(),
    }
    if with_stress:
        results["stress"] = full_3x3_to_voigt_6_stress(host["stress"][b])
    return results
