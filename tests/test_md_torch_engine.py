"""``tdn-md --engine torch``: torch-sim's integrators on one structure (tdn.integrations.torchsim_md), against ASE's
velocity Verlet and TorchDynamics, and the structures that go to TorchDynamics instead (constraints, slabs, wires,
no torch-sim)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, fcc111, molecule
from ase.constraints import FixAtoms
from ase.md.verlet import VelocityVerlet

from tdn import TDNCalculator
from tdn.dynamics import TorchDynamics
from tdn.md import MDSettings, build_dynamics, initialise_velocities
from tdn.models import build_model

pytest.importorskip("torch_sim")
from tdn.integrations.torchsim_md import TorchSimDynamics, torch_sim_cannot_run  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread")]

ELEMENTS = [1, 6, 8, 13, 29]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tp="cp", preset="tiny", elements=ELEMENTS, cutoff=3.5, avg_num_neighbors=10.0, dtype="float64")


def cu_al(temperature: float = 600.0) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.numbers[::3] = 13
    atoms.rattle(0.08, seed=1)
    initialise_velocities(atoms, temperature, 1)
    return atoms


def engine(model, atoms: Atoms, dtype: str = "float64", **settings):
    atoms.calc = TDNCalculator(model, default_dtype=dtype)
    return build_dynamics(atoms, MDSettings(**settings), engine="torch")


def test_structures_torch_sim_cannot_run_go_to_torch_dynamics(model, monkeypatch):
    assert isinstance(engine(model, cu_al()), TorchSimDynamics)
    assert isinstance(engine(model, molecule("CH3CH2OH")), TorchSimDynamics)
    fixed = cu_al()
    fixed.set_constraint(FixAtoms(indices=[0]))
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0, a=3.6)
    assert "constraints" in torch_sim_cannot_run(fixed) and "periodicity" in torch_sim_cannot_run(slab)
    for atoms in (fixed, slab):
        assert isinstance(engine(model, atoms), TorchDynamics)
    with pytest.raises(ValueError, match="torch-sim cannot run this structure: torch-sim has no constraints"):
        TorchSimDynamics(None, fixed, None, None, timestep=1.0)
    monkeypatch.setitem(sys.modules, "torch_sim", None)  # not installed
    assert "not installed" in torch_sim_cannot_run(cu_al())
    assert isinstance(engine(model, cu_al()), TorchDynamics)


@pytest.mark.parametrize("make", [cu_al, lambda: molecule("CH3CH2OH")], ids=["periodic", "molecule"])
def test_nve_is_ase_velocity_verlet(model, make):
    atoms = make()
    if not atoms.pbc.any():
        initialise_velocities(atoms, 300.0, 0)
    reference = atoms.copy()
    reference.calc = TDNCalculator(model, default_dtype="float64")
    VelocityVerlet(reference, timestep=0.5 * units.fs).run(12)
    dyn = engine(model, atoms, timestep=0.5)
    dyn.run(12)
    dyn.sync_atoms()
    assert dyn.nsteps == 12 and dyn.state.positions.dtype == torch.float64
    reference.wrap()  # torch-sim wraps periodic positions into the cell
    assert np.abs(atoms.positions - reference.positions).max() < 1e-9
    assert np.abs(atoms.get_velocities() - reference.get_velocities()).max() < 1e-9
    assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-9)
    assert np.abs(atoms.get_forces() - reference.get_forces()).max() < 1e-9


def test_float32_model_is_integrated_in_float64_as_torch_dynamics_does(model):
    """The state is float64 and the float32 model sees float32 positions: the run follows TorchDynamics' (same
    velocity Verlet, same float32 forces) far closer than float32 positions could."""
    atoms = cu_al()
    dyn = engine(model, atoms.copy(), dtype="float32", timestep=1.0)
    assert dyn.model.dtype == torch.float64 and next(dyn.model.model.parameters()).dtype == torch.float32
    reference = TorchDynamics(TDNCalculator(model, default_dtype="float32"), atoms.copy(), 1.0)
    dyn.run(20)
    reference.run(20)
    mine, theirs = dyn.sync_atoms(), reference.sync_atoms()
    theirs.wrap()
    assert np.abs(mine.positions - theirs.positions).max() < 1e-6
    assert np.abs(mine.get_velocities() - theirs.get_velocities()).max() < 1e-6
    assert np.abs(mine.positions - atoms.positions).max() > 1e-2  # it moved


def test_langevin_is_seeded_and_thermostats(model):
    def run(seed: int, steps: int = 10, **settings) -> TorchSimDynamics:
        dyn = engine(model, cu_al(temperature=0.0), ensemble="nvt-langevin", seed=seed, **settings)
        dyn.run(steps)
        return dyn

    first = run(3).sync_atoms().positions
    assert np.array_equal(first, run(3).sync_atoms().positions)
    assert np.abs(first - run(4).sync_atoms().positions).max() > 1e-8
    hot = run(0, steps=120, temperature=1000.0, friction=0.1)
    assert hot.sync_atoms().get_temperature() > 300  # from 0 K towards 1000 K


def test_observers_see_fresh_results_through_the_calculator(model):
    atoms = molecule("CH3CH2OH")
    initialise_velocities(atoms, 300.0, 0)
    dyn = engine(model, atoms, timestep=0.5)
    calc = atoms.calc
    seen = []
    dyn.attach(lambda: seen.append((dyn.nsteps, atoms.get_potential_energy(), atoms.get_forces().copy())), 2)
    dyn.run(4)
    assert [step for step, _, _ in seen] == [0, 2, 4] and atoms.calc is calc
    probe = atoms.copy()
    probe.calc = TDNCalculator(model, default_dtype="float64", skin=0.0)
    assert seen[-1][1] == pytest.approx(probe.get_potential_energy(), abs=1e-10)
    assert np.abs(seen[-1][2] - probe.get_forces()).max() < 1e-10
    assert seen[0][1] != seen[-1][1]
