"""Extended XYZ files, indexed lazily by byte offset and parsed one frame at a time with ASE.

Label keys are configurable because datasets disagree: rMD17 writes ``Energy=`` (capital E),
MACE-style files ``REF_energy=`` / ``REF_forces``, others plain ``energy`` / ``forces``. With
``molecule=True`` a dummy Lattice (rMD17 stores its molecules in a 50 Å box, which ASE reads as
periodic) is dropped: pbc False and a zero cell.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import ase.io
import numpy as np
from ase import Atoms

from .atoms import make_atoms
from .base import AtomsDataset, decoding
from .errors import InvalidRecordError, RecordProblem

DEFAULT_ENERGY_KEYS = ("REF_energy", "energy", "Energy", "free_energy")
DEFAULT_FORCES_KEYS = ("REF_forces", "forces", "force", "Forces")
DEFAULT_STRESS_KEYS = ("REF_stress", "stress", "Stress")


def _keys(option, defaults) -> tuple[str, ...]:
    if option is None:
        return tuple(defaults)
    return (option,) if isinstance(option, str) else tuple(option)


def _lookup(atoms: Atoms, keys: Sequence[str], per_atom: bool):
    """First of ``keys`` found in the calculator results, info (per-frame) or arrays (per-atom)."""
    results = getattr(atoms.calc, "results", None) or {}
    for key in keys:
        if key in results:
            return results[key]
        if per_atom and key in atoms.arrays:
            return atoms.arrays[key]
        if not per_atom and key in atoms.info:
            return atoms.info[key]
    return None


def index_frames(path: str) -> np.ndarray:
    """Byte offsets of the frames of an XYZ file, plus the file size as the last entry.

    Only the atom-count lines are parsed; a frame whose count line is not an integer ends the
    index with an error naming the line, since the frames after it cannot be located.
    """
    offsets = []
    with open(path, "rb") as handle:
        line_no = 0
        while True:
            start = handle.tell()
            line = handle.readline()
            line_no += 1
            if not line:
                break
            text = line.strip()
            if not text:
                continue  # blank lines between or after frames
            try:
                natoms = int(text.split()[0])
                if natoms < 0:
                    raise ValueError
            except ValueError:
                key = f"frame {len(offsets)} (line {line_no})"
                detail = f"expected an atom count, got {text[:40]!r}"
                raise InvalidRecordError(path, key, "corrupt", detail) from None
            offsets.append(start)
            for _ in range(natoms + 1):  # comment line + atom lines
                if not handle.readline():
                    break
                line_no += 1
        offsets.append(handle.tell())
    return np.asarray(offsets, dtype=np.int64)


class ExtxyzDataset(AtomsDataset):
    """Frames of an extended XYZ file.

    Args:
        path: .xyz / .extxyz file.
        energy_key: info key (or keys, first found wins) holding the energy in eV; default tries
            REF_energy, energy, Energy, free_energy.
        forces_key: per-atom array key(s) for forces in eV/Å; default REF_forces, forces, force, Forces.
        stress_key: info key(s) for stress in eV/Å^3 (Voigt-6 or 3x3); default REF_stress, stress, Stress.
        molecule: treat every frame as an isolated molecule (pbc False, zero cell), e.g. rMD17.
        skip_invalid, require: see :class:`AtomsDataset`.
    """

    format = "extxyz"

    def __init__(
        self,
        path,
        *,
        energy_key: str | Sequence[str] | None = None,
        forces_key: str | Sequence[str] | None = None,
        stress_key: str | Sequence[str] | None = None,
        molecule: bool = False,
        skip_invalid: bool = False,
        require: Sequence[str] = ("energy", "forces"),
    ):
        super().__init__(path, skip_invalid=skip_invalid, require=require)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        self.energy_keys = _keys(energy_key, DEFAULT_ENERGY_KEYS)
        self.forces_keys = _keys(forces_key, DEFAULT_FORCES_KEYS)
        self.stress_keys = _keys(stress_key, DEFAULT_STRESS_KEYS)
        self.molecule = bool(molecule)
        self._offsets = None

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = index_frames(self.path)
        return self._offsets

    def _length(self) -> int:
        return len(self.offsets) - 1

    def _key(self, index: int) -> str:
        return f"frame {index}"

    def _read_text(self, index: int) -> str:
        start, end = self.offsets[index], self.offsets[index + 1]
        with open(self.path, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start).decode("utf-8", errors="replace")

    def _load(self, index: int) -> Atoms:
        text = self._read_text(index)
        header = text.split("\n", 1)[0].strip()
        if header == "0":
            raise RecordProblem("empty", "frame with zero atoms")
        try:
            with decoding():
                raw = ase.io.read(io.StringIO(text), format="extxyz", index=0)
        except RecordProblem as problem:
            cause = problem.__cause__
            if isinstance(cause, KeyError):  # ASE raises KeyError for an unknown element symbol
                raise RecordProblem("unknown_element", f"element symbol {cause}") from cause
            raise
        energy = _lookup(raw, self.energy_keys, per_atom=False)
        forces = _lookup(raw, self.forces_keys, per_atom=True)
        stress = _lookup(raw, self.stress_keys, per_atom=False)
        pbc = False if self.molecule else raw.pbc
        cell = None if self.molecule else raw.cell.array
        info = {k: v for k, v in raw.info.items() if k not in self.energy_keys + self.stress_keys}
        info["index"] = index
        atoms = make_atoms(
            raw.numbers,
            raw.positions,
            cell=cell,
            pbc=pbc,
            energy=None if energy is None else float(np.asarray(energy).reshape(-1)[0]),
            forces=forces,
            stress=stress,
            tags=raw.get_tags(),
            info=info,
        )
        atoms.set_constraint(raw.constraints)  # e.g. FixAtoms from an OC20-style move_mask column
        return atoms
