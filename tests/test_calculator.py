"""TDNCalculator: derivatives against finite differences, relaxation, energy conservation, the skin neighbour
list, batched evaluation, and rejection of bad input before the model runs."""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.filters import FrechetCellFilter
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE
from syncs import count_syncs, matmul_calls

import tdn
from tdn import TDNCalculator, TorchDynamics
from tdn.md import initialise_velocities
from tdn.models import build_model

ELEMENTS = [1, 6, 8, 13, 29]
CUTOFF = 3.5
BACKEND = "cp"

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def single_threaded_openblas():
    """FrechetCellFilter's 3x3 matrix functions go through scipy's OpenBLAS, whose threads wait for a time slice
    on a busy machine (measured: 56 s instead of 4 s for the relaxation below). Best effort, Linux only."""
    restore = []
    try:
        with open("/proc/self/maps") as maps:
            libraries = {line.split()[-1] for line in maps if "openblas" in line}
    except OSError:
        libraries = set()
    for path in libraries:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("", "64_", "_64_"):
            get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                restore.append((set_, get()))
                set_(1)
                break
    try:
        yield
    finally:
        for set_, threads in restore:
            set_(threads)


def tiny_model(seed: int = 0, **overrides):
    """An untrained tiny model with smooth, non-zero forces."""
    torch.manual_seed(seed)
    options = dict(tp=BACKEND, preset="tiny", elements=ELEMENTS, cutoff=CUTOFF, avg_num_neighbors=10.0, dtype="float64")
    return build_model(**{**options, **overrides})


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    tdn.save_model(tiny_model(), path)
    return path


def calculator(model_file: Path, **kwargs) -> TDNCalculator:
    return TDNCalculator(model_file, default_dtype=kwargs.pop("default_dtype", "float64"), **kwargs)


def cu_al(repeat=(2, 1, 1), seed: int = 1) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
    atoms.numbers[::3] = 13
    atoms.rattle(0.08, seed=seed)
    return atoms


def triclinic() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 1))  # primitive fcc vectors: a non-orthogonal cell
    atoms.numbers[1] = 13
    atoms.rattle(0.05, seed=2)
    return atoms


# --------------------------------------------------------------------------------------------- properties


def test_properties_follow_ase_conventions(model_file):
    atoms = cu_al()
    atoms.calc = calculator(model_file)
    energy = atoms.get_potential_energy()
    assert atoms.get_potential_energy(force_consistent=True) == energy
    energies = atoms.get_potential_energies()
    assert energies.shape == (len(atoms),)
    assert energies.sum() == pytest.approx(energy, abs=1e-10)
    forces = atoms.get_forces()
    assert forces.shape == (len(atoms), 3) and forces.dtype == np.float64
    assert np.abs(forces).max() > 1e-3, "the test model must have non-zero forces"
    assert np.allclose(forces.sum(axis=0), 0, atol=1e-10)  # translation invariance
    assert atoms.get_stress().shape == (6,)
    assert atoms.get_stress(voigt=False).shape == (3, 3)


def test_forces_match_central_differences(model_file):
    atoms = cu_al()
    atoms.calc = calculator(model_file)
    numerical = calculate_numerical_forces(atoms, eps=1e-4)
    assert np.abs(atoms.get_forces() - numerical).max() < 1e-6


def test_molecule_forces_and_no_stress(model_file):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=0)
    atoms.calc = calculator(model_file)
    numerical = calculate_numerical_forces(atoms, eps=1e-4)
    assert np.abs(atoms.get_forces() - numerical).max() < 1e-6
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        atoms.get_stress()


@pytest.mark.parametrize("make", [cu_al, triclinic], ids=["orthorhombic", "triclinic"])
def test_stress_matches_finite_strain(model_file, make):
    atoms = make()
    atoms.calc = calculator(model_file)
    numerical = calculate_numerical_stress(atoms, eps=1e-5)
    stress = atoms.get_stress()
    assert np.abs(stress).max() > 1e-5
    assert np.abs(stress - numerical).max() < 1e-7


