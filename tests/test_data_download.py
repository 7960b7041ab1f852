"""Download scripts offline: fail fast without network; verify, unpack and convert tiny archives made here."""

from __future__ import annotations

import importlib.util
import io
import lzma
import tarfile
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import units
from ase.build import add_adsorbate, fcc100
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

import tdn.data
from tdn.data.download import DownloadError, fetch, file_hash, parse_figshare_files, parse_hf_tree, unpack, verify
from tdn.data.oc import write_oc_lmdb

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
UNREACHABLE = "http://127.0.0.1:9/archive.tar"  # the discard port: connection refused at once


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_fetch_fails_fast_without_network(tmp_path, capsys):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="could not fetch .* --archive"):
        fetch(UNREACHABLE, tmp_path / "a.tar", md5="0" * 32, timeout=3)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "a.tar").exists() and not (tmp_path / "a.tar.part").exists()
    assert load_script("download_oc22").main(["--out", str(tmp_path), "--url", UNREACHABLE, "--timeout", "3"]) == 2
    assert "no network" in capsys.readouterr().err
    assert load_script("download_pubchemqcr").main(["--out", str(tmp_path), "--api", "http://127.0.0.1:9",
                                                    "--timeout", "3"]) == 2
    with pytest.raises(DownloadError, match="without a checksum"):
        fetch(UNREACHABLE, tmp_path / "b.tar")


