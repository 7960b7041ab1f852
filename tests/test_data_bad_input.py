"""Bad input: an error naming file, key and reason — or, with skip_invalid, a count by reason. Never a silent drop."""

from __future__ import annotations

import gzip
import logging
import pickle
import zlib

import numpy as np
import pytest
import torch

import tdn.data
from tdn.data.lmdb_utils import write_lmdb
from tdn.data.oc import write_oc_lmdb

GOOD = '2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="F F F"\nH 0 0 0 0 0 0.1\nH 0 0 0.7 0 0 -0.1\n'
BAD_FRAMES = {
    "corrupt": '2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0\nH 0 zero 0 0 0 0\nH 0 0 0.7 0 0 0\n',
    "missing_energy": '1\nProperties=species:S:1:pos:R:3:forces:R:3 pbc="F F F"\nH 0 0 0 0 0 0\n',
    "missing_forces": '1\nProperties=species:S:1:pos:R:3 energy=-1.0 pbc="F F F"\nH 0 0 0\n',
    "unknown_element": '1\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0\nXx 0 0 0 0 0 0\n',
    "nan_positions": '2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0\nH 0 0 0 0 0 0\nH nan 0 0.7 0 0 0\n',
    "nan_labels": '1\nProperties=species:S:1:pos:R:3:forces:R:3 energy=nan pbc="F F F"\nH 0 0 0 0 0 0\n',
    "zero_cell_pbc": '1\nLattice="0 0 0 0 0 0 0 0 0" Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 '
                     'pbc="T T T"\nH 0 0 0 0 0 0\n',
    "empty": '0\nenergy=-1.0\n',
}


def test_extxyz_each_bad_frame_names_file_key_and_reason(tmp_path):
    path = tmp_path / "bad.xyz"
    path.write_text(GOOD + "".join(BAD_FRAMES.values()) + GOOD)
    ds = tdn.data.read(path)
    assert len(ds) == len(BAD_FRAMES) + 2
    assert ds[0] is not None and ds[-1] is not None
    for k, reason in enumerate(BAD_FRAMES, start=1):
        with pytest.raises(tdn.data.InvalidRecordError) as info:
            ds[k]
        assert info.value.reason == reason, (reason, str(info.value))
        assert str(path) in str(info.value) and f"frame {k}" in str(info.value)


def test_skip_invalid_counts_by_reason_and_reports(tmp_path, caplog):
    path = tmp_path / "bad.xyz"
    path.write_text(GOOD + "".join(BAD_FRAMES.values()) + GOOD)
    ds = tdn.data.read(path, skip_invalid=True)
    with caplog.at_level(logging.WARNING, logger="tdn.data"):
        kept = list(ds)  # iteration leaves skipped records out and logs the counts at the end
    assert len(kept) == 2
    assert dict(ds.skipped.counts) == {reason: 1 for reason in BAD_FRAMES}
    assert len(kept) + len(ds.skipped) == len(ds)  # nothing vanished uncounted
    assert "skipped 8 invalid record(s)" in caplog.text and "unknown_element: 1" in caplog.text
    assert ds[3] is None  # random access to a skipped record says so explicitly
    list(ds)
    assert len(ds.skipped) == 8  # a second epoch does not count the same records again
    assert "nan_positions" in ds.summary()


def test_unparseable_count_line_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "broken.xyz"
    path.write_text(GOOD + "two\nnot a frame\n")
    with pytest.raises(tdn.data.InvalidRecordError, match=r"frame 1 \(line 5\).*corrupt"):
        len(tdn.data.read(path, skip_invalid=True))


