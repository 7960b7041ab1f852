"""Each reader against small files built here with known numbers (units included)."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import pickle
import zlib

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

import tdn.data
from tdn.data import safe_pickle
from tdn.data.lmdb_utils import write_lmdb
from tdn.data.oc import write_oc_lmdb

HARTREE_PER_BOHR = units.Hartree / units.Bohr


# -- extxyz ---------------------------------------------------------------------------------------

STRESS = 'stress="0.1 0.0 0.0 0.0 0.2 0.0 0.0 0.0 0.3"'
XYZ = """2
Properties=species:S:1:pos:R:3:REF_forces:R:3 REF_energy=-1.5 pbc="F F F"
H 0.0 0.0 0.0 0.1 0.2 0.3
H 0.0 0.0 0.74 -0.1 -0.2 -0.3
3
Lattice="50.0 0.0 0.0 0.0 50.0 0.0 0.0 0.0 50.0" Properties=species:S:1:pos:R:3:forces:R:3 Energy=-2.5
O 0.0 0.0 0.0 1.0 0.0 0.0
H 0.0 0.76 0.59 0.0 1.0 0.0
H 0.0 -0.76 0.59 0.0 0.0 1.0

1
Lattice="3.0 0.0 0.0 0.0 3.0 0.0 0.0 0.0 3.0" Properties=species:S:1:pos:R:3:forces:R:3 energy=-3.5 STRESS pbc="T T T"
Cu 0.0 0.0 0.0 0.0 0.0 0.0
""".replace("STRESS", STRESS)


def test_extxyz_label_keys_and_lazy_access(tmp_path):
    path = tmp_path / "mixed.xyz"
    path.write_text(XYZ)
    ds = tdn.data.read(path)
    assert ds.format == "extxyz" and len(ds) == 3
    last = ds[2]  # random access without reading the earlier frames
    assert last.get_potential_energy() == pytest.approx(-3.5)
    assert np.allclose(last.calc.results["stress"], np.diag([0.1, 0.2, 0.3]))
    first = ds[0]
    assert first.get_potential_energy() == pytest.approx(-1.5)  # REF_energy
    assert np.allclose(first.get_forces()[0], [0.1, 0.2, 0.3])  # REF_forces
    water = ds[1]
    assert water.get_potential_energy() == pytest.approx(-2.5)  # capital-E Energy (rMD17 style)
    assert water.pbc.all()  # the dummy Lattice makes ASE call it periodic ...
    mol = tdn.data.read(path, molecule=True)[1]
    assert not mol.pbc.any() and np.allclose(mol.cell.array, 0)  # ... unless molecule=True
    assert ds[-1].info["source"].endswith("frame 2")


def test_extxyz_explicit_keys(tmp_path):
    path = tmp_path / "keys.xyz"
    path.write_text(XYZ.split("3\nLattice")[0] + "")  # only the first frame
    ds = tdn.data.read(path, energy_key="REF_energy", forces_key="REF_forces")
    assert ds[0].get_potential_energy() == pytest.approx(-1.5)
    with pytest.raises(tdn.data.InvalidRecordError, match="missing_energy"):
        tdn.data.read(path, energy_key="dft_energy")[0]


# -- ASE databases ---------------------------------------------------------------------------------


def labelled_atoms(k: int) -> Atoms:
    atoms = Atoms("CuO", positions=[(0, 0, 0), (0, 0, 1.8 + 0.1 * k)], cell=np.eye(3) * 5, pbc=True)
    atoms.set_tags([1, 2])
    atoms.set_constraint(FixAtoms(indices=[0]))
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0 * k, forces=np.full((2, 3), 0.1 * k),
                                       stress=np.arange(6) * 0.01)
    return atoms


@pytest.mark.parametrize("suffix", [".db", ".json"])
def test_ase_db(tmp_path, suffix):
    import ase.db

    path = tmp_path / f"structures{suffix}"
    with ase.db.connect(path) as db:
        for k in range(3):
            db.write(labelled_atoms(k), tag_value=k)
    ds = tdn.data.read(path)
    assert ds.format == "asedb" and len(ds) == 3
    atoms = ds[2]
    assert atoms.get_potential_energy() == pytest.approx(-2.0)
    assert np.allclose(atoms.get_forces(apply_constraint=False), 0.2)  # get_forces() zeroes fixed atoms
    assert list(atoms.get_tags()) == [1, 2]
    assert [type(c).__name__ for c in atoms.constraints] == ["FixAtoms"]
    assert atoms.calc.results["stress"][0, 1] == pytest.approx(0.05)  # Voigt index 5 = xy
    assert atoms.info["tag_value"] == 2 and atoms.info["id"] == 3


def write_aselmdb(path, rows: dict[int, dict], nextid: int, deleted=()):
    def z(obj):
        return zlib.compress(json.dumps(obj).encode())

    items = [(str(i).encode(), z(row)) for i, row in rows.items()]
    items += [(b"nextid", z(nextid)), (b"deleted_ids", z(list(deleted)))]
    write_lmdb(path, items)


def aselmdb_row(k: int, ndarray_encoding: bool) -> dict:
    def enc(values, dtype):
        arr = np.asarray(values, dtype=dtype)
        if ndarray_encoding:  # ase.io.jsonio style
            return {"__ndarray__": [list(arr.shape), arr.dtype.name, arr.ravel().tolist()]}
        return arr.tolist()  # orjson OPT_SERIALIZE_NUMPY style

    return {
        "numbers": enc([29, 8], "int64"),
        "positions": enc([[0, 0, 0], [0, 0, 1.8]], "float64"),
        "cell": enc(np.eye(3) * 4, "float64"),
        "pbc": enc([True, True, True], "bool"),
        "energy": -10.0 - k,
        "forces": enc([[0.5, 0, 0], [-0.5, 0, 0]], "float64"),
        "tags": enc([1, 2], "int64"),
        "constraints": [{"name": "FixAtoms", "kwargs": {"indices": [0]}}],
        "key_value_pairs": {"sid": 100 + k},
        "unique_id": f"u{k}",
    }


@pytest.mark.parametrize("ndarray_encoding", [False, True])
def test_aselmdb_both_array_encodings(tmp_path, ndarray_encoding):
    path = tmp_path / "data.aselmdb"
    rows = {i: aselmdb_row(i, ndarray_encoding) for i in (1, 2, 3, 4)}
    del rows[3]
    write_aselmdb(path, rows, nextid=5, deleted=[3])
    ds = tdn.data.read(path)
    assert ds.format == "aselmdb" and len(ds) == 3
    atoms = ds[2]  # id 4: id 3 was deleted
    assert atoms.get_potential_energy() == pytest.approx(-14.0)
    assert atoms.get_forces(apply_constraint=False)[0, 0] == pytest.approx(0.5)
    assert list(atoms.numbers) == [29, 8] and list(atoms.get_tags()) == [1, 2]
    assert atoms.constraints[0].get_indices().tolist() == [0]
    assert atoms.info["sid"] == 104 and atoms.info["unique_id"] == "u4"
    assert "data.aselmdb:4" in atoms.info["source"]


# -- OC20 / OC22 LMDB ----------------------------------------------------------------------------


def oc_fields(sid: int, fid: int, energy: float, n: int = 3) -> dict:
    return {
        "pos": torch.arange(n * 3, dtype=torch.float32).view(n, 3) * 0.9,
        "cell": (torch.eye(3) * 8.0).view(1, 3, 3),
        "atomic_numbers": torch.tensor([29.0, 29.0, 8.0][:n]),
        "natoms": n,
        "y": energy,
        "force": torch.full((n, 3), 0.25),
        "tags": torch.tensor([0, 1, 2][:n]),
        "fixed": torch.tensor([1.0, 0.0, 0.0][:n]),
        "sid": sid,
        "fid": fid,
    }


@pytest.mark.parametrize("layout", [1, 2])
def test_oc20_lmdb_shards_and_pyg_layouts(tmp_path, layout):
    write_oc_lmdb(tmp_path / "data.0000.lmdb", [oc_fields(7, f, -1.0 - f) for f in range(3)], pyg_layout=layout)
    write_oc_lmdb(tmp_path / "data.0001.lmdb", [oc_fields(9, f, -5.0 - f) for f in range(2)], pyg_layout=layout)
    ds = tdn.data.read(tmp_path)
    assert ds.format == "oc20-lmdb" and len(ds) == 5
    atoms = ds[4]  # second shard, local key "1"
    assert atoms.get_potential_energy() == pytest.approx(-6.0)
    assert np.allclose(atoms.calc.results["forces"], 0.25)
    assert list(atoms.numbers) == [29, 29, 8] and list(atoms.get_tags()) == [0, 1, 2]
    assert atoms.constraints[0].get_indices().tolist() == [0]
    assert atoms.pbc.all() and np.allclose(atoms.cell.array, np.eye(3) * 8)
    assert atoms.info["sid"] == 9 and atoms.info["fid"] == 1
    assert ds.groups().tolist() == [7, 7, 7, 9, 9]
    assert "data.0001.lmdb:1" in str(atoms.info["source"])
    trusted = tdn.data.read(tmp_path, trusted=True)  # real torch_geometric objects, same numbers
    assert trusted[4].get_potential_energy() == pytest.approx(-6.0)


def test_oc_lmdb_without_length_key_and_energy_references(tmp_path):
    records = [oc_fields(11, 0, -2.0), oc_fields(12, 0, -3.0)]
    write_lmdb(tmp_path / "a.lmdb", [(str(i).encode(), pickle.dumps(r)) for i, r in enumerate(records)])
    ds = tdn.data.read(tmp_path / "a.lmdb", format="oc20-lmdb")
    assert len(ds) == 2  # entry count stands in for the missing "length" key
    refs = tmp_path / "refs.pkl"
    refs.write_bytes(pickle.dumps({"random11": -100.0, "random12": -200.0}))
    total = tdn.data.read(tmp_path / "a.lmdb", format="oc20-lmdb", ref_energies=refs)
    assert total[0].get_potential_energy() == pytest.approx(-102.0)  # adsorption + per-system reference
    coeff = np.zeros(100)
    coeff[29], coeff[8] = -3.0, -5.0
    np.savez(tmp_path / "linref.npz", coeff=coeff)
    referenced = tdn.data.read(tmp_path / "a.lmdb", format="oc22-lmdb", linear_reference=tmp_path / "linref.npz")
    assert referenced.format == "oc22-lmdb"
    assert referenced[1].get_potential_energy() == pytest.approx(-3.0 - (-3.0 - 3.0 - 5.0))  # E - sum coeff[Z]
    added = tdn.data.read(tmp_path / "a.lmdb", format="oc22-lmdb", linear_reference=tmp_path / "linref.npz",
                          linear_reference_mode="add")
    assert added[1].get_potential_energy() == pytest.approx(-3.0 - 11.0)


class _Exploit:
    def __reduce__(self):
        import os

        return os.system, ("echo pwned",)


def test_restricted_unpickler_refuses_code_and_is_not_skipped(tmp_path):
    write_lmdb(tmp_path / "evil.lmdb", [(b"0", pickle.dumps(_Exploit())), (b"length", pickle.dumps(1))])
    ds = tdn.data.read(tmp_path / "evil.lmdb", format="oc20-lmdb", skip_invalid=True)
    with pytest.raises(tdn.data.UnsafePickleError, match="posix.system|os.system"):
        ds[0]
    with pytest.raises(safe_pickle.UnsafePickle):
        safe_pickle.loads(pickle.dumps(_Exploit()))


def test_restricted_unpickler_loads_tensors_and_arrays_safely():
    value = {"t": torch.arange(4.0), "a": np.arange(3), "s": np.float64(2.5)}
    for protocol in (2, 4, 5):
        out = safe_pickle.loads(pickle.dumps(value, protocol=protocol))
        assert torch.equal(out["t"], value["t"]) and np.array_equal(out["a"], value["a"]) and out["s"] == 2.5


def _energy_in_child(ds):
    return ds[1].get_potential_energy()


def test_lmdb_handles_reopen_after_fork(tmp_path):
    write_oc_lmdb(tmp_path / "d.lmdb", [oc_fields(1, f, -1.0 - f) for f in range(2)])
    ds = tdn.data.read(tmp_path / "d.lmdb")
    parent_energy = ds[0].get_potential_energy()  # opens the environment in the parent
    pid = ds.files[0]._pid
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child_energy = pool.apply(_energy_in_child, (ds,))
    assert parent_energy == pytest.approx(-1.0) and child_energy == pytest.approx(-2.0)
    assert ds.files[0]._pid == pid
    assert pickle.loads(pickle.dumps(ds.files[0]))._env is None  # spawned workers reopen too


# -- PubChemQCR -----------------------------------------------------------------------------------


def step(symbols, coords, energy_ha, grad, charge=True):
    atoms = []
    for s, c in zip(symbols, coords):
        entry = {"atom": s, "x": c[0], "y": c[1], "z": c[2]}
        if charge:
            entry["charge"] = 1.0
        atoms.append(entry)
    gradient = [{"atom": s, "dx": g[0], "dy": g[1], "dz": g[2]} for s, g in zip(symbols, grad)]
    return {"coordinates": atoms, "energy": energy_ha, "gradient": gradient}


def h2_molecule(shift: float) -> dict:
    """pm3 2 steps, hf 2, DFT_1st 3, DFT_2nd 2 of which the first repeats DFT_1st's last."""
    def s(k, e):
        coords = [(0.0, 0.0, 0.0), (0.0, 0.0, 0.70 + 0.01 * k + shift)]
        return step(["H", "H"], coords, e, [(0.0, 0.0, 0.01), (0.0, 0.0, -0.01)])

    return {
        "pm3": [s(0, -0.9), s(1, -0.95)],
        "hf": [s(1, -1.10), s(2, -1.11)],
        "DFT_1st": [s(2, -1.15), s(3, -1.16), s(4, -1.17)],
        "DFT_2nd": [s(4, -1.17), s(5, -1.175)],
    }


