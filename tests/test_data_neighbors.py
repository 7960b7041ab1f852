"""Neighbour lists (vesin: numpy on the host, tensors on their device) against ASE's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list
from syncs import matmul_calls

from tdn.data import neighbors
from tdn.data.neighbors import (
    NeighborListError,
    neighbor_list,
    neighbor_list_device,
    neighbor_list_torch,
    sort_edges,
    sort_edges_torch,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def edge_set(sender, receiver, shifts) -> set:
    shifts = np.asarray(torch.as_tensor(shifts).cpu()).round().astype(int)
    return set(zip(np.asarray(sender).tolist(), np.asarray(receiver).tolist(), map(tuple, shifts.tolist())))


def reference(atoms: Atoms, cutoff: float) -> set:
    return edge_set(*ase_neighbor_list("ijS", atoms, cutoff))


def tensors(atoms: Atoms, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(atoms.positions, dtype=dtype), torch.tensor(atoms.cell.array, dtype=dtype), torch.tensor(
        atoms.pbc)


def all_paths(atoms: Atoms, cutoff: float, dtype=torch.float64, **kwargs) -> list:
    """The host list, the tensor list and the device path (on the CPU here: what runs on a GPU, but vesin's kernel)."""
    return [neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff, **kwargs),
            neighbor_list_torch(*tensors(atoms, dtype), cutoff, **kwargs),
            neighbor_list_device(*tensors(atoms, dtype), cutoff, **kwargs)]  # fmt: skip


def assert_same_lists(results: list) -> None:
    """Every path gives the same edges in the same order."""
    first = [np.asarray(torch.as_tensor(x)).round().astype(np.int64) for x in results[0]]
    for other in results[1:]:
        for a, b in zip(first, other):
            assert np.array_equal(a, np.asarray(torch.as_tensor(b)).round().astype(np.int64))


def assert_sorted_and_symmetric(sender, receiver, shifts):
    keys = list(zip(np.asarray(sender).tolist(), np.asarray(receiver).tolist(),
                    map(tuple, np.asarray(torch.as_tensor(shifts)).round().astype(int).tolist())))  # fmt: skip
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert set(keys) == {(j, i, (-a, -b, -c)) for i, j, (a, b, c) in keys}
    assert not any(i == j and s == (0, 0, 0) for i, j, s in keys)


def check(atoms: Atoms, cutoff: float, **kwargs) -> list:
    """All paths equal ASE's list (as a set), equal each other (in order), sorted and symmetric."""
    results = all_paths(atoms, cutoff, **kwargs)
    expected = reference(atoms, cutoff)
    for result in results:
        assert edge_set(*result) == expected, (atoms.cell.array, atoms.pbc, cutoff)
    assert_same_lists(results)
    assert_sorted_and_symmetric(*results[0])
    return results


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


# ---------------------------------------------------------------------------------------------- against ASE
@pytest.mark.parametrize("seed", [0, 1])
def test_random_skewed_cells_of_any_periodicity_match_ase(seed):
    for atoms, cutoff in random_cases(seed, 60):
        check(atoms, cutoff)


def test_small_cell_atom_sees_its_own_images():
    atoms = bulk("Cu", "fcc", a=3.6)  # one atom, 2.5 Å nearest-neighbour distance: the cell is shorter than 5 Å
    cutoff = 5.0
    check(atoms, cutoff)
    ref = reference(atoms, cutoff)
    assert all(i == j == 0 for i, j, _ in ref) and (0, 0, (0, 0, 0)) not in ref
    assert len(ref) == 42  # 12 + 6 + 24 neighbours within 5 Å in fcc Cu
    sheared = Atoms("Cu2", positions=[(0, 0, 0), (1.2, 0.7, 0.9)], cell=[[2.1, 0, 0], [1.9, 1.3, 0], [0.4, 1.1, 2.3]],
                    pbc=True)
    check(sheared, 4.0)


def test_thin_skewed_cells_with_many_images_match_ase():
    """Cells thinner than the cutoff along some or all axes: an atom meets its own images, a pair many images."""
    for atoms, cutoff in random_cases(11, 40, scale=(0.8, 2.5), atoms=(1, 5), cutoff=(3.0, 6.0), spread=10.0):
        check(atoms, cutoff)
    hexagonal = Atoms("C", cell=[[1.0, 0, 0], [-0.5, 0.866, 0], [0, 0, 1.2]], pbc=True)  # 120 degrees, 1 atom
    check(hexagonal, 4.0)


def test_molecules_match_ase_anywhere():
    mol = molecule("CH3CH2OH")
    mol.cell = np.zeros((3, 3))
    check(mol, 3.0)
    rng = np.random.default_rng(3)
    for shape in [(1, 1, 1), (1, 1, 0), (0, 1, 0), (0, 0, 0)]:  # 3D, planar, linear, all atoms on one point
        for offset in ([1e3, -2e3, 5.0], [-50.0, -60.0, -70.0]):  # far from the origin; all coordinates negative
            positions = rng.normal(size=(80, 3)) * 4.0 * np.array(shape) + offset
            positions[7] = positions[8]  # two atoms on the same spot are neighbours
            check(Atoms(numbers=[1] * 80, positions=positions), 2.5)
    boxed = Atoms(numbers=[1] * 50, positions=rng.normal(size=(50, 3)) * 3, cell=[[2.0, 0, 0], [1, 2, 0], [0, 1, 2]])
    check(boxed, 3.0)  # pbc False: the cell is ignored
    assert all(len(r[0]) == 0 for r in all_paths(Atoms("H", positions=[[1e5, 0, 0]]), 3.0))


