"""TorchDynamics (tdn.dynamics): the device-resident MD engine against ASE's integrators, the skin list fed whole
to the model, the rebuild rule and its missed-rebuild alarm, Langevin, and ``tdn-md --engine torch``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.constraints import FixAtoms, FixBondLength
from ase.io import read
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet

import tdn
from tdn import TDNCalculator
from tdn.dynamics import TorchDynamics
from tdn.md import MDSettings, build_dynamics, initialise_velocities, main, read_log
from tdn.models import build_model

pytestmark = [pytest.mark.usefixtures("one_thread")]

ELEMENTS = [1, 6, 8, 13, 29]
CUTOFF = 3.5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    """An untrained tiny float64 model with smooth, non-zero forces (shared: the engine only reads it)."""
    torch.manual_seed(0)
    return build_model(
        tp="cp", preset="tiny", elements=ELEMENTS, cutoff=CUTOFF, avg_num_neighbors=10.0, dtype="float64"
    )


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dyn_model") / "tiny.pt"
    tdn.save_model(model, path)
    return path


def cu_al(repeat=(2, 1, 1), temperature: float = 600.0, seed: int = 1) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
    atoms.numbers[::3] = 13
    atoms.rattle(0.08, seed=seed)
    initialise_velocities(atoms, temperature, seed)
    return atoms


def ethanol() -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=0)
    initialise_velocities(atoms, 300.0, 0)
    return atoms


def engine(model, atoms: Atoms, **kwargs) -> TorchDynamics:
    kwargs.setdefault("dtype", "float64")
    return TorchDynamics(model, atoms, kwargs.pop("timestep", 1.0), **kwargs)


def exact(model, atoms: Atoms) -> tuple[float, np.ndarray]:
    """Energy and forces with a fresh list inside the cutoff only (the ASE calculator, skin 0)."""
    probe = atoms.copy()
    probe.calc = TDNCalculator(model, default_dtype="float64", skin=0.0)
    return probe.get_potential_energy(), probe.get_forces()


# --------------------------------------------------------------------------------------------- vs ASE


def _fixed_cu_al() -> Atoms:
    atoms = cu_al()
    atoms.set_constraint(FixAtoms(indices=[0, 5]))
    return atoms


@pytest.mark.parametrize("make", [_fixed_cu_al, ethanol], ids=["periodic-fixatoms", "molecule"])
def test_nve_matches_ase_velocity_verlet(model, make):
    atoms = make()
    # the untrained model pulls ethanol's O and H together: closer than tdn.calculator.MIN_DISTANCE at step ~19
    steps = 15 if make is ethanol else 30
    reference = atoms.copy()
    reference.calc = TDNCalculator(model, default_dtype="float64")
    VelocityVerlet(reference, timestep=1.0 * units.fs).run(steps)

    mine = atoms.copy()
    dyn = engine(model, mine, skin=0.3, check_interval=5)
    dyn.run(steps)
    dyn.sync_atoms()
    assert dyn.nsteps == steps
    assert np.abs(mine.positions - atoms.positions).max() > 1e-3  # it moved
    assert np.abs(mine.positions - reference.positions).max() < 1e-9
    assert np.abs(mine.get_velocities() - reference.get_velocities()).max() < 1e-9
    assert mine.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-9)
    assert np.abs(mine.get_forces() - reference.get_forces()).max() < 1e-9
    assert dyn.missed_rebuilds == 0
    if mine.constraints:  # fixed atoms stay put with zero momentum
        assert np.array_equal(mine.positions[[0, 5]], atoms.positions[[0, 5]])
        assert not mine.get_momenta()[[0, 5]].any()


# --------------------------------------------------------------------------------------------- skin list


def test_all_candidate_edges_give_the_exact_energy_and_forces(model):
    """Pairs between cutoff and cutoff + skin go to the model and contribute exactly nothing."""
    atoms = cu_al(repeat=(2, 2, 1))
    dyn = engine(model, atoms, skin=1.0)
    probe = atoms.copy()
    probe.calc = TDNCalculator(model, default_dtype="float64", skin=0.0)
    probe.get_forces()
    assert dyn.num_edges > probe.calc.num_edges  # there are candidates beyond the cutoff
    rng = np.random.default_rng(0)
    for _ in range(3):  # at most 3 * sqrt(3) * 0.05 = 0.26 < skin / 2 from where the list was built
        dyn.positions += torch.as_tensor(rng.uniform(-0.05, 0.05, size=(len(atoms), 3)))
        dyn.evaluate()
        atoms.positions = dyn.positions.numpy()
        energy, forces = exact(model, atoms)
        assert float(dyn.energy) == pytest.approx(energy, abs=1e-12)
        assert np.abs(dyn.forces.numpy() - forces).max() < 1e-12
    assert dyn.neighbor_list_builds == 1


def test_pair_entering_the_cutoff_between_rebuilds_is_seen(model):
    dimer = Atoms("CuCu", positions=[[0, 0, 0], [CUTOFF + 0.1, 0, 0]])
    dyn = engine(model, dimer, skin=0.6)
    assert dyn.num_edges == 2 and not dyn.forces.any()  # a candidate, out of range
    dyn.positions[1, 0] -= 0.25  # inside the cutoff now, moved less than skin / 2
    dyn.evaluate()
    assert dyn.neighbor_list_builds == 1 and dyn.forces.abs().max() > 0
    dimer.positions = dyn.positions.numpy()
    assert np.abs(dyn.forces.numpy() - exact(model, dimer)[1]).max() < 1e-12


# --------------------------------------------------------------------------------------------- rebuild rule


def test_nve_conserves_energy_across_rebuilds(model):
    atoms = cu_al(repeat=(2, 2, 2), temperature=1500.0)  # 64 atoms, hot, small skin: several rebuilds
    dyn = engine(model, atoms, skin=0.3, check_interval=10)
    rows = dyn.run(300, log_interval=10)
    assert [row.step for row in rows] == list(range(0, 301, 10))
    totals = np.array([row.etot for row in rows])
    assert np.allclose(totals, [row.epot + row.ekin for row in rows])
    assert min(row.temperature for row in rows) > 300  # it moved
    drift = (totals.max() - totals.min()) / len(atoms)
    assert drift < 1e-4, f"total energy varies by {drift:.2e} eV/atom over 300 steps"
    assert 3 <= dyn.neighbor_list_builds < 300
    assert dyn.missed_rebuilds == 0
    dyn.sync_atoms()
    energy, forces = exact(model, atoms)  # the list in use at the end is still complete
    assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-10)
    assert np.abs(atoms.get_forces() - forces).max() < 1e-10


def test_late_rebuild_is_counted_and_warned(model):
    """Without the displacement prediction (safety 0) and with long windows, atoms outrun skin/2 between checks:
    never silent."""
    atoms = cu_al(temperature=2000.0)
    dyn = engine(model, atoms, skin=0.05, check_interval=40, safety=0.0)
    with pytest.warns(RuntimeWarning, match="skin/2"):
        dyn.run(30)  # ends before the first scheduled check (step 40): run's closing check sees the miss
    assert dyn.missed_rebuilds == 1 and dyn.check_interval == 20  # halved on every miss
    with pytest.warns(RuntimeWarning, match="skin/2"):
        dyn.run(50)
    assert dyn.missed_rebuilds >= 2 and dyn.check_interval < 20
    dyn.sync_atoms()  # after a miss the list is rebuilt and the forces recomputed
    assert np.abs(atoms.get_forces() - exact(model, atoms)[1]).max() < 1e-10


# --------------------------------------------------------------------------------------------- Langevin


def test_langevin_without_friction_is_velocity_verlet(model):
    atoms = cu_al()
    nve = engine(model, atoms.copy())
    langevin = engine(model, atoms.copy(), ensemble="nvt-langevin", temperature_K=500.0, friction=0.0)
    nve.run(20)
    langevin.run(20)
    assert torch.allclose(nve.positions, langevin.positions, rtol=0, atol=1e-12)
    assert torch.allclose(nve.velocities, langevin.velocities, rtol=0, atol=1e-12)


def test_langevin_is_seeded(model):
    atoms = cu_al()

    def trajectory(seed: int) -> torch.Tensor:
        dyn = engine(model, atoms.copy(), ensemble="nvt-langevin", temperature_K=500.0, friction=0.02, seed=seed)
        dyn.run(10)
        return torch.cat([dyn.positions, dyn.velocities])

    first = trajectory(3)
    assert torch.equal(first, trajectory(3))
    assert not torch.allclose(first, trajectory(4), rtol=0, atol=1e-8)


class _TorchNormal:
    """numpy-style rng for ase.md.langevin that draws from a CPU torch.Generator: ASE then sees the noise of
    TorchDynamics (xi, then eta, every step)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, size):
        return torch.randn(size, generator=self.generator, dtype=torch.float64).numpy()


