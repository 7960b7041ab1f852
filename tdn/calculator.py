"""ASE calculator for tdn models: energy, free_energy, energies, forces, stress.

The MD step is designed not to be dominated by Python and host-side work:

* the neighbour list is built with a skin (``cutoff + skin``), on the model's device (see ``neighbor_list``), and
  reused until some atom has moved more than ``skin / 2`` (or the cell, the atomic numbers or pbc changed);
  between rebuilds a step only selects, on the device, the cached candidate pairs inside the cutoff;
* the tensors that do not change between steps (atomic numbers, batch vector, cell, pbc) are built once
  and cached; a step copies only the positions to the device and the results back;
* the model's parameters are frozen, so autograd only follows the positions (and the strain for stress).

Usage, as with MACE's calculator::

    from tdn import TDNCalculator
    atoms.calc = TDNCalculator("model.pt", device="cuda", default_dtype="float32")
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    results = atoms.calc.calculate_batch(list_of_atoms)        # screening: one model call per chunk
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress
from torch import nn
from torch_geometric.data import Batch, Data

from .models import UnknownElementError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
AXES = "abc"


# ------------------------------------------------------------------------------------------------ validation
def validate_atoms(atoms: Atoms, elements: Sequence[int]) -> None:
    """Reject input the model cannot evaluate, with a message naming the atom, element or cell vector.

    Empty Atoms, non-finite positions, atomic numbers the model was not built for (a KeyError), a periodic
    direction with a zero or non-finite cell vector, or a fully periodic cell of zero volume.
    """
    if len(atoms) == 0:
        raise ValueError("the Atoms object is empty: nothing to evaluate")
    check_positions(atoms.positions)
    check_elements(atoms.numbers, elements)
    check_cell(np.asarray(atoms.cell), atoms.pbc)


def check_positions(positions: np.ndarray) -> None:
    finite = np.isfinite(positions).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"non-finite position of atom {bad[0]}: {positions[bad[0]].tolist()}"
            + (f" (and {len(bad) - 1} more atoms: {bad[1:6].tolist()}...)" if len(bad) > 1 else "")
        )


def check_elements(numbers: np.ndarray, elements: Sequence[int]) -> None:
    known = np.isin(numbers, np.asarray(elements))
    if not known.all():
        first = int(np.flatnonzero(~known)[0])
        z = int(numbers[first])
        symbol = chemical_symbols[z] if 0 <= z < len(chemical_symbols) else "?"
        names = [chemical_symbols[e] for e in elements]
        raise UnknownElementError(
            f"element {symbol} (Z={z}) of atom {first} is not one the model was built for: {names}"
        )


def check_cell(cell: np.ndarray, pbc: np.ndarray) -> None:
    pbc = np.asarray(pbc, dtype=bool)
    for axis in range(3):
        if not pbc[axis]:
            continue
        vector = cell[axis]
        if not np.isfinite(vector).all() or np.linalg.norm(vector) < 1e-8:
            raise ValueError(
                f"pbc is True along {AXES[axis]} but cell vector {AXES[axis]} is {vector.tolist()}: "
                "set a cell or turn periodicity off"
            )
    if pbc.all() and abs(np.linalg.det(cell)) < 1e-8:
        raise ValueError(f"fully periodic cell has zero volume: {cell.tolist()}")


# ------------------------------------------------------------------------------------------------ neighbours
NEIGHBOR_LISTS = ("auto", "torch", "vesin")


def neighbor_list(
    pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cutoff: float, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs within ``cutoff`` as tensors on ``pos.device``: ``edge_index [2, E]`` (sender, receiver) and
    integer-valued ``unit_shifts [E, 3]`` in ``pos.dtype``, with ``vector = pos[j] - pos[i] + unit_shifts @ cell``.

    ``method``: ``"torch"`` the pure-torch list on ``pos.device`` (:func:`tdn.data.neighbors.neighbor_list_torch`:
    positions never leave an accelerator); ``"vesin"`` vesin's CPU cell list
    (:func:`tdn.data.neighbors.neighbor_list`) and a copy of the edges to the device; ``"auto"``: torch on an
    accelerator (a linear-scaling cell list, any number of atoms), vesin on the CPU. With the skin the list is
    rebuilt only every few tens of MD steps, so its cost is spread over them.
    """
    from .data import neighbors

    if method == "auto":
        method = "vesin" if pos.device.type == "cpu" else "torch"
    if method == "vesin":
        sender, receiver, shifts = neighbors.neighbor_list(
            pos.detach().cpu().double().numpy(),
            cell.detach().cpu().double().view(3, 3).numpy(),
            pbc.cpu().view(3).numpy(),
            cutoff,
        )
        edge_index = torch.from_numpy(np.stack([sender, receiver])).to(pos.device)
        return edge_index, torch.from_numpy(shifts).to(device=pos.device, dtype=pos.dtype)
    sender, receiver, shifts = neighbors.neighbor_list_torch(pos.detach(), cell.view(3, 3), pbc.view(3), cutoff)
    return torch.stack([sender, receiver]), shifts.to(pos.dtype)