def write_pubchemqcr(path, molecules: dict[int, dict]):
    write_lmdb(path, [(f"{cid:09d}".encode(), gzip.compress(pickle.dumps(m))) for cid, m in molecules.items()])


def test_pubchemqcr_units_stages_and_dedup(tmp_path):
    write_pubchemqcr(tmp_path / "shard0.lmdb", {984: h2_molecule(0.0), 15111: h2_molecule(0.1)})
    write_pubchemqcr(tmp_path / "shard1.lmdb", {2: h2_molecule(0.2)})
    ds = tdn.data.read(tmp_path)
    assert ds.format == "pubchemqcr"
    assert len(ds) == 3 * 4  # 3 molecules x (3 DFT_1st + 2 DFT_2nd - 1 repeated boundary step)
    first = ds[0]
    assert first.info["cid"] == 984 and first.info["stage"] == "DFT_1st"
    assert first.get_potential_energy() == pytest.approx(-1.15 * units.Hartree)
    # a gradient of 0.01 Ha/Bohr is a force of -0.514 eV/Å
    assert first.get_forces()[0, 2] == pytest.approx(-0.01 * HARTREE_PER_BOHR)
    assert first.get_forces()[0, 2] == pytest.approx(-0.514, abs=1e-3)
    assert np.allclose(first.positions[1], [0, 0, 0.72])  # Å, as stored
    assert not first.pbc.any() and list(first.numbers) == [1, 1]
    boundary = ds[3]  # the repeated step was dropped: frame 3 is DFT_2nd step 1
    assert (boundary.info["stage"], boundary.info["step"]) == ("DFT_2nd", 1)
    assert ds.groups().tolist() == [984] * 4 + [15111] * 4 + [2] * 4
    assert len(tdn.data.read(tmp_path, dedup=False)) == 3 * 5
    assert len(tdn.data.read(tmp_path, stages=("pm3", "hf", "DFT_1st", "DFT_2nd"))) == 3 * 6  # 9 steps, 3 repeats
    assert len(tdn.data.read(tmp_path, subset="S")) == 2 * 4  # PubChemQCR-S: the first shard only
    assert len(tdn.data.read(tmp_path, shards=["shard1.lmdb"])) == 4


