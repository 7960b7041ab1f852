"""PubChemQCR relaxation trajectories (Fu et al. 2025) from their LMDB shards.

Layout (as published with the dataset, ``Code/database.md``): single-file LMDBs (``subdir=False``);
key = the PubChem CID as 9 ASCII digits (``b"000015111"``); value = ``gzip`` of a pickled dict

    {"pm3": [step, ...], "hf": [step, ...], "DFT_1st": [step, ...] or None, "DFT_2nd": [step, ...]}

and each step is

    {"coordinates": [{"atom": "C", "charge": 6.0, "x": ..., "y": ..., "z": ...}, ...],   # Å
     "energy": float,                                                                 # Hartree
     "gradient": [{"atom": "C", "charge": 6.0, "dx": ..., "dy": ..., "dz": ...}, ...]}   # Hartree/Bohr

(``charge`` is absent for steps computed with SMASH). An array layout is accepted too:
``{"coordinates": [N,3], "atomic_numbers": [N] (or "numbers"/"symbols"), "energy", "gradient": [N,3]}``.

The last step of one stage has the same coordinates as the first step of the next, so when stages
are concatenated that repeated first step is dropped (``dedup=True``). Units are converted with
ase.units: energy * Hartree -> eV, force = -gradient * Hartree / Bohr -> eV/Å.

Finding the frames of a molecule means decompressing it, so the frame index (CIDs and frame
counts per shard) is built once on first use and, with ``index_cache``, saved to disk.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms, units

from . import safe_pickle
from .atoms import check_numbers, make_atoms, symbol_to_number
from .base import AtomsDataset, decoding
from .errors import InvalidRecordError, RecordProblem
from .lmdb_utils import LmdbFile, find_shards
from .oc import linear_reference_energy, load_linear_reference

logger = logging.getLogger("tdn.data")

STAGES = ("pm3", "hf", "DFT_1st", "DFT_2nd")
DEFAULT_STAGES = ("DFT_1st", "DFT_2nd")
FORCE_UNIT = units.Hartree / units.Bohr  # 1 Ha/Bohr = 51.42 eV/Å


def _per_atom(entries, names: tuple[str, str, str]) -> np.ndarray:
    return np.array([[float(a[n]) for n in names] for a in entries], dtype=np.float64).reshape(-1, 3)


def step_numbers(step: dict) -> np.ndarray:
    """Atomic numbers of a step, from per-atom dicts ("atom" symbol) or an array field."""
    coords = step.get("coordinates")
    if coords is not None and len(coords) and isinstance(coords[0], dict):
        return np.array([symbol_to_number(a["atom"]) for a in coords], dtype=np.int64)
    for key in ("atomic_numbers", "numbers", "Z"):
        if step.get(key) is not None:
            return check_numbers(np.asarray(step[key]))
    if step.get("symbols") is not None:
        return np.array([symbol_to_number(s) for s in step["symbols"]], dtype=np.int64)
    raise RecordProblem("corrupt", "step has neither per-atom dicts nor atomic numbers")


def step_positions(step: dict) -> np.ndarray:
    """Coordinates [N,3] as stored (per-atom x/y/z dicts or an array)."""
    coords = step.get("coordinates")
    if coords is None:
        raise RecordProblem("corrupt", "step has no coordinates")
    if len(coords) and isinstance(coords[0], dict):
        return _per_atom(coords, ("x", "y", "z"))
    return np.asarray(coords, dtype=np.float64).reshape(-1, 3)


def step_gradient(step: dict) -> np.ndarray | None:
    """Gradient [N,3] as stored (Hartree/Bohr), or None."""
    grad = step.get("gradient")
    if grad is None:
        return None
    if len(grad) and isinstance(grad[0], dict):
        return _per_atom(grad, ("dx", "dy", "dz"))
    grad = np.asarray(grad, dtype=np.float64)
    # only a flat array is reshaped: any other shape is kept, so that a shape error quotes the stored one
    return grad.reshape(-1, 3) if grad.ndim == 1 and grad.size % 3 == 0 else grad


def select_steps(molecule: dict, stages: Sequence[str], dedup: bool = True) -> list[tuple[str, int, dict]]:
    """The (stage, step number, step) frames of a molecule for the chosen stages, in order.

    With ``dedup`` the first step of a stage is dropped when its coordinates repeat the last kept step.
    """
    frames: list[tuple[str, int, dict]] = []
    for stage in stages:
        steps = molecule.get(stage) or []  # DFT_1st is None when HF results were copied over
        for i, step in enumerate(steps):
            if dedup and i == 0 and frames:
                prev = step_positions(frames[-1][2])
                here = step_positions(step)
                if prev.shape == here.shape and np.allclose(prev, here, rtol=0.0, atol=1e-6):
                    continue
            frames.append((stage, i, step))
    return frames


def decode_molecule(raw: bytes, trusted: bool = False) -> dict:
    """gzip + pickle -> the stage dict of one molecule."""
    with decoding():
        value = safe_pickle.loads(gzip.decompress(raw), trusted=trusted)
    if not isinstance(value, dict):
        raise RecordProblem("corrupt", f"value is a {type(value).__name__}, not a dict of stages")
    return value


class PubChemQCRDataset(AtomsDataset):
    """PubChemQCR frames, one per relaxation step.

    Args:
        path: a directory of *.lmdb shards (read in name order) or one .lmdb file.
        stages: which stages to read, in order, from "pm3", "hf", "DFT_1st", "DFT_2nd".
        dedup: drop the repeated boundary step between consecutive stages.
        atom_refs: per-element energies (eV) subtracted from every energy: {Z or symbol: eV}, a JSON
            file of that, or an .npz with ``coeff`` indexed by Z.
        shards: only these shards: an int n (the first n by name) or a list of file names.
        subset: "S" for PubChemQCR-S (= ``shards=1``); None for everything.
        coordinate_unit: "angstrom" (as published) or "bohr".
        index_cache: a directory where the frame index is saved and reused.
        trusted: plain pickle instead of the restricted unpickler.
        skip_invalid, require: see :class:`AtomsDataset`.
    """

    format = "pubchemqcr"

    def __init__(
        self,
        path,
        *,
        stages: Sequence[str] = DEFAULT_STAGES,
        dedup: bool = True,
        atom_refs=None,
        shards: int | Sequence[str] | None = None,
        subset: str | None = None,
        coordinate_unit: str = "angstrom",
        index_cache=None,
        trusted: bool = False,
        skip_invalid: bool = False,
        require: Sequence[str] = ("energy", "forces"),
    ):
        super().__init__(path, skip_invalid=skip_invalid, require=require)
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {stages}")
        if coordinate_unit not in ("angstrom", "bohr"):
            raise ValueError(f"coordinate_unit must be 'angstrom' or 'bohr', got {coordinate_unit!r}")
        if subset not in (None, "S"):
            raise ValueError(f"subset must be None or 'S', got {subset!r}")
        self.stages = stages
        self.dedup = bool(dedup)
        self.length_scale = 1.0 if coordinate_unit == "angstrom" else units.Bohr
        self.atom_refs = None if atom_refs is None else load_linear_reference(atom_refs)
        self.trusted = bool(trusted)
        self.index_cache = None if index_cache is None else Path(index_cache)
        paths = find_shards(path, (".lmdb",))
        if subset == "S":
            shards = 1
        if isinstance(shards, int):
            paths = paths[:shards]
        elif shards is not None:
            wanted = set(shards)
            paths = [p for p in paths if p.name in wanted]
            missing = wanted - {p.name for p in paths}
            if missing:
                raise FileNotFoundError(f"{path}: shards not found: {sorted(missing)}")
        self.files = [LmdbFile(p) for p in paths]
        self._index = None
        self._cache: OrderedDict = OrderedDict()  # last few decoded molecules (consecutive frames share one)

    # -- index --------------------------------------------------------------------------------
    def _cache_file(self, shard: LmdbFile) -> Path | None:
        if self.index_cache is None:
            return None
        stat = shard.path.stat()
        tag = json.dumps([str(shard.path.resolve()), stat.st_size, stat.st_mtime_ns, self.stages, self.dedup])
        digest = hashlib.sha1(tag.encode()).hexdigest()[:16]
        return self.index_cache / f"{shard.path.stem}-pubchemqcr-index-{digest}.npz"

    def _index_shard(self, shard: LmdbFile) -> tuple[np.ndarray, np.ndarray]:
        cache = self._cache_file(shard)
        if cache is not None and cache.exists():
            with np.load(cache) as npz:
                return npz["cids"], npz["counts"]
        cids, counts = [], []
        with shard.env.begin(write=False) as txn:
            for key, raw in txn.cursor():
                if not key.isdigit():
                    continue  # bookkeeping keys, if any
                try:
                    try:
                        molecule = decode_molecule(raw, self.trusted)
                        with decoding():
                            n = len(select_steps(molecule, self.stages, self.dedup))
                    except RecordProblem as problem:
                        raise InvalidRecordError(str(shard.path), f"CID {key.decode()}", problem.reason,
                                                 problem.detail) from problem
                except InvalidRecordError as error:
                    if not self.skip_invalid or error.reason == "unsafe_pickle":
                        raise
                    self.skipped.add(f"{shard.path.name}:{key.decode()}", error)
                    continue
                cids.append(int(key))
                counts.append(n)
        cids = np.asarray(cids, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, cids=cids, counts=counts)
        return cids, counts

    @property
    def index(self):
        """Per shard: (CIDs, frames per CID, cumulative frame offsets); plus the shard offsets."""
        if self._index is None:
            per_shard = []
            for shard in self.files:
                cids, counts = self._index_shard(shard)
                per_shard.append((cids, counts, np.concatenate([[0], np.cumsum(counts)])))
            shard_offsets = np.cumsum([0] + [int(p[2][-1]) for p in per_shard])
            self._index = (per_shard, shard_offsets)
            if len(self.skipped):
                self.skipped.report()
        return self._index

    def _locate(self, index: int) -> tuple[int, int, int]:
        """Frame index -> (shard number, CID, frame number within the molecule)."""
        per_shard, shard_offsets = self.index
        s = int(np.searchsorted(shard_offsets, index, side="right") - 1)
        cids, _, offsets = per_shard[s]
        local = index - int(shard_offsets[s])
        m = int(np.searchsorted(offsets, local, side="right") - 1)
        return s, int(cids[m]), local - int(offsets[m])

    def _length(self) -> int:
        return int(self.index[1][-1])

    def _key(self, index: int) -> str:
        s, cid, frame = self._locate(index)
        return f"{self.files[s].path.name}:CID {cid:09d} frame {frame}"

    def groups(self) -> np.ndarray:
        """CID per frame: the unit of a leak-free split."""
        per_shard, _ = self.index
        if not per_shard:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.repeat(cids, counts) for cids, counts, _ in per_shard])

    def molecule_frames(self, shard: int, cid: int) -> list[tuple[str, int, dict]]:
        """Selected frames of one molecule (decoded once, kept in a small per-process cache)."""
        key = (shard, cid)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        raw = self.files[shard].get(f"{cid:09d}".encode("ascii"))
        if raw is None:
            raise RecordProblem("corrupt", f"CID {cid:09d} missing from shard")
        molecule = decode_molecule(raw, self.trusted)
        with decoding():
            frames = select_steps(molecule, self.stages, self.dedup)
        self._cache[key] = frames
        if len(self._cache) > 8:
            self._cache.popitem(last=False)
        return frames

    def _load(self, index: int) -> Atoms:
        s, cid, frame = self._locate(index)
        frames = self.molecule_frames(s, cid)
        if frame >= len(frames):
            raise RecordProblem("corrupt", "molecule has fewer frames than indexed (index cache stale?)")
        stage, step_no, step = frames[frame]
        with decoding():
            numbers = step_numbers(step)
            positions = step_positions(step) * self.length_scale
            grad = step_gradient(step)
            energy_ha = step.get("energy")
        energy = None if energy_ha is None else float(energy_ha) * units.Hartree
        if energy is not None and self.atom_refs is not None:
            energy -= linear_reference_energy(numbers, self.atom_refs)
        return make_atoms(
            numbers,
            positions,
            pbc=False,
            energy=energy,
            forces=None if grad is None else -grad * FORCE_UNIT,
            info={"cid": cid, "stage": stage, "step": step_no, "index": index},
        )
