"""D3 dispersion in TDNCalculator (torch-dftd): the combined result is the model's plus the library's own, forces and
stress match central differences, periodic and molecular; unknown names are refused. Also: the calculator's keywords
(an unknown one is refused, ASE's own still work)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from helpers import small_model

from tdn import TDNCalculator
from tdn.dispersion import DEFAULT_CUTOFF

pytest.importorskip("torch_dftd")
from torch_dftd.torch_dftd3_calculator import TorchDFTD3Calculator  # noqa: E402

ELEMENTS = [1, 6, 8, 13, 29]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Creating a tensor from a list of numpy.ndarrays:UserWarning"),  # the library's
]


@pytest.fixture(scope="module")
def model():
    return small_model(elements=ELEMENTS, cutoff=3.5)


def crystal():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[1] = 13
    atoms.rattle(0.05, seed=1)
    return atoms


def ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=0)
    return atoms


def library(cutoff: float = DEFAULT_CUTOFF, xc: str = "pbe") -> TorchDFTD3Calculator:
    """torch-dftd's own ASE calculator (its own neighbour search, forces and stress): the reference."""
    return TorchDFTD3Calculator(damping="bj", xc=xc, cutoff=cutoff, cnthr=cutoff, dtype=torch.float64,
                                cutoff_smoothing="poly")  # fmt: skip


@pytest.mark.parametrize("make", [crystal, ethanol], ids=["periodic", "molecule"])
def test_result_is_the_model_plus_the_library(model, make):
    atoms = make()
    plain, combined, d3 = atoms.copy(), atoms.copy(), atoms.copy()
    plain.calc = TDNCalculator(model, default_dtype="float64")
    combined.calc = TDNCalculator(model, default_dtype="float64", dispersion="d3bj", functional="pbe")
    d3.calc = library()
    e_d3 = d3.get_potential_energy()
    assert e_d3 < -0.05  # dispersion binds
    assert combined.get_potential_energy() == pytest.approx(plain.get_potential_energy() + e_d3, abs=1e-9)
    assert combined.calc.results["free_energy"] == combined.get_potential_energy()
    assert combined.calc.results["dispersion_energy"] == pytest.approx(e_d3, abs=1e-9)
    assert np.abs(d3.get_forces()).max() > 1e-3
    assert np.abs(combined.get_forces() - plain.get_forces() - d3.get_forces()).max() < 1e-9
    # per-atom energies are the model's alone (the library gives no split): documented
    assert np.abs(combined.get_potential_energies() - plain.get_potential_energies()).max() < 1e-12
    if atoms.pbc.all():
        assert np.abs(combined.get_stress() - plain.get_stress() - d3.get_stress()).max() < 1e-9
        assert np.abs(combined.get_stresses().sum(axis=0) - combined.get_stress()).max() < 1e-12


def test_another_functional_and_damping(model):
    atoms = ethanol()
    atoms.calc = TDNCalculator(model, default_dtype="float64", dispersion="d3bj", functional="b3-lyp")
    d3 = atoms.copy()
    d3.calc = library(xc="b3-lyp")
    energy = atoms.calc.get_property("dispersion_energy", atoms)
    assert energy == pytest.approx(d3.get_potential_energy(), abs=1e-9)
    zero = atoms.copy()
    zero.calc = TDNCalculator(model, default_dtype="float64", dispersion="d3zero", functional="b3-lyp")
    assert zero.calc.get_property("dispersion_energy", zero) != pytest.approx(energy, abs=1e-4)


@pytest.mark.parametrize("make", [crystal, ethanol], ids=["periodic", "molecule"])
def test_forces_and_stress_match_central_differences(model, make):
    """A short D3 cutoff (switched off over its last Bohr) keeps this fast; the switching is smooth."""
    atoms = make()
    atoms.calc = TDNCalculator(model, default_dtype="float64", skin=0.0, dispersion="d3bj", dispersion_cutoff=6.0)
    assert np.abs(atoms.get_forces() - calculate_numerical_forces(atoms, eps=1e-4)).max() < 1e-6
    if atoms.pbc.all():
        numerical = calculate_numerical_stress(atoms, eps=1e-5)
        assert np.abs(atoms.get_stress() - numerical).max() < 1e-7