def test_slabs_and_wires_match_ase():
    slab = fcc111("Pt", size=(2, 2, 3), vacuum=5.0)  # pbc T T F
    check(slab, 6.0)
    no_c = slab.copy()
    no_c.cell[2] = 0.0  # a slab need not have a c vector
    for result in all_paths(no_c, 6.0):
        assert edge_set(*result) == reference(slab, 6.0)
    big = fcc111("Cu", size=(6, 6, 4), vacuum=8.0, a=3.6)  # 144 atoms
    big.rattle(0.05, seed=5)
    big.positions[::7] += big.cell[0] * 2 - big.cell[1]  # some atoms outside the cell
    check(big, 5.5)
    rng = np.random.default_rng(6)
    for pbc, cell in [
        ((True, True, False), [[3.0, 0, 0], [1.5, 2.6, 0], [2.0, 3.0, 1.0]]),  # non-orthogonal c, not periodic
        ((False, True, False), [[0, 0, 0], [0.3, 2.2, 0.5], [0, 0, 0]]),  # a wire, thinner than the cutoff
        ((True, False, True), [[4.0, 0.0, 1.0], [0, 0, 0], [0.5, 0.0, 1.5]]),
    ]:
        check(Atoms(numbers=[1] * 40, positions=rng.normal(size=(40, 3)) * 3, cell=cell, pbc=pbc), 4.5)


def test_large_triclinic_box_with_unwrapped_atoms_matches_ase():
    rng = np.random.default_rng(8)
    cell = np.array([[27.0, 0, 0], [4.0, 26.0, 0], [-3.0, 5.0, 25.0]])
    atoms = Atoms(numbers=[1] * 2000, scaled_positions=rng.random((2000, 3)), cell=cell, pbc=True)
    atoms.positions[::5] += rng.integers(-3, 4, size=(400, 1)) * cell[2]  # unwrapped, as in MD
    atoms.positions[:100] = atoms.positions[100:200] + rng.normal(size=(100, 3)) * 0.3  # clusters: uneven cells
    got = check(atoms, 5.0)[1]
    got32 = neighbor_list_torch(*tensors(atoms, torch.float32), 5.0)
    assert got32[2].dtype == torch.float32
    assert len(edge_set(*got32) ^ edge_set(*got)) <= 4  # float32 positions: at most pairs within rounding


# ---------------------------------------------------------------------------------------------- conventions
def test_edge_vector_convention_and_order():
    atoms = bulk("NaCl", "rocksalt", a=5.6) * (1, 1, 2)
    atoms.rattle(0.1, seed=3)
    sender, receiver, shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 4.5)
    assert sender.dtype == receiver.dtype == shifts.dtype == np.int64
    vectors = atoms.positions[receiver] - atoms.positions[sender] + shifts @ atoms.cell.array
    assert np.all(np.linalg.norm(vectors, axis=1) < 4.5)
    _, _, ase_d = ase_neighbor_list("ijd", atoms, 4.5)
    assert np.allclose(np.sort(np.linalg.norm(vectors, axis=1)), np.sort(ase_d))
    t_sender, t_receiver, t_shifts = neighbor_list_torch(*tensors(atoms), 4.5)
    assert t_sender.dtype == torch.long and t_shifts.dtype == torch.float64
    assert t_sender.tolist() == sender.tolist() and t_receiver.tolist() == receiver.tolist()
    assert torch.equal(t_shifts, torch.tensor(shifts, dtype=torch.float64))


def test_max_neighbors_keeps_nearest_per_receiver():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    full = neighbor_list(atoms.positions, atoms.cell.array, True, 5.0)
    results = all_paths(atoms, 5.0, max_neighbors=12)
    assert_same_lists(results)
    capped = results[0]
    assert np.bincount(capped[1]).tolist() == [12] * len(atoms)
    d_full = np.linalg.norm(atoms.positions[full[1]] - atoms.positions[full[0]] + full[2] @ atoms.cell.array, axis=1)
    d_cap = np.linalg.norm(atoms.positions[capped[1]] - atoms.positions[capped[0]] + capped[2] @ atoms.cell.array,
                           axis=1)
    for j in range(len(atoms)):
        assert np.allclose(np.sort(d_cap[capped[1] == j]), np.sort(d_full[full[1] == j])[:12])


