"""OC20 / OC22 S2EF LMDBs in the fairchem-v1 layout, and a writer for that layout.

Layout: a directory of ``*.lmdb`` files (or one file), each opened with ``subdir=False``; keys
``b"0" .. b"N-1"`` hold pickled torch_geometric ``Data`` and ``b"length"`` a pickled int (when
absent, the entry count is used). Data fields: ``pos`` [N,3] Å, ``cell`` [1,3,3] Å,
``atomic_numbers`` [N] (float in OC20), ``natoms``, energy ``y`` (or ``energy``) eV, forces
``force`` (or ``forces``) eV/Å, ``tags`` [N] (0 subsurface, 1 surface, 2 adsorbate), ``fixed`` [N],
``sid`` system id, ``fid`` frame id; OC22 adds ``oc22``, ``nads``, ``id``. Pickles from PyG 1
(fields in ``__dict__``) and PyG 2 (``_store``) both load.

Energies: OC20 S2EF LMDBs store adsorption energies (total minus a per-system reference);
``ref_energies`` adds the per-system references back (oc20_ref.pkl: ``{"random<sid>": eV}``).
OC22 stores total energies. ``linear_reference`` (an .npz with ``coeff`` indexed by Z) subtracts
per-element energies (``linear_reference_mode="subtract"``, what fairchem trains on) or adds
them back (``"add"``).
"""

from __future__ import annotations

import copyreg
import io
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from . import safe_pickle
from .atoms import check_numbers, fixed_mask, get_energy, get_forces, get_stress, make_atoms, symbol_to_number
from .base import AtomsDataset, decoding
from .errors import InvalidRecordError, RecordProblem
from .lmdb_utils import LmdbFile, find_shards, write_lmdb


def to_numpy(value) -> np.ndarray | None:
    """Tensor / array / number / None as a numpy array (or None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def to_scalar(value):
    """A 1-element tensor / array / number as a Python number; strings pass through."""
    if value is None or isinstance(value, (str, bytes)):
        return value.decode() if isinstance(value, bytes) else value
    arr = to_numpy(value).reshape(-1)
    if arr.size != 1:
        raise RecordProblem("shape_mismatch", f"expected a scalar, got {arr.size} values")
    return arr[0].item()


def load_linear_reference(source) -> np.ndarray:
    """Per-element reference energies (eV) indexed by Z, from an .npz with ``coeff``, a JSON map or an array."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix == ".json":
            source = json.loads(path.read_text())
        else:
            with np.load(path) as npz:
                if "coeff" not in npz:
                    raise KeyError(f"{path}: no 'coeff' array in linear-reference file")
                return np.asarray(npz["coeff"], dtype=np.float64)
    if isinstance(source, Mapping):
        table = np.zeros(119)
        table[:] = np.nan
        for key, value in source.items():
            z = int(key) if str(key).isdigit() else symbol_to_number(key)
            table[z] = float(value)
        return table
    return np.asarray(source, dtype=np.float64)


def sid_to_int(sid) -> int:
    """OC system ids come as ints, tensors or "random<int>" strings."""
    if isinstance(sid, str):
        return int(sid.removeprefix("random"))
    return int(sid)


def load_reference_energies(source, trusted: bool = False) -> dict:
    """Per-system reference energies (eV): a dict, or a .pkl / .json file of ``{sid: eV}``.

    The pickle is read with the restricted unpickler (it only needs builtins) unless ``trusted``.
    """
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    table = safe_pickle.load_file(path, "ref_energies", trusted=trusted)  # a refused pickle names this file
    if not isinstance(table, Mapping):
        raise ValueError(f"{path}: ref_energies must hold a dict {{sid: eV}}, got a {type(table).__name__}")
    return dict(table)


def linear_reference_energy(numbers: np.ndarray, table: np.ndarray) -> float:
    """Sum of per-element references for a structure; an element outside the table is a record problem."""
    if numbers.max() >= len(table):
        raise RecordProblem("missing_reference", f"no linear reference for Z={int(numbers.max())}")
    values = table[numbers]
    if not np.all(np.isfinite(values)):
        missing = sorted(set(numbers[~np.isfinite(values)].tolist()))
        raise RecordProblem("missing_reference", f"no linear reference for Z={missing}")
    return float(values.sum())