def test_committee_members_all_get_the_dispersion(model):
    atoms = crystal()
    members = [model, small_model(1, elements=ELEMENTS, cutoff=3.5)]
    plain, combined = atoms.copy(), atoms.copy()
    plain.calc = TDNCalculator(members, default_dtype="float64")
    combined.calc = TDNCalculator(members, default_dtype="float64", dispersion="d3bj", dispersion_cutoff=8.0)
    d3 = combined.calc.get_property("dispersion_energy", combined)
    e_plain, e_combined = (a.calc.get_property("energy_comm", a) for a in (plain, combined))
    assert np.abs(e_combined - e_plain - d3).max() < 1e-10
    for key in ("energy_var", "forces_var", "stress_var"):  # the same term for every member: no spread of its own
        assert np.abs(combined.calc.get_property(key, combined) - plain.calc.get_property(key, plain)).max() < 1e-12


def test_skin_reuse_gives_the_result_of_a_fresh_list(model):
    atoms = crystal()
    calc = TDNCalculator(model, default_dtype="float64", skin=1.0, dispersion="d3bj", dispersion_cutoff=8.0)
    atoms.calc = calc
    atoms.get_forces()
    atoms.positions += np.random.default_rng(0).uniform(-0.1, 0.1, atoms.positions.shape)
    forces, energy = atoms.get_forces(), atoms.get_potential_energy()
    assert calc.neighbor_list_builds == 1
    fresh = atoms.copy()
    fresh.calc = TDNCalculator(model, default_dtype="float64", skin=0.0, dispersion="d3bj", dispersion_cutoff=8.0)
    assert np.abs(forces - fresh.get_forces()).max() < 1e-12
    assert energy == pytest.approx(fresh.get_potential_energy(), abs=1e-12)


def test_float32_runs_in_the_model_dtype(model):
    atoms = crystal()
    atoms.calc = TDNCalculator(model, default_dtype="float64", dispersion="d3bj", dispersion_cutoff=8.0)
    e64, f64 = atoms.get_potential_energy(), atoms.get_forces()
    calc = TDNCalculator(small_model(elements=ELEMENTS, cutoff=3.5), dispersion="d3bj", dispersion_cutoff=8.0)
    assert calc.dispersion.module.c6ab.dtype == torch.float32
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(e64, abs=1e-4)
    assert np.abs(atoms.get_forces() - f64).max() < 1e-4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(dispersion="d4"), r"dispersion='d4' is not a dispersion correction tdn knows.*'d3bj'"),
        (dict(dispersion="d3bj", functional="pbe-typo"), r"functional='pbe-typo' has no D3\(bj\)"),
        (dict(functional="pbe"), r"give dispersion='d3bj' too"),
        (dict(dispersion_cutoff=10.0), r"give dispersion='d3bj' too"),
    ],
    ids=["method", "functional", "functional-alone", "cutoff-alone"],
)
def test_unknown_names_are_refused(model, options, message):
    with pytest.raises(ValueError, match=message):
        TDNCalculator(model, default_dtype="float64", **options)


def test_element_without_reference_data_is_refused():
    with pytest.raises(ValueError, match=r"Am \(Z=95\)"):
        TDNCalculator(small_model(elements=[29, 95]), dispersion="d3bj")


def test_code_running_the_bare_model_refuses(model):
    """calculate_batch and the torch MD engine run calc.model alone: with D3 they would leave it out."""
    calc = TDNCalculator(model, default_dtype="float64", dispersion="d3bj")
    with pytest.raises(ValueError, match="D3"):
        calc.calculate_batch([crystal()])
    assert calc.models[0] is model


# ---------------------------------------------------------------------------------------------- keywords


def test_unknown_keyword_is_refused_listing_the_known_ones(model):
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['dispersoin'\].*'dispersion'.*'label'"):
        TDNCalculator(model, dispersoin="d3bj")


def test_ase_keywords_still_work(model, tmp_path):
    atoms = crystal()
    calc = TDNCalculator(model, default_dtype="float64", label="run", directory=str(tmp_path), atoms=atoms)
    assert atoms.calc is calc and calc.directory == str(tmp_path) and calc.label.endswith("run")
    assert np.isfinite(atoms.get_potential_energy())
