"""ASE calculator for tdn models: energy, free_energy, energies, forces, stress, per-atom stresses; committees of
models (:mod:`tdn.committee`) and Grimme's D3 dispersion (:mod:`tdn.dispersion`) on top.

An MD step is designed not to be dominated by Python and host-side work, and to make the host wait for the device
only once:

* the neighbour list is built with a skin (``cutoff + skin``), on the model's device (see ``neighbor_list``), and
  reused until some atom has moved more than ``skin / 2`` (or the cell, the atomic numbers or pbc changed), which
  is measured on the host from the positions ASE hands over (no device work);
* on an accelerator, between rebuilds the model gets ALL the candidate pairs, the same ``edge_index`` tensor at
  every step (as :class:`tdn.dynamics.TorchDynamics`): the radial envelope is exactly zero at ``r >= cutoff`` and
  the radial MLP maps 0 to 0, so pairs beyond the cutoff contribute exactly nothing. No per-step ``nonzero``
  selection, and what is derived from ``edge_index`` (the fused convolution's edge sort,
  :func:`tdn._cache.cached_on`) is reused. On the CPU, where reading a size back costs nothing and the per-edge
  work is most of the step, the candidates within the cutoff are selected at every step (``exact_pairs``);
* what does not change between steps (atomic numbers, cell, pbc, shift vectors) is cached on the device; a step
  copies the positions there (non-blocking, through pinned memory on CUDA) and brings the results back in ONE
  transfer: energy, per-atom energies, forces, stress and the shortest pair distance, packed into one buffer;
* that distance (candidate pairs, periodic images included) guards against atoms on top of each other, which give
  NaN energies and forces: closer than :data:`MIN_DISTANCE` raises :class:`AtomsTooCloseError` naming the pair;
* shift vectors are computed without matmuls (:func:`tdn.data.neighbors.rows_times_matrix`): exact whatever
  ``torch.set_float32_matmul_precision`` says; the model's parameters are frozen (autograd follows the shift
  vectors: forces, stress and per-atom stresses come from the edge forces ``dE/dr_e``, :mod:`tdn.edge_forces`).

Usage, as with MACE's calculator::

    from tdn import TDNCalculator
    atoms.calc = TDNCalculator("model.pt", device="cuda", default_dtype="float32")
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    results = atoms.calc.calculate_batch(list_of_atoms)        # screening: one model call per chunk
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from torch import nn
from torch_geometric.data import Data

from .committee import COMMITTEE_PROPERTIES, check_committee, results_from_host
from .dispersion import DEFAULT_CUTOFF, D3Dispersion
from .edge_forces import derivatives, edge_vectors, evaluate_models, to_host
from .runtime import (
    MIN_DISTANCE,
    NEIGHBOR_LISTS,
    check_positions,
    closest_pair_error,
    compile_energy,
    model_dtype,
    neighbor_list,
    pair_distances_squared,
    pairs_within,
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
    element_index: list[torch.Tensor]  # [N] per model: its element rows (one shared tensor where elements agree)


@dataclass
class _Neighbors:
    """Candidate pairs within ``cutoff + skin`` of the positions ``reference``."""

    reference: np.ndarray  # [N, 3] float64, host: the displacement check needs no device work
    edge_index: torch.Tensor  # [2, E]
    unit_shifts: torch.Tensor  # [E, 3]
    shift_vectors: torch.Tensor  # [E, 3] unit_shifts @ cell, Å, model dtype
    dispersion: tuple[torch.Tensor, ...] | None = None  # the D3 term's pairs (edge_index, unit_shifts, shifts)


# ASE's own Calculator keywords (restart, label, atoms, directory, ...): passed on; anything else is refused.
ASE_KEYWORDS = tuple(p for p in inspect.signature(Calculator.__init__).parameters if p not in ("self", "kwargs"))
STRESS_PROPERTIES = ("stress", "stresses", "stress_comm", "stress_var")


class TDNCalculator(Calculator):
    """ASE calculator for a tdn model file (``tdn.save_model``) or a model object, or a committee of them.

    Args:
        model_path: path of an exported model, or a :class:`tdn.models.TDNModel` (used in place: put in eval
            mode, its parameters frozen, moved to ``device`` / ``default_dtype``); a list of them is a committee
            (:mod:`tdn.committee`: same cutoff and elements; mean predictions, their variances).
        device: torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        default_dtype: ``"float32"`` (fast) or ``"float64"`` (for force/stress tests, phonons, tight relaxations).
        compile: ``torch.compile`` the model's energy function (experimental; falls back with a warning).
        skin: neighbour-list skin in Å; the list is rebuilt once an atom has moved more than ``skin / 2``.
            ``0`` rebuilds at every new geometry.
        neighbor_list: ``"auto"`` (vesin on the model's device: its CUDA cell list on a GPU, its CPU list on the CPU),
            ``"torch"`` (on the tensors' device) or ``"vesin"`` (on the host, edges copied to the device), see
            :func:`tdn.runtime.neighbor_list`.
        dispersion: ``None``, or ``"d3bj"`` (``"d3zero"``, ``"d3bjm"``, ``"d3zerom"``): add Grimme's D3 dispersion
            (:mod:`tdn.dispersion`, torch-dftd: ``pip install tdn[d3]``) on the model's device and dtype.
        functional: the functional whose D3 parameters to use (default ``"pbe"``; only with ``dispersion``).
        dispersion_cutoff: the D3 cutoff in Å (default 40 Bohr = 21.2 Å; only with ``dispersion``).
        restart, label, atoms, directory, ...: ASE's own Calculator keywords. Any other keyword is a TypeError.

    Properties: ``energy``, ``free_energy`` (the same, eV), ``energies`` (per atom, eV; without the dispersion
    energy, which is reported as ``dispersion_energy``), ``forces`` (eV/Å), ``stress`` (Voigt, eV/Å^3, ASE sign) and
    ``stresses`` (per atom, ``[N, 6]``, eV/Å^3, summing to ``stress``: :mod:`tdn.edge_forces`); the stresses for fully
    periodic cells only, otherwise PropertyNotImplementedError. A committee adds ``energy_comm``, ``energy_var``,
    ``forces_comm``, ``forces_var``, ``stress_comm``, ``stress_var`` and ``force_spread`` (:mod:`tdn.committee`).
    Atoms closer than :data:`MIN_DISTANCE` raise :class:`AtomsTooCloseError`.

    Forces, stress and per-atom stresses come from ONE backward pass per model, with respect to the shift vectors
    (the edge forces ``dE/dr_e``); the stress of a periodic cell is computed whenever it is evaluated.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "stresses"]

    def __init__(
        self,
        model_path: str | Path | nn.Module,
        device: str | torch.device = "cpu",
        default_dtype: str = "float32",
        compile: bool = False,
        skin: float = 0.5,
        neighbor_list: str = "auto",
        dispersion: str | None = None,
        functional: str | None = None,
        dispersion_cutoff: float | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(ASE_KEYWORDS))
        if unknown:
            known = [p for p in inspect.signature(TDNCalculator.__init__).parameters if p not in ("self", "kwargs")]
            raise TypeError(f"TDNCalculator got unknown keyword argument(s) {unknown}; its keywords are {known}, "
                            f"and ASE's {list(ASE_KEYWORDS)}")  # fmt: skip
        if dispersion is None and (functional is not None or dispersion_cutoff is not None):
            raise ValueError("functional and dispersion_cutoff set the D3 dispersion: give dispersion='d3bj' too")
        super().__init__(**kwargs)
        if skin < 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        if neighbor_list not in NEIGHBOR_LISTS:
            raise ValueError(f"neighbor_list must be one of {NEIGHBOR_LISTS}, got {neighbor_list!r}")
        self.neighbor_list = neighbor_list
        self.device = torch.device(device)
        self.dtype = model_dtype(default_dtype)
        self.skin = float(skin)
        sources = list(model_path) if isinstance(model_path, (list, tuple)) else [model_path]
        if not sources:
            raise ValueError("model_path is an empty list: give a model file, or several for a committee")
        self.models = [prepare_model(source, self.device, self.dtype) for source in sources]
        check_committee(self.models, [f"model {k} ({s})" if isinstance(s, (str, Path)) else f"model {k}"
                                      for k, s in enumerate(sources)])  # fmt: skip
        self.cutoff = float(self.models[0].config.cutoff)
        self.elements = list(self.models[0].config.elements)
        if compile:
            for model in self.models:
                compile_energy(model)
        self.dispersion = None
        if dispersion is not None:
            cutoff = DEFAULT_CUTOFF if dispersion_cutoff is None else float(dispersion_cutoff)
            self.dispersion = D3Dispersion(dispersion, functional or "pbe", self.elements, self.device, self.dtype,
                                           cutoff)  # fmt: skip
        extra = (list(COMMITTEE_PROPERTIES) if len(self.models) > 1 else []) + (["dispersion_energy"] if dispersion
                                                                                 else [])  # fmt: skip
        self.implemented_properties = [*type(self).implemented_properties, *extra]
        # Caches that check themselves (atomic numbers, pbc and cell compared, displacement measured), so they
        # survive ASE's reset() on every new geometry (older ASE versions call it from get_property).
        self._system: _System | None = None
        self._neighbors: _Neighbors | None = None
        self.neighbor_list_builds = 0  # how often the list was (re)built: for tests and diagnostics
        self.num_edges = 0  # pairs given to the model at the last call
        # On the CPU the model gets only the candidates within the cutoff, selected at every call (a host read
        # costs nothing there; per-edge work is most of a CPU step); on an accelerator every candidate, the same
        # edge_index between rebuilds (no host sync). Set to override.
        self.exact_pairs = self.device.type == "cpu"

    @property
    def model(self) -> nn.Module:
        """The model of a single-model calculator without dispersion. A committee (see ``models``) or a calculator
        with ``dispersion`` raises ValueError: code that runs ``calc.model`` on its own (``calculate_batch``,
        :class:`tdn.dynamics.TorchDynamics`, the integrations) would leave the other members or the D3 term out."""
        if len(self.models) > 1 or self.dispersion is not None:
            what = f"a committee of {len(self.models)} models" if len(self.models) > 1 else "a model plus D3"
            raise ValueError(f"this calculator evaluates {what}: calc.model, which runs one bare model (as "
                             "calculate_batch and the torch MD engine do), would give other results; use the ASE "
                             "interface (atoms.get_forces(), ...), or calc.models[k] for one member")  # fmt: skip
        return self.models[0]

    @model.setter
    def model(self, model: nn.Module) -> None:
        if len(self.models) != 1:
            raise ValueError("calc.model of a committee cannot be set: set calc.models")
        self.models = [model]

    @property
    def e0_kind(self) -> str:
        """What the model's per-element reference energies (E0) are (``ModelConfig.e0_kind``: "isolated",
        "fitted", ...), ``"unknown"`` for a model that does not record it (a committee: its first member's)."""
        return str(getattr(self.models[0].config, "e0_kind", "unknown"))

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
        periodic = bool(atoms.pbc.all())
        stresses = [name for name in properties if name in STRESS_PROPERTIES]
        if stresses and not periodic:
            pbc = atoms.pbc.tolist()
            raise PropertyNotImplementedError(f"{stresses[0]} needs a fully periodic cell, got pbc={pbc}")
        graph = self._prepare(atoms)
        nb, system, n = self._neighbors, self._system, len(atoms)
        edge_index, shift_vectors, unit_shifts = nb.edge_index, nb.shift_vectors, nb.unit_shifts
        if self.exact_pairs:
            edge_index, shift_vectors, unit_shifts = self._within_cutoff(graph.pos, nb)
            self.num_edges = edge_index.shape[1]
        # The energy networks directly, with the cached shift vectors (as TorchDynamics); forces, virial and
        # per-atom virials from the edge forces of one backward pass per model.
        out = evaluate_models(self.models, graph.pos, system.element_index, edge_index, shift_vectors)
        vectors = edge_vectors(graph.pos, edge_index, shift_vectors)
        per_atom = "stresses" in properties
        tensors = {
            "node_energy": out["node_energy"],
            **derivatives(out["g"], vectors, edge_index, n, with_virial=periodic, with_atom_virials=per_atom),
        }
        if self.dispersion is not None:
            pairs, _, shifts = nb.dispersion
            d3 = self.dispersion.evaluate(graph.atomic_numbers, graph.pos, graph.cell, pairs, shifts,
                                          with_virial=periodic, with_atom_virials=per_atom)  # fmt: skip
            tensors["dispersion_energy"] = d3.pop("energy")
            tensors.update({key: value + d3[key] for key, value in tensors.items() if key in d3})  # every member
        with torch.no_grad():
            d2 = pair_distances_squared(graph.pos, edge_index, shift_vectors)
            tensors["closest"] = torch.cat([d2, d2.new_full((1,), torch.inf)]).amin()
        host = to_host(tensors)
        if host["closest"] < MIN_DISTANCE**2:
            raise closest_pair_error(d2, edge_index, unit_shifts)
        volume = abs(float(np.linalg.det(system.cell))) if periodic else None
        self.results = results_from_host(host, volume, committee=len(self.models) > 1)

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
        from .integrations.batch import evaluate_structures  # the one-graph path of the torch-sim model

        return evaluate_structures(self.model, structures, properties, batch_size, self.neighbor_list)

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

    @torch.no_grad()
    def _within_cutoff(self, pos: torch.Tensor, nb: _Neighbors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The candidate pairs closer than the cutoff (``edge_index``, ``shift_vectors``, ``unit_shifts``): the
        same energy and forces (pairs beyond the cutoff contribute exactly zero) for about 1/1.26 of the edge work
        of Cu's candidates at a 0.5 Å skin. The selection reads its size back to the host: free where the host is the
        device (:attr:`exact_pairs`)."""
        keep = pairs_within(pos, nb.edge_index, nb.shift_vectors, self.cutoff)
        return nb.edge_index.index_select(1, keep), nb.shift_vectors[keep], nb.unit_shifts[keep]

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
        # once per system (it checks the elements); cached on the tensor, so models sharing elements share it
        element_index = [model.element_index(graph.atomic_numbers) for model in self.models]
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
        d3 = None if self.dispersion is None else self.dispersion.neighbors(pos, graph.cell, graph.pbc, graph.cell64,
                                                                           self.skin, self.neighbor_list)
        return _Neighbors(positions.copy(), edge_index, unit_shifts, vectors, d3)


# ------------------------------------------------------------------------------------------------ helpers
def _same_system(system: _System, atoms: Atoms) -> bool:
    return (
        len(system.numbers) == len(atoms)
        and np.array_equal(system.numbers, atoms.numbers)
        and np.array_equal(system.pbc, atoms.pbc)
        and np.array_equal(system.cell, np.asarray(atoms.cell))
    )