def oc_record(**changes) -> dict:
    fields = {
        "pos": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.9]]),
        "cell": (torch.eye(3) * 6).view(1, 3, 3),
        "atomic_numbers": torch.tensor([29.0, 8.0]),
        "natoms": 2,
        "y": -1.0,
        "force": torch.zeros(2, 3),
        "tags": torch.tensor([1, 2]),
        "fixed": torch.tensor([0.0, 0.0]),
        "sid": 1,
        "fid": 0,
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def test_oc_lmdb_bad_records(tmp_path):
    good = pickle.dumps(oc_record())
    bad = {
        "corrupt": b"\x80\x04not a pickle",
        "missing_energy": pickle.dumps(oc_record(y=None)),
        "missing_forces": pickle.dumps(oc_record(force=None)),
        "unknown_element": pickle.dumps(oc_record(atomic_numbers=torch.tensor([29.0, 150.0]))),
        "nan_positions": pickle.dumps(oc_record(pos=torch.tensor([[0.0, 0.0, 0.0], [float("nan"), 0.0, 1.0]]))),
        "zero_cell_pbc": pickle.dumps(oc_record(cell=torch.zeros(1, 3, 3))),
        "empty": pickle.dumps(oc_record(pos=torch.zeros(0, 3), atomic_numbers=torch.zeros(0), natoms=0,
                                        force=torch.zeros(0, 3), tags=torch.zeros(0), fixed=torch.zeros(0))),
        "shape_mismatch": pickle.dumps(oc_record(natoms=3)),
    }
    values = [good, *bad.values(), good]
    items = [(str(i).encode(), v) for i, v in enumerate(values)] + [(b"length", pickle.dumps(len(values)))]
    write_lmdb(tmp_path / "bad.lmdb", items)
    strict = tdn.data.read(tmp_path / "bad.lmdb", format="oc20-lmdb")
    for k, reason in enumerate(bad, start=1):
        with pytest.raises(tdn.data.InvalidRecordError) as info:
            strict[k]
        assert info.value.reason == reason, str(info.value)
        assert f"bad.lmdb:{k}" in str(info.value) and str(tmp_path) in str(info.value)
    lenient = tdn.data.read(tmp_path / "bad.lmdb", format="oc20-lmdb", skip_invalid=True)
    assert len(list(lenient)) == 2 and dict(lenient.skipped.counts) == {reason: 1 for reason in bad}


def test_missing_references_are_record_errors(tmp_path):
    write_oc_lmdb(tmp_path / "a.lmdb", [oc_record(sid=5)])
    ds = tdn.data.read(tmp_path / "a.lmdb", ref_energies={"random4": -3.0})
    with pytest.raises(tdn.data.InvalidRecordError, match="missing_reference"):
        ds[0]
    table = np.full(30, np.nan)
    table[29] = -1.0  # no value for oxygen
    with pytest.raises(tdn.data.InvalidRecordError, match="missing_reference"):
        tdn.data.read(tmp_path / "a.lmdb", linear_reference=table)[0]


def test_pubchemqcr_bad_molecules(tmp_path):
    def mol(atom="H", gradient=True):
        step = {"coordinates": [{"atom": atom, "x": 0.0, "y": 0.0, "z": 0.0}], "energy": -0.5}
        if gradient:
            step["gradient"] = [{"atom": atom, "dx": 0.0, "dy": 0.0, "dz": 0.0}]
        return gzip.compress(pickle.dumps({"DFT_1st": [step], "DFT_2nd": []}))

    items = [(b"000000001", mol()), (b"000000002", b"not gzip"), (b"000000003", mol("Qq")),
             (b"000000004", mol(gradient=False))]
    write_lmdb(tmp_path / "p.lmdb", items)
    with pytest.raises(tdn.data.InvalidRecordError, match=r"p.lmdb \[key CID 000000002\]: corrupt"):
        len(tdn.data.read(tmp_path / "p.lmdb", format="pubchemqcr"))
    ds = tdn.data.read(tmp_path / "p.lmdb", format="pubchemqcr", skip_invalid=True)
    assert len(ds) == 3  # the undecodable molecule has no frames; it is counted, not lost
    assert ds[0] is not None and ds[1] is None and ds[2] is None
    assert dict(ds.skipped.counts) == {"corrupt": 1, "unknown_element": 1, "missing_forces": 1}


def test_aselmdb_corrupt_row(tmp_path):
    rows = [(b"1", b"garbage"), (b"nextid", zlib.compress(b"2"))]
    write_lmdb(tmp_path / "x.aselmdb", rows)
    with pytest.raises(tdn.data.InvalidRecordError, match=r"x.aselmdb:1\]: corrupt"):
        tdn.data.read(tmp_path / "x.aselmdb")[0]


def test_unlabelled_data_can_be_read_on_purpose(tmp_path):
    path = tmp_path / "u.xyz"
    path.write_text(BAD_FRAMES["missing_energy"])
    atoms = tdn.data.read(path, require=())[0]
    graph = tdn.data.atoms_to_graph(atoms, 3.0)
    assert torch.isnan(graph.energy).all()  # unlabelled -> NaN, so training on it fails loudly
