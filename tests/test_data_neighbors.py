"""Neighbour lists (vesin on the CPU, pure torch for device tensors) against ASE's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list
from syncs import matmul_calls

from tdn.data import neighbors
from tdn.data.neighbors import _brute_force, neighbor_list, neighbor_list_torch

pytestmark = pytest.mark.usefixtures("one_thread")


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


def torch_list(atoms: Atoms, cutoff: float, dtype=torch.float64, **kwargs):
    return neighbor_list_torch(torch.tensor(atoms.positions, dtype=dtype), torch.tensor(atoms.cell.array, dtype=dtype),
                               atoms.pbc, cutoff, **kwargs)


def random_cases(seed: int, count: int, scale=(1.5, 6.0), atoms=(1, 10), cutoff=(1.0, 5.0), spread=4.0):
    rng = np.random.default_rng(seed)
    while count:
        cell = rng.normal(size=(3, 3)) * rng.uniform(*scale)
        if abs(np.linalg.det(cell)) < 0.3 * np.prod(np.linalg.norm(cell, axis=1)):
            continue  # too degenerate for a fair test; skew is still large
        n = int(rng.integers(*atoms))
        pbc = rng.random(3) < 0.75
        positions = rng.normal(size=(n, 3)) * spread  # not wrapped into the cell on purpose
        yield Atoms(numbers=[1] * n, positions=positions, cell=cell, pbc=pbc), float(rng.uniform(*cutoff))
        count -= 1


def assert_sorted_and_symmetric(sender, receiver, shifts):
    keys = list(zip(sender.tolist(), receiver.tolist(), map(tuple, torch.as_tensor(shifts).long().tolist())))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert set(keys) == {(j, i, (-a, -b, -c)) for i, j, (a, b, c) in keys}
    assert not any(i == j and s == (0, 0, 0) for i, j, s in keys)


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


# ---------------------------------------------------------------------------------------------- cell list
def test_cell_list_equals_brute_force_exactly():
    """Same edges in the same order as the O(N^2) reference, on skewed cells of any pbc, chunked or not."""
    for k, (atoms, cutoff) in enumerate(random_cases(7, 40, scale=(2.0, 9.0), atoms=(1, 60), cutoff=(0.5, 6.0))):
        expected = _brute_force(torch.tensor(atoms.positions), torch.tensor(atoms.cell.array), atoms.pbc, cutoff)
        got = torch_list(atoms, cutoff, max_pairs_per_chunk=[1 << 22, 1, 97][k % 3])
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), (atoms.cell.array, atoms.pbc, cutoff)
        assert_sorted_and_symmetric(*got)


def test_thin_skewed_cells_with_many_images_match_ase():
    """Cells thinner than the cutoff along some or all axes: an atom meets its own images, a pair many images."""
    for atoms, cutoff in random_cases(11, 40, scale=(0.8, 2.5), atoms=(1, 5), cutoff=(3.0, 6.0), spread=10.0):
        got = torch_list(atoms, cutoff)
        assert edge_set(*got) == reference(atoms, cutoff), (atoms.cell.array, atoms.pbc, cutoff)
        assert_sorted_and_symmetric(*got)
    hexagonal = Atoms("C", cell=[[1.0, 0, 0], [-0.5, 0.866, 0], [0, 0, 1.2]], pbc=True)  # 120 degrees, 1 atom
    assert edge_set(*torch_list(hexagonal, 4.0)) == reference(hexagonal, 4.0)


def test_molecules_are_binned_in_their_bounding_box():
    rng = np.random.default_rng(3)
    for shape in [(1, 1, 1), (1, 1, 0), (0, 1, 0), (0, 0, 0)]:  # 3D, planar, linear, all atoms on one point
        positions = rng.normal(size=(80, 3)) * 4.0 * np.array(shape) + [1e3, -2e3, 5.0]  # far from the origin
        positions[7] = positions[8]  # two atoms on the same spot are neighbours
        mol = Atoms(numbers=[1] * 80, positions=positions)  # zero cell
        assert edge_set(*torch_list(mol, 2.5)) == reference(mol, 2.5)
    boxed = Atoms(numbers=[1] * 50, positions=rng.normal(size=(50, 3)) * 3, cell=[[2.0, 0, 0], [1, 2, 0], [0, 1, 2]])
    assert edge_set(*torch_list(boxed, 3.0)) == reference(boxed, 3.0)  # pbc False: the cell is ignored
    assert len(torch_list(Atoms("H", positions=[[1e5, 0, 0]]), 3.0)[0]) == 0


def test_mixed_pbc_slabs_and_wires():
    slab = fcc111("Cu", size=(6, 6, 4), vacuum=8.0, a=3.6)  # pbc T T F, 144 atoms
    slab.rattle(0.05, seed=5)
    slab.positions[::7] += slab.cell[0] * 2 - slab.cell[1]  # some atoms outside the cell
    assert edge_set(*torch_list(slab, 5.5)) == reference(slab, 5.5)
    rng = np.random.default_rng(6)
    for pbc, cell in [
        ((True, True, False), [[3.0, 0, 0], [1.5, 2.6, 0], [2.0, 3.0, 1.0]]),  # non-orthogonal c, not periodic
        ((False, True, False), [[0, 0, 0], [0.3, 2.2, 0.5], [0, 0, 0]]),  # a wire, thinner than the cutoff
        ((True, False, True), [[4.0, 0.0, 1.0], [0, 0, 0], [0.5, 0.0, 1.5]]),
    ]:
        atoms = Atoms(numbers=[1] * 40, positions=rng.normal(size=(40, 3)) * 3, cell=cell, pbc=pbc)
        got = torch_list(atoms, 4.5)
        assert edge_set(*got) == reference(atoms, 4.5), pbc
        assert_sorted_and_symmetric(*got)


def test_large_triclinic_box_matches_ase_and_vesin():
    rng = np.random.default_rng(8)
    cell = np.array([[27.0, 0, 0], [4.0, 26.0, 0], [-3.0, 5.0, 25.0]])
    atoms = Atoms(numbers=[1] * 2000, scaled_positions=rng.random((2000, 3)), cell=cell, pbc=True)
    atoms.positions[::5] += rng.integers(-3, 4, size=(400, 1)) * cell[2]  # unwrapped, as in MD
    atoms.positions[:100] = atoms.positions[100:200] + rng.normal(size=(100, 3)) * 0.3  # clusters: uneven bins
    got = torch_list(atoms, 5.0)
    assert edge_set(*got) == reference(atoms, 5.0)
    cpu = neighbor_list(atoms.positions, cell, True, 5.0)
    assert got[0].tolist() == cpu[0].tolist() and got[1].tolist() == cpu[1].tolist()
    assert np.array_equal(got[2].long().numpy(), cpu[2])
    assert_sorted_and_symmetric(*got)
    got32 = torch_list(atoms, 5.0, dtype=torch.float32)
    assert len(edge_set(*got32) ^ edge_set(*got)) <= 4  # float32: at most pairs within rounding of the cutoff


def test_sort_without_packed_keys(monkeypatch):
    """Positions very far from the cell widen the shift codes: the (sender, receiver, shift) sort falls back."""
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    atoms.rattle(0.05, seed=9)
    expected = torch_list(atoms, 5.0)
    monkeypatch.setattr(neighbors, "_PACKED_LIMIT", 0)
    got = torch_list(atoms, 5.0)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    capped = torch_list(atoms, 5.0, max_neighbors=12)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(capped, torch_list(atoms, 5.0, max_neighbors=12)))


def test_torch_list_geometry_never_uses_a_matmul():
    """A float32 matmul may run in TF32 on a GPU (about 5e-4 relative error, enough to bin atoms wrongly and miss
    pairs near the cutoff): fractional coordinates and shifts are elementwise products and sums."""
    slab = fcc111("Pt", size=(2, 2, 3), vacuum=5.0)
    cases = [(atoms, cutoff) for atoms, cutoff in random_cases(7, 12)] + [(slab, 6.0), (molecule("CH3CH2OH"), 3.0)]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with matmul_calls() as calls:
            for atoms, cutoff in cases:
                torch_list(atoms, cutoff, dtype=torch.float32)
            results = [torch_list(atoms, cutoff) for atoms, cutoff in cases]  # float64: comparable with ASE's
    finally:
        torch.set_float32_matmul_precision(previous)
    assert not calls, calls
    for (atoms, cutoff), result in zip(cases, results):
        assert edge_set(*result) == reference(atoms, cutoff), (atoms.cell.array, atoms.pbc, cutoff)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_torch_neighbor_list_on_gpu():
    atoms = bulk("Cu", "fcc", a=3.6) * (4, 4, 4)
    atoms.rattle(0.05, seed=4)
    positions = torch.tensor(atoms.positions, device="cuda")
    out = neighbor_list_torch(positions, torch.tensor(atoms.cell.array, device="cuda"), True, 5.0)
    assert out[0].is_cuda and edge_set(out[0].cpu(), out[1].cpu(), out[2].cpu()) == reference(atoms, 5.0)
    cpu = neighbor_list_torch(positions.cpu(), torch.tensor(atoms.cell.array), True, 5.0, max_neighbors=20)
    gpu = neighbor_list_torch(positions, torch.tensor(atoms.cell.array, device="cuda"), True, 5.0, max_neighbors=20)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
    slab = fcc111("Pt", size=(4, 4, 3), vacuum=5.0)
    mol = molecule("CH3CH2OH")
    for atoms, cutoff in [(slab, 6.0), (mol, 3.0), (Atoms("H", cell=[1.5, 1.5, 1.5], pbc=True), 4.0)]:
        out = neighbor_list_torch(torch.tensor(atoms.positions, device="cuda", dtype=torch.float32),
                                  torch.tensor(atoms.cell.array, device="cuda", dtype=torch.float32), atoms.pbc, cutoff)
        assert edge_set(out[0].cpu(), out[1].cpu(), out[2].cpu()) == reference(atoms, cutoff)