def test_pubchemqcr_atom_refs_index_cache_and_layouts(tmp_path):
    smash = h2_molecule(0.0)
    smash["DFT_1st"] = None  # HF results were copied over: no DFT_1st stage
    smash["DFT_2nd"] = [step(["H", "H"], [(0, 0, 0), (0, 0, 0.74)], -1.0, [(0, 0, 0), (0, 0, 0)], charge=False)]
    arrays = {"DFT_1st": [{"coordinates": np.array([[0, 0, 0], [0, 0, 1.0]]), "atomic_numbers": np.array([8, 1]),
                           "energy": -75.0, "gradient": np.array([[0.02, 0, 0], [-0.02, 0, 0]])}], "DFT_2nd": []}
    write_pubchemqcr(tmp_path / "s.lmdb", {5: smash, 6: arrays})
    cache = tmp_path / "cache"
    ds = tdn.data.read(tmp_path / "s.lmdb", format="pubchemqcr", atom_refs={"H": -0.5 * units.Hartree, 8: -70.0},
                       index_cache=cache)
    assert len(ds) == 2
    assert ds[0].get_potential_energy() == pytest.approx(0.0)  # -1 Ha minus two H references of -0.5 Ha
    assert ds[1].get_potential_energy() == pytest.approx(-75.0 * units.Hartree + 70.0 + 0.5 * units.Hartree)
    assert ds[1].get_forces()[0, 0] == pytest.approx(-0.02 * HARTREE_PER_BOHR)
    assert len(list(cache.glob("*.npz"))) == 1
    again = tdn.data.read(tmp_path / "s.lmdb", format="pubchemqcr", index_cache=cache)
    assert len(again) == 2 and again.groups().tolist() == [5, 6]
    bohr = tdn.data.read(tmp_path / "s.lmdb", format="pubchemqcr", coordinate_unit="bohr")
    assert bohr[0].positions[1, 2] == pytest.approx(0.74 * units.Bohr)


def test_format_inference(tmp_path):
    (tmp_path / "a.extxyz").write_text(XYZ)
    write_oc_lmdb(tmp_path / "oc" / "x.lmdb", [oc_fields(1, 0, -1.0)])
    write_pubchemqcr(tmp_path / "pc" / "x.lmdb", {1: h2_molecule(0.0)})
    write_aselmdb(tmp_path / "al" / "x.lmdb", {1: aselmdb_row(1, False)}, nextid=2)
    assert tdn.data.infer_format(tmp_path / "a.extxyz") == "extxyz"
    assert tdn.data.infer_format(tmp_path / "oc") == "oc20-lmdb"
    assert tdn.data.infer_format(tmp_path / "pc" / "x.lmdb") == "pubchemqcr"
    assert tdn.data.infer_format(tmp_path / "al") == "aselmdb"
    with pytest.raises(ValueError, match="unknown format"):
        tdn.data.read(tmp_path / "a.extxyz", format="cif")
    both = tdn.data.read([tmp_path / "a.extxyz", tmp_path / "a.extxyz"])
    assert len(both) == 6 and both[4].get_potential_energy() == pytest.approx(-2.5)