def test_empty_inputs_and_bad_cells():
    for result in all_paths(Atoms(cell=np.eye(3), pbc=True), 3.0):
        assert all(len(x) == 0 for x in result)
    assert len(neighbor_list(np.zeros((2, 3)), np.eye(3), True, 0.0)[0]) == 0
    with pytest.raises(ValueError, match="zero cell vector"):
        neighbor_list(np.zeros((1, 3)), np.zeros((3, 3)), True, 3.0)
    with pytest.raises(ValueError, match="zero cell vector"):
        neighbor_list_device(torch.zeros(1, 3), torch.zeros(3, 3), True, 3.0)
    with pytest.raises(ValueError, match="non-finite"):
        neighbor_list(np.array([[0.0, np.nan, 0.0]]), np.eye(3) * 5, True, 3.0)
    with pytest.raises(ValueError, match="non-finite"):
        neighbor_list_device(torch.tensor([[0.0, 0.0, np.inf]]), torch.eye(3) * 5, True, 3.0)


def test_both_sorts_give_the_lexicographic_order(monkeypatch):
    """The int64-key sort (numpy and torch) and the lexicographic fallback (keys too wide for an int64)."""
    rng = np.random.default_rng(4)
    sender, receiver = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    shifts = rng.integers(-3, 4, (500, 3))
    shifts[0] = [40, -50, 2]  # a wide range of shifts
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], receiver, sender))
    expected = (sender[order], receiver[order], shifts[order])
    for limit in (neighbors._PACKED_LIMIT, 0):
        monkeypatch.setattr(neighbors, "_PACKED_LIMIT", limit)
        got = sort_edges(sender, receiver, shifts, 7)
        got_t = sort_edges_torch(*(torch.from_numpy(x) for x in (sender, receiver, shifts)), 7)
        for a, b, c in zip(expected, got, got_t):
            assert np.array_equal(a, b) and np.array_equal(a, c.numpy())


def test_device_path_geometry_never_uses_a_matmul():
    """A float32 matmul may run in TF32 on a GPU (about 5e-4 relative error): the device path's extent check and
    the distances of ``max_neighbors`` are elementwise products and sums."""
    slab = fcc111("Pt", size=(2, 2, 3), vacuum=5.0)
    cases = [(atoms, cutoff) for atoms, cutoff in random_cases(7, 12)] + [(slab, 6.0), (molecule("CH3CH2OH"), 3.0)]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with matmul_calls() as calls:
            results = [neighbor_list_device(*tensors(atoms, torch.float32), cutoff, max_neighbors=8)
                       for atoms, cutoff in cases]  # fmt: skip
    finally:
        torch.set_float32_matmul_precision(previous)
    assert not calls, calls
    for (atoms, cutoff), result in zip(cases, results):
        assert len(result[0]) == len(neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff,
                                                   max_neighbors=8)[0])  # fmt: skip


# ---------------------------------------------------------------------------------------------- vesin's limits
def test_split_into_pieces_is_exact(monkeypatch):
    """Inputs vesin would crash or crawl on are split along non-periodic axes into pieces with the atoms within the
    cutoff of each piece's own: with lower limits, ordinary slabs and molecules are split, and nothing changes."""
    monkeypatch.setattr(neighbors, "VESIN_MIXED_WORK", 0.0)  # every mixed-periodic input counts as slow
    monkeypatch.setattr(neighbors, "VESIN_MAX_CELLS", 8.0)  # a long or flat molecule counts as a crash
    monkeypatch.setattr(neighbors, "SPLIT_MIN_CELLS", 2)
    calls = []
    vesin = neighbors._vesin
    monkeypatch.setattr(neighbors, "_vesin", lambda *args: calls.append(len(args[0])) or vesin(*args))
    slab = fcc111("Cu", size=(4, 4, 6), vacuum=8.0, a=3.6)
    slab.rattle(0.05, seed=5)
    rng = np.random.default_rng(2)
    chain = Atoms(numbers=[1] * 300, positions=np.c_[np.arange(300) * 0.9, rng.normal(size=(300, 2))])
    flake = Atoms(numbers=[1] * 400, positions=rng.random((400, 3)) * [30.0, 30.0, 1.0])
    for atoms, cutoff in [(slab, 4.0), (chain, 3.0), (flake, 3.0)]:
        calls.clear()
        check(atoms, cutoff)
        assert len(calls) > 3 * 3 and max(calls) < len(atoms), calls  # several smaller pieces, for each of 3 paths


def test_a_periodic_cell_vesin_cannot_take_is_refused_before_it_runs(monkeypatch):
    monkeypatch.setattr(neighbors, "_vesin", lambda *args: pytest.fail("vesin must not run"))
    atoms = Atoms("CO", positions=[[0, 0, 0], [1.0, 1.0, 2.0]], cell=[[1e6, 0, 0], [0, 3, 0], [0, 0, 3]], pbc=True)
    for build in (lambda: neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 3.5),
                  lambda: neighbor_list_device(*tensors(atoms), 3.5)):  # fmt: skip
        with pytest.raises(NeighborListError, match=r"1e\+06 x 3 x 3 Å wide .* SIGFPE"):
            build()
    assert issubclass(NeighborListError, ValueError)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_neighbor_list_on_gpu_matches_the_cpu():
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
