"""ase.Atoms -> torch_geometric Data with exactly the fields of docs/CONTRACTS.md, and batching."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms
from torch_geometric.data import Batch, Data

from .atoms import fixed_mask, get_energy, get_forces, get_stress
from .neighbors import neighbor_list

GRAPH_FIELDS = ("pos", "atomic_numbers", "edge_index", "unit_shifts", "cell", "pbc", "energy", "forces",
                "stress", "has_stress", "tags", "fixed", "natoms")


def resolve_dtype(dtype) -> torch.dtype:
    """torch dtype from a torch.dtype or a name ("float32", "float64", "torch.float64")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "float64", "float16", "bfloat16"):
        raise ValueError(f"unsupported float dtype {dtype!r}")
    return getattr(torch, name)


def atoms_to_graph(
    atoms: Atoms,
    cutoff: float,
    *,
    dtype=torch.float32,
    max_neighbors: int | None = None,
) -> Data:
    """One structure as a graph (fields and shapes: docs/CONTRACTS.md).

    Args:
        atoms: the structure; labels are read from its calculator results, tags from ASE tags,
            fixed atoms from FixAtoms constraints.
        cutoff: neighbour cutoff in Å.
        dtype: float dtype of pos, unit_shifts, cell, energy, forces, stress (default float32).
        max_neighbors: cap on neighbours per receiver (nearest kept), None for no cap.

    Returns:
        Data with pos [N,3], atomic_numbers [N], edge_index [2,E] (sender, receiver), unit_shifts [E,3],
        cell [1,3,3] (zeros when no direction is periodic), pbc [1,3], energy [1] (eV), forces [N,3]
        (eV/Å), stress [1,3,3] (eV/Å^3, zeros when unlabelled), has_stress [1], tags [N], fixed [N],
        natoms [1]. A missing energy or forces label becomes NaN so that training on it fails loudly;
        readers reject such records unless told labels are not required.
    """
    dtype = resolve_dtype(dtype)
    n = len(atoms)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    # A molecule in a dummy box has no use for the box: zero it so it cannot leak into a model.
    cell = np.asarray(atoms.cell.array, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
    sender, receiver, shifts = neighbor_list(atoms.positions, cell, pbc, cutoff, max_neighbors)

    energy = get_energy(atoms)
    forces = get_forces(atoms)
    stress = get_stress(atoms)
    forces_t = torch.full((n, 3), float("nan"), dtype=dtype) if forces is None else torch.tensor(forces, dtype=dtype)
    stress_t = torch.zeros((1, 3, 3), dtype=dtype) if stress is None else torch.tensor(stress, dtype=dtype)
    return Data(
        pos=torch.tensor(atoms.positions, dtype=dtype),
        atomic_numbers=torch.tensor(atoms.numbers, dtype=torch.long),
        edge_index=torch.from_numpy(np.stack([sender, receiver])).long(),
        unit_shifts=torch.from_numpy(shifts).to(dtype),
        cell=torch.tensor(cell, dtype=dtype).view(1, 3, 3),
        pbc=torch.tensor(pbc, dtype=torch.bool).view(1, 3),
        energy=torch.tensor([np.nan if energy is None else energy], dtype=dtype),
        forces=forces_t,
        stress=stress_t.view(1, 3, 3),
        has_stress=torch.tensor([stress is not None], dtype=torch.bool),
        tags=torch.tensor(atoms.get_tags(), dtype=torch.long),
        fixed=torch.from_numpy(fixed_mask(atoms)),
        natoms=torch.tensor([n], dtype=torch.long),
    )


class GraphDataset(torch.utils.data.Dataset):
    """A torch Dataset of graphs over (some positions of) an Atoms dataset.

    Args:
        atoms: any Sequence of ase.Atoms with ``.get(i)`` (a reader, a subset, a list).
        cutoff, dtype, max_neighbors: as for :func:`atoms_to_graph`.
        indices: positions of ``atoms`` to expose (default all), e.g. a split.
        cache: a dict (usually empty) that keeps every graph once built, by position in ``atoms``, in this process;
            copies are handed out. Reading a record and building its neighbour list is then done once, not once per
            epoch. :meth:`subset` shares it. None: build on every access.

    ``dataset[k]`` is the graph of ``atoms[indices[k]]``, or None for a record skipped as invalid.
    """

    def __init__(self, atoms: Sequence, cutoff: float, *, dtype=torch.float32, max_neighbors: int | None = None,
                 indices=None, cache: dict[int, Data | None] | None = None):
        self.atoms = atoms
        self.cutoff = float(cutoff)
        self.dtype = resolve_dtype(dtype)
        self.max_neighbors = max_neighbors
        self.indices = np.arange(len(atoms), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.indices)

    def atoms_at(self, k: int) -> Atoms | None:
        index = int(self.indices[k])
        getter = getattr(self.atoms, "get", None)
        return getter(index) if getter is not None else self.atoms[index]

    def __getitem__(self, k: int) -> Data | None:
        if self.cache is None:
            return self.build(k)
        index = int(self.indices[k])
        if index not in self.cache:
            self.cache[index] = self.build(k)
        graph = self.cache[index]
        return None if graph is None else graph.clone()  # callers may mark or move what they get; the cache stays

    def build(self, k: int) -> Data | None:
        """The graph at position ``k``, read and built now."""
        atoms = self.atoms_at(k)
        if atoms is None:
            return None
        return atoms_to_graph(atoms, self.cutoff, dtype=self.dtype, max_neighbors=self.max_neighbors)

    def natoms_hint(self) -> np.ndarray | None:
        """Atoms per position when the reader knows them without decoding, else None."""
        hint_fn = getattr(self.atoms, "natoms_hint", None)
        hint = hint_fn() if hint_fn is not None else None
        return None if hint is None else hint[self.indices]

    def subset(self, positions) -> GraphDataset:
        """The same graphs restricted to some of this dataset's positions."""
        return GraphDataset(self.atoms, self.cutoff, dtype=self.dtype, max_neighbors=self.max_neighbors,
                            indices=self.indices[np.asarray(positions, dtype=np.int64)], cache=self.cache)


def collate(graphs: Sequence[Data | None]) -> Batch:
    """Batch graphs (adds ``batch`` and ``ptr``); None entries (skipped records) are left out."""
    kept = [g for g in graphs if g is not None]
    if not kept:
        raise ValueError("cannot collate a batch in which every record was skipped")
    return Batch.from_data_list(kept)