def test_verify_and_safe_unpack(tmp_path):
    archive = make_tar(tmp_path / "x.tar", {"d/a.txt": b"hello"})
    verify(archive, md5=file_hash(archive, "md5"), sha256=file_hash(archive))
    with pytest.raises(DownloadError, match="md5 is"):
        verify(archive, md5="0" * 32)
    assert (unpack(archive, tmp_path / "out") / "d" / "a.txt").read_bytes() == b"hello"
    evil = make_tar(tmp_path / "evil.tar", {"../escape.txt": b"x"})
    with pytest.raises(DownloadError, match="outside"):
        unpack(evil, tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists()


def oc20_frames():
    frames = []
    for k in range(3):
        slab = fcc100("Cu", size=(2, 2, 2), vacuum=5.0)
        slab.set_tags([0] * 4 + [1] * 4)
        add_adsorbate(slab, "O", 1.5, "hollow")
        slab.set_tags(list(slab.get_tags()[:-1]) + [2])
        slab.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
        slab.pbc = True
        slab.info.pop("adsorbate_info", None)
        slab.rattle(0.02 * (k + 1), seed=k)
        slab.calc = EMT()
        slab.calc = SinglePointCalculator(slab, energy=slab.get_potential_energy(), forces=slab.get_forces())
        frames.append(slab)
    return frames


def test_oc20_archive_is_converted_to_lmdb(tmp_path, monkeypatch):
    frames = oc20_frames()
    text = io.StringIO()
    ase.io.write(text, frames, format="extxyz")
    meta = "random123,frame0,-10.0\nrandom123,frame1,-10.0\nrandom77,frame5,-20.0\n"
    archive = make_tar(tmp_path / "s2ef_tiny.tar", {
        "s2ef_tiny/0.extxyz.xz": lzma.compress(text.getvalue().encode()),
        "s2ef_tiny/0.txt.xz": lzma.compress(meta.encode()),
    })
    script = load_script("download_oc20")
    monkeypatch.setitem(script.ARCHIVES, "200k", ("s2ef_tiny.tar", file_hash(archive, "md5")))
    out = tmp_path / "oc20"
    assert script.main(["--split", "200k", "--archive", str(archive), "--out", str(out)]) == 0
    ds = tdn.data.read(out / "200k")
    assert ds.format == "oc20-lmdb" and len(ds) == 3
    atoms = ds[2]
    assert atoms.info["sid"] == 77 and atoms.info["fid"] == 5
    total = frames[2].get_potential_energy()
    assert atoms.get_potential_energy() == pytest.approx(total + 20.0, abs=1e-5)  # stored as adsorption energy
    assert list(atoms.get_tags()) == [0] * 4 + [1] * 4 + [2]
    assert atoms.constraints[0].get_indices().tolist() == [0, 1, 2, 3]
    assert np.allclose(atoms.calc.results["forces"], frames[2].calc.results["forces"], atol=1e-5)
    totals = tdn.data.read(out / "200k", ref_energies=out / "200k" / "ref_energies.json")
    assert totals[2].get_potential_energy() == pytest.approx(total, abs=1e-5)
    assert ds.groups().tolist() == [123, 123, 77]
    wrong = script.main(["--split", "val_id", "--archive", str(archive), "--out", str(out)])
    assert wrong == 2  # the val_id checksum does not match this archive


def test_oc22_archive_is_unpacked(tmp_path, monkeypatch):
    lmdb_dir = tmp_path / "build" / "data" / "oc22" / "s2ef-total" / "train"
    write_oc_lmdb(lmdb_dir / "data.0000.lmdb", [{"pos": np.zeros((1, 3)), "atomic_numbers": np.array([8.0]),
                                                 "natoms": 1, "y": -4.0, "force": np.zeros((1, 3)),
                                                 "cell": np.eye(3).reshape(1, 3, 3) * 10, "sid": 1, "fid": 0}])
    archive = tmp_path / "oc22.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "build" / "data", arcname="data")
    script = load_script("download_oc22")
    monkeypatch.setattr(script, "MD5", file_hash(archive, "md5"))
    assert script.main(["--archive", str(archive), "--out", str(tmp_path / "oc22")]) == 0
    ds = tdn.data.read(tmp_path / "oc22" / "data" / "oc22" / "s2ef-total" / "train", format="oc22-lmdb")
    assert len(ds) == 1 and ds[0].get_potential_energy() == pytest.approx(-4.0)


def test_rmd17_archive_is_converted_to_ev(tmp_path):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, nuclear_charges=np.array([8, 1, 1]), coords=rng.normal(size=(6, 3, 3)),
             energies=np.arange(6, dtype=float) - 100.0, forces=np.ones((6, 3, 3)))
    archive = make_tar(tmp_path / "rmd17.tar.bz2", {
        "rmd17/npz_data/rmd17_water.npz": buffer.getvalue(),
        "rmd17/splits/index_train_01.csv": b"0\n2\n4\n",
        "rmd17/splits/index_test_01.csv": b"1\n3\n",
    }, mode="w:bz2")
    script = load_script("download_rmd17")
    out = tmp_path / "rmd17"
    assert script.main(["--archive", str(archive), "--md5", file_hash(archive, "md5"), "--out", str(out)]) == 0
    train = tdn.data.read(out / "water" / "train_01.xyz")
    assert len(train) == 3 and len(tdn.data.read(out / "water" / "test_01.xyz")) == 2
    kcal_mol = units.kcal / units.mol  # 0.0433641 eV
    assert train[1].get_potential_energy() == pytest.approx(-98.0 * kcal_mol)
    assert train[1].get_forces()[0, 0] == pytest.approx(kcal_mol) and kcal_mol == pytest.approx(0.0433641, rel=1e-5)
    assert not train[0].pbc.any()
    assert script.main(["--archive", str(archive), "--out", str(out)]) == 2  # no checksum given: refused


def test_publisher_listings_are_parsed():
    tree = [
        {"type": "directory", "path": "lmdb"},
        {"type": "file", "path": "lmdb/b.lmdb", "size": 10, "lfs": {"oid": "bb" * 32, "size": 10}},
        {"type": "file", "path": "lmdb/a.lmdb", "size": 10, "lfs": {"oid": "aa" * 32, "size": 10}},
        {"type": "file", "path": "README.md", "size": 5},
    ]
    files = parse_hf_tree(tree, "divelab/PubChemQCR")
    assert set(files) == {"lmdb/a.lmdb", "lmdb/b.lmdb"} and files["lmdb/a.lmdb"]["sha256"] == "aa" * 32
    assert files["lmdb/a.lmdb"]["url"].endswith("/datasets/divelab/PubChemQCR/resolve/main/lmdb/a.lmdb")
    script = load_script("download_pubchemqcr")
    assert list(script.select_shards(files, "S")) == ["lmdb/a.lmdb"]
    assert len(script.select_shards(files, None)) == 2
    article = {"files": [{"name": "rmd17.tar.bz2", "download_url": "https://x/1", "computed_md5": "ab" * 16}]}
    assert parse_figshare_files(article)["rmd17.tar.bz2"]["md5"] == "ab" * 16
