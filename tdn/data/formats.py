"""``read(path, format=None, **options)``: pick the reader for a path and return its lazy dataset."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path

from .asedb import AseDbDataset, AseLmdbDataset
from .base import ConcatAtoms
from .extxyz import ExtxyzDataset
from .lmdb_utils import LmdbFile, find_shards
from .oc import OCLmdbDataset
from .pubchemqcr import PubChemQCRDataset

FORMATS = ("extxyz", "aselmdb", "asedb", "oc20-lmdb", "oc22-lmdb", "pubchemqcr")
_ALIASES = {"xyz": "extxyz", "db": "asedb", "ase-db": "asedb", "json": "asedb", "oc20": "oc20-lmdb",
            "oc22": "oc22-lmdb", "pubchemqcr-lmdb": "pubchemqcr"}


# What the bytes of a file say it is (see sniff_format), and the formats that can read each kind.
CONTENT_READERS = {
    "sqlite": ("asedb", "aselmdb"),  # read() reads an SQLite file given as aselmdb as an ASE db
    "lmdb": ("aselmdb", "oc20-lmdb", "oc22-lmdb", "pubchemqcr"),
    "extxyz": ("extxyz",),
}
CONTENT_NAMES = {"sqlite": "an ASE database (SQLite)", "lmdb": "an LMDB file", "extxyz": "an (extended) XYZ file"}
FILE_FORMATS = ("extxyz", "asedb")  # formats whose path must be a file, not a directory


class EmptyDatasetError(ValueError):
    """A data file (or directory) that holds no structures at all."""

    def __init__(self, path: str):
        super().__init__(f"{path} holds no structures (an empty file?)")
        self.path = path


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(16) == b"SQLite format 3\x00"


def sniff_format(path) -> str | None:
    """What a file's first bytes say it is: "sqlite", "lmdb", "extxyz" (an atom-count line first), or None
    (a directory, an empty file, or anything else)."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"SQLite format 3\x00"):
        return "sqlite"
    if head[16:20] == b"\xde\xc0\xef\xbe":  # LMDB's meta-page magic 0xBEEFC0DE (little-endian)
        return "lmdb"
    first = next((line.strip() for line in head.splitlines() if line.strip()), b"")
    if first.isdigit():
        return "extxyz"
    return None


def canonical_format(format: str) -> str:
    """The name in :data:`FORMATS` of a format or one of its aliases ("xyz", "db", "oc20", ...); ValueError else."""
    fmt = _ALIASES.get(format, format)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    return fmt


def check_format(path, format: str) -> None:
    """Raise ValueError when ``format`` cannot read ``path``: a directory for a single-file format, or a file whose
    content is of another kind (an ASE .db given as extxyz). The message says which format would read it."""
    path = Path(path)
    fmt = canonical_format(format)
    if fmt in FILE_FORMATS and path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, but format {fmt!r} reads a single file: give the file(s)")
    kind = sniff_format(path)
    if kind is not None and fmt not in CONTENT_READERS[kind]:
        options = " or ".join(repr(f) for f in CONTENT_READERS[kind])
        raise ValueError(
            f"{path} is {CONTENT_NAMES[kind]}, not something format {fmt!r} reads: "
            f"use format {options} (or no format, to infer it from the file name)"
        )


def _sniff_lmdb(path: Path) -> str:
    """Tell OC-style LMDBs (keys "0".., "length"; pickles) from PubChemQCR (9-digit CIDs; gzip) and aselmdb."""
    shard = LmdbFile(find_shards(path, (".lmdb",))[0])
    for key in shard.keys():
        if key in (b"nextid", b"deleted_ids", b"metadata"):
            return "aselmdb"
        if key == b"length":
            continue
        value = shard.get(key)
        if value[:2] == b"\x1f\x8b":  # gzip magic: PubChemQCR molecules
            return "pubchemqcr"
        if value[:1] == b"\x78":  # zlib header: aselmdb rows
            return "aselmdb"
        if value[:1] == pickle.PROTO:
            return "oc20-lmdb"
        break
    raise ValueError(f"{path}: cannot tell the LMDB format; pass format=")


def infer_format(path) -> str:
    """Format name for a path, from its suffix or (for LMDBs) by peeking at the first record."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        suffixes = {p.suffix.lower() for p in path.iterdir() if p.is_file()}
        if ".aselmdb" in suffixes:
            return "aselmdb"
        if ".lmdb" in suffixes:
            return _sniff_lmdb(path)
        raise ValueError(f"{path}: directory without .lmdb/.aselmdb files; pass format=")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if name.endswith((".xyz", ".extxyz")):
        return "extxyz"
    if name.endswith(".aselmdb"):
        return "aselmdb"
    if name.endswith(".db") or name.endswith(".json"):
        return "asedb"
    if name.endswith(".lmdb"):
        return _sniff_lmdb(path)
    raise ValueError(f"{path}: cannot infer the format from the name; pass one of {FORMATS}")


def read(path, format: str | None = None, **options):
    """Open a dataset lazily: a random-access Sequence of ase.Atoms with labels attached.

    Args:
        path: a file or directory, or a list of them (read one after the other).
        format: "extxyz", "aselmdb", "asedb" (SQLite .db / .json), "oc20-lmdb", "oc22-lmdb" or
            "pubchemqcr"; inferred from the path when None. A given format is checked against the file's
            first bytes (:func:`check_format`): an SQLite file read as extxyz is a ValueError naming the
            format that reads it.
        **options: reader options; every reader takes ``skip_invalid`` (skip and count bad records
            instead of raising) and ``require`` (labels a record must have). See the reader classes:
            ExtxyzDataset (energy_key, forces_key, stress_key, molecule), AseDbDataset / AseLmdbDataset
            (energy_key, forces_key), OCLmdbDataset (ref_energies, linear_reference,
            linear_reference_mode, pbc, trusted), PubChemQCRDataset (stages, dedup, atom_refs, shards,
            subset, coordinate_unit, index_cache, trusted).

    Returns:
        An AtomsDataset (or ConcatAtoms for a list of paths). ``ds[i]`` is an ase.Atoms with energy
        (eV), forces (eV/Å), stress (eV/Å^3) in a SinglePointCalculator, tags, FixAtoms, and ids in
        ``atoms.info`` (sid/fid for OC, cid/stage/step for PubChemQCR, id for ASE db).
    """
    if isinstance(path, Sequence) and not isinstance(path, (str, bytes, os.PathLike)):
        return ConcatAtoms([read(p, format=format, **options) for p in path])
    if format is not None:
        check_format(path, format)
    fmt = _ALIASES.get(format, format) if format is not None else infer_format(path)
    if fmt == "extxyz":
        return ExtxyzDataset(path, **options)
    if fmt in ("aselmdb", "asedb"):
        # "aselmdb" given for an SQLite/JSON ASE db file: read it as such rather than fail.
        p = Path(path)
        if p.is_file() and (p.suffix == ".json" or _is_sqlite(p)):
            return AseDbDataset(path, **options)
        return AseLmdbDataset(path, **options)
    if fmt in ("oc20-lmdb", "oc22-lmdb"):
        return OCLmdbDataset(path, kind=fmt.split("-")[0], **options)
    if fmt == "pubchemqcr":
        return PubChemQCRDataset(path, **options)
    raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
