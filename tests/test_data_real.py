"""The real reference files in ../shared/data load with the right counts (skipped when that folder is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tdn.data

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present")

RMD17 = ("aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde", "naphthalene", "salicylic", "toluene")


@pytest.mark.parametrize("name", RMD17)
def test_rmd17(name):
    for part in ("train_01", "test_01"):
        ds = tdn.data.read(DATA / "rmd17" / name / f"{part}.xyz", molecule=True)
        assert len(ds) == 1000
    atoms = ds[999]
    assert not atoms.pbc.any() and np.allclose(atoms.cell.array, 0)  # the 50 Å Lattice is a dummy
    assert atoms.get_potential_energy() < -1000  # "Energy=" (capital E), eV
    assert atoms.get_forces().shape == (len(atoms), 3)


def test_rmd17_aspirin_first_frame_values():
    atoms = tdn.data.read(DATA / "rmd17" / "aspirin" / "train_01.xyz", molecule=True)[0]
    assert len(atoms) == 21 and atoms.get_chemical_formula() == "C9H8O4"
    assert atoms.get_potential_energy() == pytest.approx(-17617.69533153726)
    assert atoms.get_forces()[0] == pytest.approx([-1.0619674565879482, -0.7286803467929365, 0.8924223346839087])
    graph = tdn.data.atoms_to_graph(atoms, 5.0)
    assert graph.natoms.item() == 21 and graph.edge_index.shape[1] > 0


@pytest.mark.parametrize("path, count", [
    ("3bpa/train_300K.xyz", 500),
    ("acac/train_300K.xyz", 500),
    ("acac/test_MD_300K.xyz", 650),
    ("acac/test_MD_600K.xyz", 650),
])
def test_molecular_md(path, count):
    ds = tdn.data.read(DATA / path)
    assert len(ds) == count
    atoms = ds[count - 1]
    assert not atoms.pbc.any() and atoms.get_forces().shape == (len(atoms), 3)
    assert np.isfinite(atoms.get_potential_energy())


def test_oc20_frame_and_relaxation():
    ds = tdn.data.read(DATA / "oc20" / "oc20_adslab_frame.json")
    assert len(ds) == 1
    atoms = ds[0]
    assert len(atoms) == 34 and atoms.get_potential_energy() == pytest.approx(-135.66393572)
    assert sorted(set(atoms.get_tags().tolist())) == [0, 1]
    graph = tdn.data.atoms_to_graph(atoms, 6.0)
    assert graph.fixed.sum().item() == 24 and graph.has_stress.item() and graph.pbc.all()
    relax = tdn.data.read(DATA / "oc20" / "toy_c3h8_relax.extxyz")
    assert len(relax) == 101
    frame = relax[100]
    assert sorted(set(frame.get_tags().tolist())) == [0, 1, 2]
    assert len(frame.constraints[0].get_indices()) == 18  # from the move_mask column


def test_linear_reference_files():
    from tdn.data.oc import load_linear_reference

    for name in ("oc20_linref.npz", "oc22_linref.npz"):
        coeff = load_linear_reference(DATA / "oc20" / name)
        assert coeff.shape == (100,) and np.isfinite(coeff[[1, 6, 8]]).all()


def test_oxides_db():
    ds = tdn.data.read(DATA / "oxides" / "oxides.db")
    assert ds.format == "asedb" and len(ds) == 295
    atoms = ds[294]
    assert atoms.pbc.all() and atoms.get_forces().shape == (len(atoms), 3)
    assert np.isfinite(atoms.get_potential_energy())