def test_float32_agrees_with_float64(model_file):
    atoms = cu_al()
    atoms.calc = calculator(model_file)
    e64, f64, s64 = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    atoms.calc = calculator(model_file, default_dtype="float32")
    assert atoms.get_potential_energy() == pytest.approx(e64, rel=1e-5)
    assert np.abs(atoms.get_forces() - f64).max() < 1e-4
    assert np.abs(atoms.get_stress() - s64).max() < 1e-5


# --------------------------------------------------------------------------------------------- dynamics


def test_fire_relaxation_with_cell_filter_converges(model_file):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[0] = 13
    atoms.rattle(0.05, seed=3)
    atoms.calc = calculator(model_file)
    start = atoms.get_potential_energy()
    opt = FIRE(FrechetCellFilter(atoms), logfile=None)
    with single_threaded_openblas():
        assert opt.run(fmax=5e-3, steps=300)
    assert np.abs(atoms.get_forces()).max() < 5e-3
    assert atoms.get_potential_energy() < start


def test_nve_conserves_energy(model_file):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)  # 32 atoms
    atoms.numbers[::4] = 13
    atoms.calc = calculator(model_file)
    initialise_velocities(atoms, 300, seed=0)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    totals = []
    dyn.attach(lambda: totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy()), interval=10)
    dyn.run(400)
    drift = (max(totals) - min(totals)) / len(atoms)
    assert atoms.get_temperature() > 10  # it moved
    assert drift < 1e-4, f"total energy varies by {drift:.2e} eV/atom over 400 steps"
    assert atoms.calc.neighbor_list_builds < 400  # the skin list was reused


# --------------------------------------------------------------------------------------------- neighbour list


def test_skin_reuse_gives_the_forces_of_a_fresh_list(model_file):
    atoms = cu_al(repeat=(2, 2, 1))
    calc = calculator(model_file, skin=0.6)
    atoms.calc = calc
    atoms.get_forces()
    assert calc.neighbor_list_builds == 1
    rng = np.random.default_rng(0)
    for _ in range(3):  # every atom stays within 3 * sqrt(3) * 0.04 = 0.21 < skin / 2 of where the list was built
        atoms.positions += rng.uniform(-0.04, 0.04, size=atoms.positions.shape)
        forces = atoms.get_forces()
        fresh = atoms.copy()
        fresh.calc = calculator(model_file, skin=0.0)
        assert np.abs(forces - fresh.get_forces()).max() < 1e-10
        assert atoms.get_potential_energy() == pytest.approx(fresh.get_potential_energy(), abs=1e-10)
    assert calc.neighbor_list_builds == 1
    atoms.positions[5] += [0.6, 0.0, 0.0]  # now more than skin / 2 away: rebuilt
    forces = atoms.get_forces()
    assert calc.neighbor_list_builds == 2
    fresh = atoms.copy()
    fresh.calc = calculator(model_file, skin=0.0)
    assert np.abs(forces - fresh.get_forces()).max() < 1e-10


def test_pair_entering_the_cutoff_during_reuse_is_seen(model_file):
    dimer = Atoms("CuCu", positions=[[0, 0, 0], [CUTOFF + 0.1, 0, 0]])
    calc = calculator(model_file, skin=0.6)
    dimer.calc = calc
    assert np.abs(dimer.get_forces()).max() == 0  # out of range
    dimer.positions[1, 0] -= 0.25  # inside the cutoff now, moved less than skin / 2
    forces = dimer.get_forces()
    assert calc.neighbor_list_builds == 1 and calc.num_edges == 2
    assert np.abs(forces).max() > 0
    fresh = dimer.copy()
    fresh.calc = calculator(model_file, skin=0.0)
    assert np.abs(forces - fresh.get_forces()).max() < 1e-12


@pytest.mark.parametrize("make", [triclinic, lambda: molecule("CH3CH2OH")], ids=["triclinic", "molecule"])
def test_device_list_matches_the_cpu_list(model_file, make):
    """The device path of the neighbour list (what runs on a GPU) and the host path give the same results, skin reuse
    included."""
    atoms = make()
    results = []
    for method in ("torch", "vesin"):
        calc = calculator(model_file, neighbor_list=method)
        atoms.calc = calc
        forces = [atoms.get_forces()]
        atoms.positions[0] += 0.1
        forces.append(atoms.get_forces())
        atoms.positions[0] -= 0.1
        assert calc.neighbor_list_builds == 1
        results.append(np.concatenate(forces))
    assert np.abs(results[0] - results[1]).max() < 1e-10