@dataclass
class _System:
    """The parts of the input that stay fixed between MD steps, as device tensors."""

    numbers: np.ndarray
    pbc: np.ndarray
    cell: np.ndarray
    graph: Data  # atomic_numbers, cell, pbc, batch, ptr, natoms; pos and edges are set per call


@dataclass
class _Neighbors:
    """Candidate pairs within ``cutoff + skin`` of the positions ``reference``."""

    reference: torch.Tensor  # [N, 3]
    edge_index: torch.Tensor  # [2, E]
    unit_shifts: torch.Tensor  # [E, 3]
    shift_vectors: torch.Tensor  # [E, 3] unit_shifts @ cell, Å


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
        if default_dtype not in DTYPES:
            raise ValueError(f"default_dtype must be one of {tuple(DTYPES)}, got {default_dtype!r}")
        if skin < 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        if neighbor_list not in NEIGHBOR_LISTS:
            raise ValueError(f"neighbor_list must be one of {NEIGHBOR_LISTS}, got {neighbor_list!r}")
        self.neighbor_list = neighbor_list
        self.device = torch.device(device)
        self.dtype = DTYPES[default_dtype]
        self.skin = float(skin)
        self.model = _load_model(model_path, self.device, self.dtype)
        self.cutoff = float(self.model.config.cutoff)
        self.elements = list(self.model.config.elements)
        if compile:
            _compile_energy(self.model)
        # Caches that check themselves (atomic numbers, pbc and cell compared, displacement measured), so they
        # survive ASE's reset() on every new geometry (older ASE versions call it from get_property).
        self._system: _System | None = None
        self._neighbors: _Neighbors | None = None
        self.neighbor_list_builds = 0  # how often the list was (re)built: for tests and diagnostics
        self.num_edges = 0  # edges within the cutoff at the last call

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
        out = self.model(graph, compute_forces=True, compute_stress=want_stress)
        self.results = _to_numpy(out, 0, 0, len(atoms), with_stress=want_stress)

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
        the model runs, naming the structure and the atom.
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
            out = self.model(batch, compute_forces=True, compute_stress=stress)
            ptr = batch.ptr.tolist()
            for b, atoms in enumerate(chunk):
                results.append(_to_numpy(out, b, ptr[b], ptr[b + 1], with_stress=stress and atoms.pbc.all()))
        return results

    # ---------------------------------------------------------------------------------------------- internals
    def _prepare(self, atoms: Atoms) -> Data:
        """The model input for ``atoms``, reusing cached tensors and the neighbour list where still valid."""
        positions = atoms.positions
        system = self._system
        if system is None or not _same_system(system, atoms):
            validate_atoms(atoms, self.elements)
            system = self._system = self._make_system(atoms)
            self._neighbors = None
        else:
            check_positions(positions)
        graph = system.graph
        pos = torch.from_numpy(np.ascontiguousarray(positions)).to(device=self.device, dtype=self.dtype)
        neighbors = self._neighbors
        if neighbors is None or self._moved_too_far(pos, neighbors.reference):
            neighbors = self._neighbors = self._build_neighbors(pos, graph.cell, graph.pbc)
        graph.pos = pos
        graph.edge_index, graph.unit_shifts = self._select_edges(pos, neighbors)
        self.num_edges = graph.edge_index.shape[1]
        return graph

    def _make_system(self, atoms: Atoms) -> _System:
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
        return _System(atoms.numbers.copy(), atoms.pbc.copy(), np.array(atoms.cell), graph)

    def _moved_too_far(self, pos: torch.Tensor, reference: torch.Tensor) -> bool:
        if pos.shape != reference.shape:
            return True
        max_sq = ((pos - reference) ** 2).sum(dim=1).max()
        return bool(max_sq > (0.5 * self.skin) ** 2)

    def _build_neighbors(self, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor) -> _Neighbors:
        edge_index, unit_shifts = neighbor_list(pos, cell, pbc, self.cutoff + self.skin, self.neighbor_list)
        self.neighbor_list_builds += 1
        return _Neighbors(pos.clone(), edge_index, unit_shifts, unit_shifts @ cell.view(3, 3))

    def _select_edges(self, pos: torch.Tensor, nb: _Neighbors) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached candidate pairs that are within the cutoff at ``pos``."""
        if self.skin == 0:
            return nb.edge_index, nb.unit_shifts
        sender, receiver = nb.edge_index
        vectors = pos.index_select(0, receiver) - pos.index_select(0, sender) + nb.shift_vectors  # [E, 3]
        keep = ((vectors * vectors).sum(dim=1) < self.cutoff**2).nonzero().squeeze(1)
        return nb.edge_index.index_select(1, keep), nb.unit_shifts.index_select(0, keep)

    def _graph_fresh(self, atoms: Atoms) -> Data:
        """A stand-alone graph with its own neighbour list (batched evaluation)."""
        graph = self._make_system(atoms).graph
        graph.pos = torch.as_tensor(atoms.positions, device=self.device).to(self.dtype)
        graph.edge_index, graph.unit_shifts = neighbor_list(
            graph.pos, graph.cell, graph.pbc, self.cutoff, self.neighbor_list
        )
        del graph.batch, graph.ptr  # Batch.from_data_list makes its own
        return graph


# ------------------------------------------------------------------------------------------------ helpers
def _load_model(model_path: str | Path | nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if isinstance(model_path, nn.Module):
        model = model_path.to(device=device, dtype=dtype)
    else:
        from . import load_model

        path = Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"model file {path} does not exist")
        model = load_model(path, device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _compile_energy(model: nn.Module) -> None:
    """Replace ``model.node_energies`` by its ``torch.compile`` d version (forces stay autograd outside)."""
    try:
        model.node_energies = torch.compile(model.node_energies, dynamic=True)
    except Exception as err:  # noqa: BLE001 - compile support differs by platform; eager always works
        warnings.warn(f"torch.compile failed ({err!r}); running eagerly", stacklevel=3)


def _same_system(system: _System, atoms: Atoms) -> bool:
    return (
        len(system.numbers) == len(atoms)
        and np.array_equal(system.numbers, atoms.numbers)
        and np.array_equal(system.pbc, atoms.pbc)
        and np.array_equal(system.cell, np.asarray(atoms.cell))
    )


def _to_numpy(out: dict[str, torch.Tensor | None], b: int, start: int, stop: int, with_stress: bool) -> dict[str, Any]:
    """Results of graph ``b`` (atoms ``start:stop``) as float64 numpy, ASE conventions."""
    energy = float(out["energy"][b].detach())
    results: dict[str, Any] = {
        "energy": energy,
        "free_energy": energy,
        "energies": out["node_energy"][start:stop].detach().cpu().double().numpy(),
        "forces": out["forces"][start:stop].detach().cpu().double().numpy(),
    }
    if with_stress:
        results["stress"] = full_3x3_to_voigt_6_stress(out["stress"][b].detach().cpu().double().numpy())
    return results