class OCLmdbDataset(AtomsDataset):
    """OC20 / OC22 S2EF LMDB frames.

    Args:
        path: a directory of *.lmdb files (read in name order) or one .lmdb file.
        kind: "oc20" or "oc22" (recorded in ``atoms.info``; the layout is the same).
        ref_energies: per-system references {sid or "random<sid>": eV} (or a .pkl/.json path) added
            to the stored energy: OC20 adsorption energy -> total energy.
        linear_reference: per-element energies indexed by Z (.npz with ``coeff``, JSON, or array).
        linear_reference_mode: "subtract" (E - sum_i coeff[Z_i]) or "add".
        pbc: periodicity assumed when a record does not store one (OC slabs: all True).
        trusted: unpickle with plain pickle (runs code from the file!) instead of the restricted unpickler.
        skip_invalid, require: see :class:`AtomsDataset`.
    """

    format = "oc20-lmdb"

    def __init__(
        self,
        path,
        *,
        kind: str = "oc20",
        ref_energies=None,
        linear_reference=None,
        linear_reference_mode: str = "subtract",
        pbc: Sequence[bool] = (True, True, True),
        trusted: bool = False,
        skip_invalid: bool = False,
        require: Sequence[str] = ("energy", "forces"),
    ):
        super().__init__(path, skip_invalid=skip_invalid, require=require)
        if kind not in ("oc20", "oc22"):
            raise ValueError(f"kind must be 'oc20' or 'oc22', got {kind!r}")
        if linear_reference_mode not in ("subtract", "add"):
            raise ValueError(f"linear_reference_mode must be 'subtract' or 'add', got {linear_reference_mode!r}")
        self.kind = kind
        self.format = f"{kind}-lmdb"
        self.files = [LmdbFile(p) for p in find_shards(path, (".lmdb",))]
        self.trusted = bool(trusted)
        self.ref_energies = None if ref_energies is None else load_reference_energies(ref_energies, self.trusted)
        self.linear_reference = None if linear_reference is None else load_linear_reference(linear_reference)
        self.linear_sign = -1.0 if linear_reference_mode == "subtract" else 1.0
        self.default_pbc = tuple(bool(p) for p in pbc)
        self._offsets = None
        self._groups = None

    # -- index --------------------------------------------------------------------------------
    def _shard_length(self, shard: LmdbFile) -> int:
        raw = shard.get(b"length")
        if raw is not None:
            value = safe_pickle.load_file(shard.path, "length", trusted=self.trusted, data=raw)
            try:
                return int(value)
            except (TypeError, ValueError):
                raise InvalidRecordError(str(shard.path), "length", "corrupt", f"length is {value!r}") from None
        return shard.entries()

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.cumsum([0] + [self._shard_length(f) for f in self.files])
        return self._offsets

    def _locate(self, index: int) -> tuple[LmdbFile, int]:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.files[shard], index - int(self.offsets[shard])

    def _length(self) -> int:
        return int(self.offsets[-1])

    def _key(self, index: int) -> str:
        shard, local = self._locate(index)
        return f"{shard.path.name}:{local}"

    # -- records ------------------------------------------------------------------------------
    def fields(self, index: int) -> dict:
        """The raw field dict of record ``index`` (tensors as stored)."""
        shard, local = self._locate(index)
        raw = shard.get(str(local).encode("ascii"))
        if raw is None:
            raise RecordProblem("corrupt", "key missing from LMDB")
        with decoding():
            obj = safe_pickle.loads(raw, trusted=self.trusted)
        return safe_pickle.record_fields(obj)

    def _energy(self, fields: dict, numbers: np.ndarray) -> float | None:
        energy = to_scalar(fields.get("y", fields.get("energy")))
        if energy is None:
            return None
        if self.ref_energies is not None:
            sid = to_scalar(fields.get("sid"))
            for key in (sid, str(sid), f"random{sid}"):
                if key in self.ref_energies:
                    energy += float(self.ref_energies[key])
                    break
            else:
                raise RecordProblem("missing_reference", f"no per-system reference energy for sid {sid}")
        if self.linear_reference is not None:
            energy += self.linear_sign * linear_reference_energy(numbers, self.linear_reference)
        return float(energy)

    def _load(self, index: int) -> Atoms:
        fields = self.fields(index)
        with decoding():
            pos = to_numpy(fields["pos"]).astype(np.float64).reshape(-1, 3)
            raw_numbers = to_numpy(fields["atomic_numbers"]).reshape(-1)
        numbers = check_numbers(raw_numbers)
        natoms = to_scalar(fields.get("natoms"))
        if natoms is not None and int(natoms) != len(numbers):
            raise RecordProblem("shape_mismatch", f"natoms={natoms} but {len(numbers)} atomic numbers")
        cell = to_numpy(fields.get("cell"))
        pbc = to_numpy(fields.get("pbc"))
        forces = fields.get("force", fields.get("forces"))
        info = {"index": index, "dataset": self.kind}
        for key in ("sid", "fid", "id", "oc22", "nads"):
            if fields.get(key) is not None:
                info[key] = to_scalar(fields[key])
        return make_atoms(
            numbers,
            pos,
            cell=None if cell is None else cell.reshape(3, 3),
            pbc=self.default_pbc if pbc is None else pbc.reshape(-1).astype(bool),
            energy=self._energy(fields, numbers) if len(numbers) else None,
            forces=to_numpy(forces),
            stress=to_numpy(fields.get("stress")),
            tags=to_numpy(fields.get("tags")),
            fixed=to_numpy(fields.get("fixed")),
            info=info,
        )

    def natoms_hint(self) -> np.ndarray | None:
        """Atoms per frame from fairchem's ``metadata.npz`` (``natoms``) next to the LMDBs, if present."""
        meta = Path(self.path) / "metadata.npz"
        if not meta.is_file():
            return None
        with np.load(meta) as npz:
            if "natoms" not in npz or len(npz["natoms"]) != len(self):
                return None
            return np.asarray(npz["natoms"], dtype=np.int64)

    def groups(self) -> np.ndarray:
        """System id (sid) per frame. Reads every record once (then cached); unreadable records get -1."""
        if self._groups is None:
            groups = np.full(len(self), -1, dtype=np.int64)
            for i in range(len(self)):
                try:
                    sid = to_scalar(self.fields(i).get("sid"))
                except RecordProblem:
                    continue
                if sid is not None:
                    groups[i] = sid_to_int(sid)
            self._groups = groups
        return self._groups