def test_cell_or_species_change_rebuilds(model_file):
    atoms = cu_al()
    calc = calculator(model_file)
    atoms.calc = calc
    atoms.get_forces()
    atoms.set_cell(atoms.cell * 1.01, scale_atoms=True)
    strained = atoms.get_forces()
    assert calc.neighbor_list_builds == 2
    fresh = atoms.copy()
    fresh.calc = calculator(model_file, skin=0.0)
    assert np.abs(strained - fresh.get_forces()).max() < 1e-10
    atoms.numbers[0] = 29
    energy = atoms.get_potential_energy()
    fresh.numbers[0] = 29
    assert energy == pytest.approx(fresh.get_potential_energy(), abs=1e-10)


# --------------------------------------------------------------------------------------------- host syncs


def test_step_between_rebuilds_syncs_once_and_reuses_the_edges(model_file, monkeypatch):
    """Between rebuilds a step makes the host wait for the device once (the results, in one transfer), and hands
    the model the same edge_index tensor, so that what is derived from it (the fused kernel's sort) is reused."""
    atoms = cu_al(repeat=(2, 2, 1))
    calc = calculator(model_file, default_dtype="float32", skin=0.6)
    calc.exact_pairs = False  # the accelerator's path (the CPU default selects the pairs within the cutoff)
    atoms.calc = calc
    edges = []
    node_energies = calc.model.node_energies
    monkeypatch.setattr(calc.model, "node_energies", lambda *args: edges.append(args[2]) or node_energies(*args))
    atoms.get_forces()
    rng = np.random.default_rng(0)
    for _ in range(3):  # every atom stays within 3 * sqrt(3) * 0.05 = 0.26 < skin / 2 of where the list was built
        atoms.positions += rng.uniform(-0.05, 0.05, size=atoms.positions.shape)
        with count_syncs() as syncs:
            forces = atoms.get_forces()
        assert syncs.count <= 1, syncs.events
    assert calc.neighbor_list_builds == 1 and len(edges) == 4
    assert all(e is edges[0] for e in edges)
    fresh = atoms.copy()
    fresh.calc = calculator(model_file, default_dtype="float32", skin=0.0)
    assert np.abs(forces - fresh.get_forces()).max() < 1e-5
    with count_syncs() as syncs:
        atoms.get_stress()  # the model's own forward (strain derivative): one transfer too
    assert syncs.count <= 1, syncs.events


def test_cpu_default_gives_the_model_the_pairs_within_the_cutoff(model_file):
    """On the CPU every call selects the candidates within the cutoff (exact_pairs): fewer edges, the same energy,
    forces and stress as every candidate pair (those beyond the cutoff contribute exactly zero)."""
    atoms = cu_al(repeat=(2, 2, 1))
    exact = calculator(model_file, skin=1.0)
    assert exact.exact_pairs
    candidates = calculator(model_file, skin=1.0)
    candidates.exact_pairs = False
    results = []
    for calc in (exact, candidates):
        atoms.calc = calc
        for _ in range(2):  # a rebuild, then a step on the same list
            atoms.positions += 0.01
            results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(), calc.num_edges))
        atoms.positions -= 0.02
    assert exact.neighbor_list_builds == 1 and candidates.neighbor_list_builds == 1
    for ours, theirs in zip(results[:2], results[2:]):
        assert ours[3] < theirs[3]  # fewer edges
        assert ours[0] == pytest.approx(theirs[0], abs=1e-10)
        np.testing.assert_allclose(ours[1], theirs[1], atol=1e-10)
        np.testing.assert_allclose(ours[2], theirs[2], atol=1e-10)


def test_e0_kind_is_the_models(model_file):
    calc = calculator(model_file)
    assert isinstance(calc.e0_kind, str)
    calc.model.config.e0_kind = "isolated"
    assert calc.e0_kind == "isolated"


