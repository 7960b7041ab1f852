"""Per-atom stresses (ASE's ``stresses``) from the calculator's edge forces: they sum to the stress, the stress
matches finite strains and the model's own strain derivative, equivalent atoms share it equally, and the per-atom
split equals a direct computation from edge forces taken by finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress
from ase.stress import full_3x3_to_voigt_6_stress
from helpers import ase_graph, small_model
from syncs import count_syncs, matmul_calls

from tdn import TDNCalculator
from tdn.runtime import neighbor_list, shift_vectors

CUTOFF = 3.5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return small_model(elements=[13, 29], cutoff=CUTOFF)


def rattled(seed: int = 1):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.numbers[::3] = 13
    atoms.rattle(0.08, seed=seed)
    return atoms


def triclinic():
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 1))  # primitive fcc vectors: a non-orthogonal cell
    atoms.numbers[1] = 13
    atoms.rattle(0.05, seed=2)
    return atoms


@pytest.mark.parametrize("make", [rattled, triclinic], ids=["orthorhombic", "triclinic"])
def test_stresses_sum_to_the_stress_of_finite_strains(model, make):
    atoms = make()
    atoms.calc = TDNCalculator(model, default_dtype="float64")
    stresses = atoms.get_stresses()
    stress = atoms.get_stress()
    assert stresses.shape == (len(atoms), 6)
    assert np.abs(stresses).max() > 1e-4, "the test model must give per-atom stresses"
    assert np.abs(stresses.sum(axis=0) - stress).max() < 1e-12
    assert np.abs(stress - calculate_numerical_stress(atoms, eps=1e-5)).max() < 1e-7
    # ... and the model's own stress (a strain derivative of its forward pass, another code path)
    out = model(ase_graph(atoms, CUTOFF), compute_forces=True, compute_stress=True)
    assert np.abs(stress - full_3x3_to_voigt_6_stress(out["stress"][0].numpy())).max() < 1e-12
    assert np.abs(atoms.get_forces() - out["forces"].numpy()).max() < 1e-12


def test_equivalent_atoms_share_the_stress_equally(model):
    """In a perfect one-element crystal every atom is equivalent by a lattice translation: each gets stress / N."""
    atoms = bulk("Cu", "fcc", a=3.5, cubic=True).repeat((2, 1, 1))
    atoms.calc = TDNCalculator(model, default_dtype="float64")
    stresses, stress = atoms.get_stresses(), atoms.get_stress()
    assert np.abs(stress).max() > 1e-4
    assert np.abs(stresses - stress / len(atoms)).max() < 1e-12


def test_per_atom_split_matches_edge_finite_differences(model):
    """W_k = -1/2 sum over the edges of atom k of sym(r_e ⊗ dE/dr_e), with dE/dr_e by central differences of the
    model's energy in each edge vector (through its shift vector), assembled here in numpy; the forces too."""
    atoms = rattled(seed=3)
    calc = TDNCalculator(model, default_dtype="float64", skin=0.0)
    atoms.calc = calc
    pos = torch.tensor(atoms.positions)
    cell = torch.tensor(atoms.cell.array)
    edge_index, unit_shifts = neighbor_list(pos, cell, torch.tensor(atoms.pbc), CUTOFF, "vesin")
    shifts = shift_vectors(unit_shifts, cell)
    rows = model.element_index(torch.tensor(atoms.numbers))

    def energy(shift: torch.Tensor) -> float:
        with torch.no_grad():
            return float(model.node_energies(pos, rows, edge_index, shift).sum())

    h = 1e-5
    g = np.zeros((shifts.shape[0], 3))
    for e in range(shifts.shape[0]):
        for a in range(3):
            plus, minus = shifts.clone(), shifts.clone()
            plus[e, a] += h
            minus[e, a] -= h
            g[e, a] = (energy(plus) - energy(minus)) / (2 * h)
    sender, receiver = edge_index.numpy()
    vectors = atoms.positions[receiver] - atoms.positions[sender] + shifts.numpy()
    outer = vectors[:, :, None] * g[:, None, :]
    half = -0.25 * (outer + outer.transpose(0, 2, 1))  # half of -sym(r ⊗ g) per atom of the edge
    virials = np.zeros((len(atoms), 3, 3))
    np.add.at(virials, sender, half)
    np.add.at(virials, receiver, half)
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, sender, g)
    np.add.at(forces, receiver, -g)
    assert np.abs(g).max() > 1e-3
    expected = full_3x3_to_voigt_6_stress(-virials / atoms.get_volume())
    assert np.abs(atoms.get_stresses() - expected).max() < 1e-8
    assert np.abs(atoms.get_forces() - forces).max() < 1e-7


def test_stresses_need_a_periodic_cell(model):
    atoms = molecule("H2O")
    atoms.numbers[:] = 29
    atoms.calc = TDNCalculator(model, default_dtype="float64")
    with pytest.raises(PropertyNotImplementedError, match="stresses needs a fully periodic cell"):
        atoms.get_stresses()


def test_stresses_between_rebuilds_cost_one_transfer(model):
    atoms = rattled()
    atoms.calc = TDNCalculator(model, default_dtype="float64", skin=0.5)
    atoms.calc.exact_pairs = False  # the accelerator's path (the CPU default selects the pairs within the cutoff)
    atoms.get_stresses()
    atoms.positions += 0.02
    with count_syncs() as syncs:
        atoms.get_stresses()
    assert syncs.count <= 1, syncs.events
    with count_syncs() as syncs:  # computed with them: no new evaluation
        atoms.get_stress(), atoms.get_forces(), atoms.get_potential_energy()
    assert syncs.count == 0, syncs.events


def test_edge_force_geometry_never_uses_a_matmul(model):
    """Virials and per-atom virials are elementwise products and sums (no TF32 on a GPU)."""
    atoms = triclinic()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with matmul_calls() as calls:
            atoms.calc = TDNCalculator([model, small_model(1, elements=[13, 29], cutoff=CUTOFF)])
            atoms.get_stresses()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert calls, "the model itself does use matmuls: the recorder must see them"
    ours = ("tdn/calculator.py", "tdn/edge_forces.py", "tdn/committee.py")
    mine = [c for c in calls if c.caller.replace("\\", "/").rsplit(":", 1)[0].endswith(ours)]
    assert not mine, mine