def atoms_to_data_fields(atoms: Atoms, sid: int, fid: int, energy: float | None = None, arrays: str = "torch") -> dict:
    """The fairchem-v1 S2EF field dict for one frame, with OC20 dtypes.

    ``arrays="torch"`` stores tensors as fairchem does; ``"numpy"`` stores numpy arrays, whose
    pickles are smaller and identical from run to run (tensor pickles embed memory addresses).
    """
    if arrays not in ("torch", "numpy"):
        raise ValueError(f"arrays must be 'torch' or 'numpy', got {arrays!r}")
    convert = torch.from_numpy if arrays == "torch" else (lambda a: a)

    def arr(values, dtype, shape=None):
        out = np.ascontiguousarray(np.asarray(values, dtype=dtype))
        return convert(out if shape is None else out.reshape(shape))

    energy = get_energy(atoms) if energy is None else energy
    fields = {
        "pos": arr(atoms.positions, np.float32),
        "cell": arr(atoms.cell.array, np.float32, (1, 3, 3)),
        "atomic_numbers": arr(atoms.numbers, np.float32),
        "natoms": len(atoms),
        "tags": arr(atoms.get_tags(), np.int64),
        "fixed": arr(fixed_mask(atoms), np.float32),
        "sid": int(sid),
        "fid": int(fid),
    }
    if energy is not None:
        fields["y"] = float(energy)
    forces = get_forces(atoms)
    if forces is not None:
        fields["force"] = arr(forces, np.float32)
    stress = get_stress(atoms)
    if stress is not None:
        fields["stress"] = arr(stress, np.float32, (1, 3, 3))
    return fields


def write_oc_lmdb(path, records: Sequence[dict], pyg_layout: int = 2) -> None:
    """Write field dicts as pickled torch_geometric Data to one LMDB file in the fairchem-v1 layout.

    ``pyg_layout=2`` pickles real PyG-2 Data objects; ``pyg_layout=1`` writes the PyG-1 layout
    (fields directly in the object's ``__dict__``), as the original OC20/OC22 files have it.
    """
    from torch_geometric.data import Data

    def encode(fields: dict) -> bytes:
        if pyg_layout == 2:
            return pickle.dumps(Data(**fields), protocol=pickle.HIGHEST_PROTOCOL)
        # PyG 1 kept fields as plain instance attributes; build such an object and pickle its __dict__.
        old = Data.__new__(Data)
        old.__dict__.update(fields)
        buffer = io.BytesIO()
        _PyG1Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(old)
        return buffer.getvalue()

    items = [(str(i).encode("ascii"), encode(r)) for i, r in enumerate(records)]
    items.append((b"length", pickle.dumps(len(records), protocol=pickle.HIGHEST_PROTOCOL)))
    write_lmdb(path, items)


class _PyG1Pickler(pickle.Pickler):
    """Pickles Data as PyG 1 did: NEWOBJ of the class, then its instance ``__dict__`` as state."""

    def reducer_override(self, obj):
        from torch_geometric.data import Data

        if type(obj) is Data:
            return copyreg.__newobj__, (Data,), dict(obj.__dict__)
        return NotImplemented