def test_geometry_never_uses_a_matmul(model_file):
    """A float32 matmul may run in TF32 on a GPU (about 5e-4 relative error): the shift vectors, the neighbour lists
    and the distance checks of the calculator and the MD engine use elementwise products instead."""
    ours = ("tdn/calculator.py", "tdn/dynamics.py", "tdn/data/neighbors.py")
    atoms = triclinic()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with matmul_calls() as calls:
            for method in ("torch", "vesin"):
                atoms.calc = calculator(model_file, default_dtype="float32", neighbor_list=method)
                atoms.get_forces()
                atoms.get_stress()
                atoms.calc.calculate_batch([atoms, molecule("H2O")])
            TorchDynamics(calculator(model_file, default_dtype="float32", neighbor_list="torch"), atoms).run(3)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert calls, "the model itself does use matmuls: the recorder must see them"
    mine = [c for c in calls if c.caller.replace("\\", "/").rsplit(":", 1)[0].endswith(ours)]
    assert not mine, mine


# --------------------------------------------------------------------------------------------- batches


def test_batch_matches_single_evaluations(model_file):
    structures = [cu_al(), molecule("H2O"), triclinic(), cu_al(repeat=(1, 1, 2), seed=5)]
    calc = calculator(model_file)
    results = calc.calculate_batch(structures, properties=("energy", "forces", "stress"), batch_size=3)
    assert len(results) == len(structures)
    for atoms, result in zip(structures, results):
        single = atoms.copy()
        single.calc = calculator(model_file)
        assert result["energy"] == pytest.approx(single.get_potential_energy(), abs=1e-9)
        assert result["free_energy"] == result["energy"]
        assert np.abs(result["forces"] - single.get_forces()).max() < 1e-9
        assert np.abs(result["energies"] - single.get_potential_energies()).max() < 1e-9
        if atoms.pbc.all():
            assert np.abs(result["stress"] - single.get_stress()).max() < 1e-9
        else:
            assert "stress" not in result


def test_batch_names_the_bad_structure(model_file):
    calc = calculator(model_file)
    bad = cu_al()
    bad.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"structure 1: .*atom 2"):
        calc.calculate_batch([cu_al(), bad])


# --------------------------------------------------------------------------------------------- bad input


class _MustNotRun(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the model ran on invalid input")


def _guarded(model_file) -> TDNCalculator:
    calc = calculator(model_file)
    calc.model = _MustNotRun()
    return calc


def _nan_atoms() -> Atoms:
    atoms = cu_al()
    atoms.positions[3] = [np.nan, 0.0, 1.0]
    return atoms


def _unknown_element() -> Atoms:
    atoms = cu_al()
    atoms.numbers[2] = 79  # Au
    return atoms


def _zero_cell_vector() -> Atoms:
    atoms = molecule("H2O")
    atoms.set_cell([5.0, 5.0, 0.0])
    atoms.pbc = True
    return atoms


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (Atoms, ValueError, "empty"),
        (_nan_atoms, ValueError, r"atom 3"),
        (_unknown_element, KeyError, r"Au \(Z=79\) of atom 2"),
        (_zero_cell_vector, ValueError, r"pbc is True along c but cell vector c"),
    ],
    ids=["empty", "nan-position", "unknown-element", "zero-cell-vector"],
)
def test_bad_input_is_rejected_before_the_model_runs(model_file, make, error, message):
    atoms = make()
    atoms.calc = _guarded(model_file)
    with pytest.raises(error, match=message):
        atoms.get_potential_energy()


def test_nan_during_a_run_is_rejected(model_file):
    atoms = cu_al()
    calc = calculator(model_file)
    atoms.calc = calc
    atoms.get_forces()
    calc.model = _MustNotRun()
    atoms.positions[4, 2] = np.inf
    with pytest.raises(ValueError, match="atom 4"):
        atoms.get_forces()


def test_constructor_arguments_are_checked(model_file, tmp_path):
    with pytest.raises(ValueError, match="default_dtype"):
        TDNCalculator(model_file, default_dtype="float16")
    with pytest.raises(ValueError, match="skin"):
        TDNCalculator(model_file, skin=-1.0)
    with pytest.raises(ValueError, match="neighbor_list"):
        TDNCalculator(model_file, neighbor_list="ase")
    with pytest.raises(FileNotFoundError):
        TDNCalculator(tmp_path / "missing.pt")
