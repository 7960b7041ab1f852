"""Graphs (the CONTRACTS.md fields), statistics, splits and the batch sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import fcc111, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from torch.utils.data import DistributedSampler, SequentialSampler

import tdn.data
from tdn.data import BalancedBatchSampler, compute_statistics, split_indices
from tdn.data.sampler import pack_batches

# name: (dtype kind, shape with N atoms, E edges) from docs/CONTRACTS.md
CONTRACT = {
    "pos": ("float", ("N", 3)),
    "atomic_numbers": (torch.long, ("N",)),
    "edge_index": (torch.long, (2, "E")),
    "unit_shifts": ("float", ("E", 3)),
    "cell": ("float", (1, 3, 3)),
    "pbc": (torch.bool, (1, 3)),
    "energy": ("float", (1,)),
    "forces": ("float", ("N", 3)),
    "stress": ("float", (1, 3, 3)),
    "has_stress": (torch.bool, (1,)),
    "tags": (torch.long, ("N",)),
    "fixed": (torch.bool, ("N",)),
    "natoms": (torch.long, (1,)),
}


def slab_with_labels() -> Atoms:
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    slab.pbc = True
    slab.set_tags([0] * 4 + [1] * 4)
    slab.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
    forces = np.arange(24, dtype=float).reshape(8, 3) * 0.01
    slab.calc = SinglePointCalculator(slab, energy=-12.5, forces=forces, stress=[0.1, 0.2, 0.3, 0.0, 0.0, 0.05])
    return slab


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graph_has_exactly_the_contract_fields(dtype):
    slab = slab_with_labels()
    graph = tdn.data.atoms_to_graph(slab, 4.0, dtype=dtype)
    assert set(graph.keys()) == set(CONTRACT) == set(tdn.data.GRAPH_FIELDS)
    n, e = len(slab), graph.edge_index.shape[1]
    for name, (kind, shape) in CONTRACT.items():
        value = graph[name]
        assert value.dtype == (dtype if kind == "float" else kind), name
        assert tuple(value.shape) == tuple(n if s == "N" else e if s == "E" else s for s in shape), name
    assert graph.energy.item() == pytest.approx(-12.5)
    assert torch.allclose(graph.forces[1].double(), torch.tensor([0.03, 0.04, 0.05], dtype=torch.float64))  # raw
    assert graph.stress[0, 0, 2].item() == pytest.approx(0.0) and graph.stress[0, 0, 1].item() == pytest.approx(0.05)
    assert graph.has_stress.item() and graph.fixed.tolist() == [True] * 4 + [False] * 4
    assert graph.tags.tolist() == [0] * 4 + [1] * 4 and graph.pbc.tolist() == [[True] * 3]
    src, dst = graph.edge_index
    vectors = graph.pos[dst] - graph.pos[src] + graph.unit_shifts @ graph.cell[0]
    assert (vectors.norm(dim=1) < 4.0 + 1e-5).all()


def test_molecule_graph_has_zero_cell_and_batches():
    mol = molecule("H2O")
    mol.cell = np.eye(3) * 50  # a dummy box, not periodic
    mol.calc = SinglePointCalculator(mol, energy=-1.0, forces=np.zeros((3, 3)))
    graph = tdn.data.atoms_to_graph(mol, 5.0)
    assert torch.count_nonzero(graph.cell) == 0 and not graph.pbc.any()
    assert not graph.has_stress.item() and torch.count_nonzero(graph.stress) == 0
    assert graph.edge_index.shape[1] == 6 and torch.count_nonzero(graph.unit_shifts) == 0
    batch = tdn.data.collate([graph, None, tdn.data.atoms_to_graph(slab_with_labels(), 4.0)])
    assert batch.num_graphs == 2 and batch.natoms.tolist() == [3, 8] and batch.cell.shape == (2, 3, 3)
    assert batch.batch.tolist() == [0] * 3 + [1] * 8
    assert batch.edge_index[:, 6:].min() >= 3  # the second graph's edges are offset


def synthetic_dataset(seed: int = 0, count: int = 30):
    """Structures whose energy is exactly sum of E0[Z] + 0.1 eV/atom; known forces."""
    rng = np.random.default_rng(seed)
    e0 = {1: -13.6, 6: -1030.0, 8: -2040.0}
    frames = []
    for _ in range(count):
        numbers = rng.choice([1, 6, 8], size=int(rng.integers(2, 7)))
        positions = rng.uniform(0, 6, size=(len(numbers), 3))
        atoms = Atoms(numbers=numbers, positions=positions)
        energy = sum(e0[z] for z in numbers) + 0.1 * len(numbers)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.full((len(numbers), 3), 0.5))
        frames.append(atoms)
    return frames, e0


def test_statistics_least_squares_and_given_references(tmp_path):
    frames, e0 = synthetic_dataset()
    graphs = [tdn.data.atoms_to_graph(a, 3.0, dtype=torch.float64) for a in frames]
    stats = compute_statistics(graphs, cutoff=3.0)
    # E = sum E0 + 0.1 N is fitted exactly by E0' = E0 + 0.1, leaving no interaction energy
    for z, value in e0.items():
        assert stats["e0"][z] == pytest.approx(value + 0.1, abs=1e-6)
    assert stats["mean_interaction_energy_per_atom"] == pytest.approx(0.0, abs=1e-6)
    assert stats["force_rms"] == pytest.approx(0.5)
    total_edges = sum(g.edge_index.shape[1] for g in graphs)
    assert stats["avg_num_neighbors"] == pytest.approx(total_edges / sum(len(a) for a in frames))
    assert stats["elements"] == [1, 6, 8] and stats["num_structures"] == 30 and stats["e0_method"] == "least_squares"
    given = compute_statistics(graphs, e0={"H": -13.6, 6: -1030.0, "O": -2040.0})
    assert given["e0_method"] == "given" and given["mean_interaction_energy_per_atom"] == pytest.approx(0.1)
    coeff = np.full(100, 1e12)  # garbage for absent elements, as in fairchem's files
    coeff[[1, 6, 8]] = [-13.6, -1030.0, -2040.0]
    np.savez(tmp_path / "linref.npz", coeff=coeff)
    from_npz = compute_statistics(graphs, e0=tmp_path / "linref.npz")
    assert from_npz["e0"] == given["e0"]
    tdn.data.save_statistics(stats, tmp_path / "stats.json")
    assert tdn.data.load_statistics(tmp_path / "stats.json") == stats


def test_split_by_group_never_leaks_and_is_reproducible():
    groups = np.repeat(np.arange(40), np.random.default_rng(0).integers(1, 6, size=40))
    parts = split_indices(len(groups), {"train": None, "val": 0.2, "test": 4}, groups=groups, seed=7)
    sets = [set(groups[p]) for p in parts.values()]
    assert len(sets[1]) == 8 and len(sets[2]) == 4 and len(sets[0]) == 28
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(groups)))
    again = split_indices(len(groups), {"train": None, "val": 0.2, "test": 4}, groups=groups, seed=7)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = split_indices(len(groups), {"train": None, "val": 0.2, "test": 4}, groups=groups, seed=8)
    assert not np.array_equal(parts["val"], other["val"])
    plain = split_indices(100, {"train": None, "val": 10})
    assert len(plain["val"]) == 10 and len(plain["train"]) == 90
    with pytest.raises(ValueError):
        split_indices(10, {"train": None, "val": 1.5})


def test_batches_respect_caps():
    rng = np.random.default_rng(0)
    natoms = rng.integers(2, 40, size=200)
    nedges = natoms * rng.integers(5, 15, size=200)
    batches = pack_batches(rng.permutation(200), natoms, nedges, batch_size=None, max_atoms=100, max_edges=1200)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        assert len(b) == 1 or (natoms[b].sum() <= 100 and nedges[b].sum() <= 1200)


def test_sampler_shards_by_rank_with_equal_lengths():
    rng = np.random.default_rng(1)
    natoms = rng.integers(1, 30, size=101)
    dataset = list(range(101))
    per_rank = []
    for rank in range(3):
        sampler = BalancedBatchSampler(DistributedSampler(dataset, num_replicas=3, rank=rank), natoms,
                                       max_atoms=60, shuffle=True, seed=5)
        sampler.set_epoch(2)
        per_rank.append(list(sampler))
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of steps
    covered = {i for batches in per_rank for b in batches for i in b}
    assert covered == set(range(101))
    single = BalancedBatchSampler(SequentialSampler(dataset), natoms, max_atoms=60, shuffle=True, seed=5)
    single.set_epoch(2)
    first = list(single)
    assert sum(len(b) for b in first) == 101
    single.set_epoch(3)
    assert list(single) != first  # new epoch, new order ...
    single.set_epoch(2)
    assert list(single) == first  # ... reproducibly
    epochs = []
    for epoch in range(12):  # the batch count never changes, and every epoch covers everything
        single.set_epoch(epoch)
        batches = list(single)
        assert len(batches) == len(single) == len(first)
        assert sorted(i for b in batches for i in b) == list(range(101))
        assert all(len(b) == 1 or natoms[b].sum() <= 60 for b in batches)
        epochs.append(batches)
    assert len({str(b) for b in epochs}) == 12
    ordered = BalancedBatchSampler(SequentialSampler(dataset), None, batch_size=10)
    assert len(ordered) == 11 and list(ordered)[0] == list(range(10))
