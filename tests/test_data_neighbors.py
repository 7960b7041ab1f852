"""Neighbour lists (vesin on the CPU, pure torch for device tensors) against ASE's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from tdn.data.neighbors import neighbor_list, neighbor_list_torch


def edge_set(sender, receiver, shifts) -> set:
    shifts = np.asarray(torch.as_tensor(shifts).cpu()).round().astype(int)
    return set(zip(np.asarray(sender).tolist(), np.asarray(receiver).tolist(), map(tuple, shifts.tolist())))


def reference(atoms: Atoms, cutoff: float) -> set:
    return edge_set(*ase_neighbor_list("ijS", atoms, cutoff))


def both(atoms: Atoms, cutoff: float, dtype=torch.float64) -> tuple[set, set]:
    cpu = edge_set(*neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff))
    dev = edge_set(*neighbor_list_torch(torch.tensor(atoms.positions, dtype=dtype),
                                        torch.tensor(atoms.cell.array, dtype=dtype), atoms.pbc, cutoff))
    return cpu, dev


def random_cases(seed: int, count: int):
    rng = np.random.default_rng(seed)
    while count:
        cell = rng.normal(size=(3, 3)) * rng.uniform(1.5, 6.0)
        if abs(np.linalg.det(cell)) < 0.3 * np.prod(np.linalg.norm(cell, axis=1)):
            continue  # too degenerate for a fair test; skew is still large
        n = int(rng.integers(1, 10))
        pbc = rng.random(3) < 0.75
        positions = rng.normal(size=(n, 3)) * 4.0  # not wrapped into the cell on purpose
        yield Atoms(numbers=[1] * n, positions=positions, cell=cell, pbc=pbc), float(rng.uniform(1.0, 5.0))
        count -= 1


@pytest.mark.parametrize("seed", [0, 1])
def test_random_skewed_cells_match_ase(seed):
    for atoms, cutoff in random_cases(seed, 60):
        ref = reference(atoms, cutoff)
        cpu, dev = both(atoms, cutoff)
        assert cpu == ref and dev == ref, (atoms.cell.array, atoms.pbc, cutoff)


def test_small_cell_atom_sees_its_own_images():
    atoms = bulk("Cu", "fcc", a=3.6)  # one atom, 2.5 Å nearest-neighbour distance
    cutoff = 5.0
    ref = reference(atoms, cutoff)
    cpu, dev = both(atoms, cutoff)
    assert cpu == ref == dev
    assert all(i == j == 0 for i, j, _ in ref) and (0, 0, (0, 0, 0)) not in ref
    assert len(ref) == 42  # 12 + 6 + 24 neighbours within 5 Å in fcc Cu
    sheared = Atoms("Cu2", positions=[(0, 0, 0), (1.2, 0.7, 0.9)], cell=[[2.1, 0, 0], [1.9, 1.3, 0], [0.4, 1.1, 2.3]],
                    pbc=True)
    assert both(sheared, 4.0) == (reference(sheared, 4.0),) * 2


def test_molecule_and_slab():
    mol = molecule("CH3CH2OH")
    mol.cell = np.zeros((3, 3))
    assert both(mol, 3.0) == (reference(mol, 3.0),) * 2
    slab = fcc111("Pt", size=(2, 2, 3), vacuum=5.0)  # pbc T T F
    assert both(slab, 6.0) == (reference(slab, 6.0),) * 2
    slab.cell[2] = 0.0  # a slab need not have a c vector
    cpu, dev = both(slab, 6.0)
    assert cpu == dev == reference(fcc111("Pt", size=(2, 2, 3), vacuum=5.0), 6.0)


def test_edge_vector_convention_and_order():
    atoms = bulk("NaCl", "rocksalt", a=5.6) * (1, 1, 2)
    atoms.rattle(0.1, seed=3)
    sender, receiver, shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 4.5)
    vectors = atoms.positions[receiver] - atoms.positions[sender] + shifts @ atoms.cell.array
    assert np.all(np.linalg.norm(vectors, axis=1) < 4.5)
    _, _, ase_d = ase_neighbor_list("ijd", atoms, 4.5)
    assert np.allclose(np.sort(np.linalg.norm(vectors, axis=1)), np.sort(ase_d))
    keys = list(zip(sender.tolist(), receiver.tolist(), map(tuple, shifts.tolist())))
    assert keys == sorted(keys)
    t_sender, t_receiver, t_shifts = neighbor_list_torch(torch.tensor(atoms.positions), torch.tensor(atoms.cell.array),
                                                         torch.tensor(atoms.pbc), 4.5)
    assert t_sender.tolist() == sender.tolist() and t_receiver.tolist() == receiver.tolist()
    assert torch.equal(t_shifts, torch.tensor(shifts, dtype=torch.float64))


def test_max_neighbors_keeps_nearest_per_receiver():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    full = neighbor_list(atoms.positions, atoms.cell.array, True, 5.0)
    capped = neighbor_list(atoms.positions, atoms.cell.array, True, 5.0, max_neighbors=12)
    capped_t = neighbor_list_torch(torch.tensor(atoms.positions), torch.tensor(atoms.cell.array), True, 5.0,
                                   max_neighbors=12)
    assert np.bincount(capped[1]).tolist() == [12] * len(atoms)
    assert edge_set(*capped) == edge_set(*capped_t)
    d_full = np.linalg.norm(atoms.positions[full[1]] - atoms.positions[full[0]] + full[2] @ atoms.cell.array, axis=1)
    d_cap = np.linalg.norm(atoms.positions[capped[1]] - atoms.positions[capped[0]] + capped[2] @ atoms.cell.array,
                           axis=1)
    for j in range(len(atoms)):
        assert np.allclose(np.sort(d_cap[capped[1] == j]), np.sort(d_full[full[1] == j])[:12])


def test_float32_chunking_and_edge_cases():
    atoms = bulk("Cu", "fcc", a=3.6) * (3, 3, 3)
    atoms.rattle(0.05, seed=2)
    ref = reference(atoms, 4.0)
    out = neighbor_list_torch(torch.tensor(atoms.positions, dtype=torch.float32),
                              torch.tensor(atoms.cell.array, dtype=torch.float32), True, 4.0, max_pairs_per_chunk=500)
    assert out[2].dtype == torch.float32 and edge_set(*out) == ref
    empty = neighbor_list(np.zeros((0, 3)), np.eye(3), True, 3.0)
    assert all(len(x) == 0 for x in empty)
    assert len(neighbor_list_torch(torch.zeros(0, 3), torch.eye(3), True, 3.0)[0]) == 0
    with pytest.raises(ValueError, match="zero cell vector"):
        neighbor_list(np.zeros((1, 3)), np.zeros((3, 3)), True, 3.0)
    with pytest.raises(ValueError, match="zero cell vector"):
        neighbor_list_torch(torch.zeros(1, 3), torch.zeros(3, 3), True, 3.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_torch_neighbor_list_on_gpu():
    atoms = bulk("Cu", "fcc", a=3.6) * (4, 4, 4)
    atoms.rattle(0.05, seed=4)
    positions = torch.tensor(atoms.positions, device="cuda")
    out = neighbor_list_torch(positions, torch.tensor(atoms.cell.array, device="cuda"), True, 5.0)
    assert out[0].is_cuda and edge_set(out[0].cpu(), out[1].cpu(), out[2].cpu()) == reference(atoms, 5.0)