def test_langevin_is_ase_langevin_scheme(model):
    atoms = cu_al()
    atoms.set_constraint(FixAtoms(indices=[2]))
    reference = atoms.copy()
    reference.calc = TDNCalculator(model, default_dtype="float64")
    Langevin(
        reference, 1.0 * units.fs, temperature_K=800.0, friction=0.05 / units.fs, fixcm=False, rng=_TorchNormal(7)
    ).run(20)
    mine = atoms.copy()
    dyn = engine(model, mine, ensemble="nvt-langevin", temperature_K=800.0, friction=0.05, seed=7)
    dyn.run(20)
    dyn.sync_atoms()
    assert np.abs(mine.positions - reference.positions).max() < 1e-9
    assert np.abs(mine.get_velocities() - reference.get_velocities()).max() < 1e-9
    assert np.array_equal(mine.positions[2], atoms.positions[2]) and not mine.get_momenta()[2].any()


def test_langevin_heats_towards_the_target(model):
    atoms = cu_al(temperature=0.0)
    dyn = engine(model, atoms, ensemble="nvt-langevin", temperature_K=1000.0, friction=0.1)
    rows = dyn.run(120, log_interval=5)
    assert rows[0].temperature == 0
    assert np.mean([row.temperature for row in rows[len(rows) // 2 :]]) > 400


# --------------------------------------------------------------------------------------------- input


def test_bad_input_is_rejected(model, model_file):
    atoms = cu_al()
    with pytest.raises(ValueError, match="'npt'.*torch engine"):
        engine(model, atoms, ensemble="npt")
    constrained = atoms.copy()
    constrained.set_constraint(FixBondLength(0, 1))
    with pytest.raises(ValueError, match="FixBondLength"):
        engine(model, constrained)
    with pytest.raises(ValueError, match="device and dtype"):
        TorchDynamics(TDNCalculator(model_file), atoms, dtype="float64")
    with pytest.raises(ValueError, match="torch engine needs a TDNCalculator"):
        build_dynamics(atoms, MDSettings(), engine="torch")
    with pytest.raises(ValueError, match="engine"):
        build_dynamics(atoms, MDSettings(), engine="jax")


# --------------------------------------------------------------------------------------------- CLI


def _argv(structure: Path, model_file: Path, out: Path, *extra: str) -> list[str]:
    common = ["--model", str(model_file), "--dtype", "float64", "--log-interval", "2", "--no-progress", "-o"]
    return [str(structure), *common, str(out), *extra]


def test_cli_torch_engine_writes_the_ase_outputs(model_file, structure, tmp_path):
    run = ["--steps", "6", "--traj-interval", "3", "--temperature", "300"]
    assert main(_argv(structure, model_file, tmp_path / "ase", *run, "--no-plot")) == 0
    assert main(_argv(structure, model_file, tmp_path / "torch", *run, "--engine", "torch")) == 0
    out = tmp_path / "torch"
    meta, names, values = read_log(out / "md.log")
    meta_ase, names_ase, values_ase = read_log(tmp_path / "ase" / "md.log")
    assert meta == meta_ase and names == names_ase
    assert values[:, 0].tolist() == [0, 2, 4, 6]
    assert np.allclose(values[:, :6], values_ase[:, :6], rtol=0, atol=2e-6)  # the same NVE run, printed to 1e-6
    frames = read(out / "trajectory.extxyz", index=":")
    assert len(frames) == 3  # steps 0, 3, 6
    ase_frames = read(tmp_path / "ase" / "trajectory.extxyz", index=":")
    wrapped = ase_frames[-1].copy()
    wrapped.wrap()  # torch-sim wraps positions into the cell
    assert np.abs(frames[-1].positions - wrapped.positions).max() < 1e-9
    assert np.abs(frames[-1].get_forces() - ase_frames[-1].get_forces()).max() < 1e-9
    assert (out / "thermo.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_torch_langevin_and_bad_combinations(model_file, structure, tmp_path, capsys):
    out = tmp_path / "langevin"
    run = ["--steps", "4", "--traj-format", "traj", "--no-plot", "--engine", "torch", "--ensemble", "nvt-langevin"]
    assert main(_argv(structure, model_file, out, *run)) == 0
    assert read_log(out / "md.log")[2].shape[0] == 3
    assert len(read(out / "trajectory.traj", index=":")) == 1 + 4 // 10  # --traj-interval default 10
    for ensemble in ("nvt-nose-hoover", "npt-iso", "npt", "npt-langevin"):
        argv = _argv(structure, model_file, tmp_path / ensemble, "--steps", "2", "--engine", "torch")
        assert main([*argv, "--ensemble", ensemble]) == 2  # a usage error: one message, no traceback
        assert f"--ensemble {ensemble} is not available with --engine torch" in capsys.readouterr().err
        assert not (tmp_path / ensemble).exists()
    with pytest.raises(SystemExit):
        main(_argv(structure, model_file, tmp_path / "bad", "--engine", "jax"))


def test_sync_atoms_keeps_the_calculator_with_fresh_results(model):
    """Built from a TDNCalculator, the engine hands its results to that calculator: it stays attached and answers
    without recomputing; what it did not compute (e.g. a new geometry) it computes itself."""
    atoms = ethanol()
    calc = TDNCalculator(model, default_dtype="float64")
    atoms.calc = calc
    dyn = TorchDynamics(calc, atoms, timestep=0.5)
    dyn.run(5)
    dyn.sync_atoms()
    assert atoms.calc is calc
    builds = calc.neighbor_list_builds
    forces = atoms.get_forces()  # from the engine's results: no model call, no neighbour list
    assert calc.neighbor_list_builds == builds
    np.testing.assert_allclose(forces, dyn.forces.cpu().numpy(), rtol=0, atol=0)
    atoms.positions[0] += 0.01
    assert np.abs(atoms.get_forces() - forces).max() > 0  # a new geometry is computed by the calculator
