"""ASE databases: SQLite ``.db`` and ``.json`` through ase.db, and ``.aselmdb`` (LMDB) directly.

An aselmdb file (fairchem / ase-db-backends) is a single-file LMDB: key ``"<id>"`` holds a
zlib-compressed JSON row dict (numbers, positions, cell, pbc, energy, forces, stress, tags,
constraints, key_value_pairs, data, ...); ``"nextid"`` and ``"deleted_ids"`` hold zlib-compressed
JSON too. Arrays come in two encodings, both accepted: plain nested lists (orjson with
OPT_SERIALIZE_NUMPY) and ASE's ``{"__ndarray__": [shape, dtype, flat]}``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.db.row import AtomsRow

from .atoms import fixed_mask, get_energy, get_forces, get_stress, make_atoms
from .base import AtomsDataset, decoding
from .errors import RecordProblem
from .lmdb_utils import LmdbFile, find_shards

_ARRAY_FIELDS = ("numbers", "positions", "cell", "pbc", "forces", "stress", "tags", "momenta",
                 "initial_magmoms", "initial_charges", "magmoms", "charges", "masses", "energies")


def decode_json_arrays(obj):
    """Replace ASE's ``{"__ndarray__": [shape, dtype, flat]}`` encodings by numpy arrays, recursively."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            shape, dtype, flat = obj["__ndarray__"]
            return np.asarray(flat, dtype=dtype).reshape(shape)
        if "__complex_ndarray__" in obj:
            shape, dtype, (real, imag) = obj["__complex_ndarray__"]
            return (np.asarray(real) + 1j * np.asarray(imag)).astype(dtype).reshape(shape)
        return {k: decode_json_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_json_arrays(v) for v in obj]
    return obj


def _user_label(row: AtomsRow, key: str | None):
    if key is None:
        return None
    for source in (row.get("key_value_pairs") or {}, row.get("data") or {}):
        if key in source:
            return source[key]
    return None


def row_to_atoms(row: AtomsRow, energy_key: str | None = None, forces_key: str | None = None) -> Atoms:
    """Labelled Atoms from an ase.db row; custom label keys are looked up in key_value_pairs and data."""
    with decoding():
        raw = row.toatoms()
    energy = _user_label(row, energy_key)
    forces = _user_label(row, forces_key)
    info = dict(row.get("key_value_pairs") or {})
    info["id"] = row.get("id")
    if row.get("unique_id") is not None:
        info["unique_id"] = row.get("unique_id")
    return make_atoms(
        raw.numbers,
        raw.positions,
        cell=raw.cell.array,
        pbc=raw.pbc,
        energy=get_energy(raw) if energy is None else energy,
        forces=get_forces(raw) if forces is None else forces,
        stress=get_stress(raw),
        tags=raw.get_tags(),
        fixed=fixed_mask(raw),
        info=info,
    )


class AseDbDataset(AtomsDataset):
    """Rows of an ASE SQLite (.db) or JSON (.json) database, in id order.

    Args:
        path: the database file.
        energy_key, forces_key: read labels from this key_value_pairs / data key instead of the
            stored calculator results (eV, eV/Å).
        skip_invalid, require: see :class:`AtomsDataset`.
    """

    format = "asedb"

    def __init__(self, path, *, energy_key: str | None = None, forces_key: str | None = None,
                 skip_invalid: bool = False, require: Sequence[str] = ("energy", "forces")):
        super().__init__(path, skip_invalid=skip_invalid, require=require)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        self.energy_key = energy_key
        self.forces_key = forces_key
        self._db = None
        self._pid = None
        self._ids = None

    @property
    def db(self):
        # SQLite connections must not cross fork(): reconnect in each process.
        if self._db is None or self._pid != os.getpid():
            import ase.db

            self._db = ase.db.connect(self.path, type="json" if self.path.endswith(".json") else "db")
            self._pid = os.getpid()
        return self._db

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_db"] = None
        state["_pid"] = None
        return state

    @property
    def ids(self) -> list[int]:
        if self._ids is None:
            if self.path.endswith(".json"):
                self._ids = sorted(row.id for row in self.db.select(include_data=False))
            else:
                with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as con:
                    self._ids = [r[0] for r in con.execute("SELECT id FROM systems ORDER BY id")]
        return self._ids

    def _length(self) -> int:
        return len(self.ids)

    def _key(self, index: int) -> str:
        return f"id {self.ids[index]}"

    def _load(self, index: int) -> Atoms:
        with decoding():
            row = self.db.get(id=self.ids[index])
        return row_to_atoms(row, self.energy_key, self.forces_key)


def _zjson(value: bytes):
    return json.loads(zlib.decompress(value).decode("utf-8"))


class AseLmdbDataset(AtomsDataset):
    """Rows of one or more .aselmdb files (a file, or a directory of them read in name order).

    Args:
        path: an .aselmdb file or a directory of them.
        energy_key, forces_key: as for :class:`AseDbDataset`.
        skip_invalid, require: see :class:`AtomsDataset`.
    """

    format = "aselmdb"

    def __init__(self, path, *, energy_key: str | None = None, forces_key: str | None = None,
                 skip_invalid: bool = False, require: Sequence[str] = ("energy", "forces")):
        super().__init__(path, skip_invalid=skip_invalid, require=require)
        self.files = [LmdbFile(p) for p in find_shards(path, (".aselmdb", ".lmdb"))]
        self.energy_key = energy_key
        self.forces_key = forces_key
        self._ids = None
        self._offsets = None

    def _row_ids(self, shard: LmdbFile) -> list[int]:
        nextid = shard.get(b"nextid")
        deleted = shard.get(b"deleted_ids")
        deleted = set(_zjson(deleted)) if deleted is not None else set()
        if nextid is not None:
            return [i for i in range(1, int(_zjson(nextid))) if i not in deleted]
        # No bookkeeping keys: every integer key is a row.
        return sorted(int(k) for k in shard.keys() if k.isdigit() and int(k) not in deleted)

    def _index(self):
        if self._ids is None:
            self._ids = [self._row_ids(f) for f in self.files]
            self._offsets = np.cumsum([0] + [len(i) for i in self._ids])
        return self._ids, self._offsets

    def _locate(self, index: int) -> tuple[int, int]:
        _, offsets = self._index()
        shard = int(np.searchsorted(offsets, index, side="right") - 1)
        return shard, self._ids[shard][index - int(offsets[shard])]

    def _length(self) -> int:
        return int(self._index()[1][-1])

    def _key(self, index: int) -> str:
        shard, row_id = self._locate(index)
        return f"{Path(self.files[shard].path).name}:{row_id}"

    def _load(self, index: int) -> Atoms:
        shard, row_id = self._locate(index)
        value = self.files[shard].get(str(row_id).encode("ascii"))
        if value is None:
            raise RecordProblem("corrupt", f"row {row_id} listed but missing")
        with decoding():
            dct = decode_json_arrays(_zjson(value))
            for field in _ARRAY_FIELDS:
                if field in dct and dct[field] is not None:
                    dct[field] = np.asarray(dct[field])
            dct["id"] = row_id
            row = AtomsRow(dct)
        return row_to_atoms(row, self.energy_key, self.forces_key)
