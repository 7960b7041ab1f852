"""The lazy, random-access dataset every reader returns.

A reader implements three things: ``_length()``, ``_key(index)`` (how a record is named in error
messages) and ``_load(index)`` (decode one record into labelled Atoms). The base class adds
validation, error wrapping (file + key + reason), optional skipping with counts, slicing into
views, and concatenation. Nothing is decoded before it is asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
from ase import Atoms

from .atoms import validate_atoms
from .errors import InvalidRecordError, RecordProblem, SkipLog, UnsafePickleError


@contextlib.contextmanager
def decoding():
    """Turn any exception raised while decoding raw bytes into RecordProblem("corrupt").

    Record problems (a missing label, an unknown element) and pickle refusals pass through untouched.
    """
    try:
        yield
    except RecordProblem:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the record is corrupt
        raise RecordProblem("corrupt", f"{type(exc).__name__}: {exc}") from exc


def _subscript(records, index):
    """``records[index]`` for a dataset with ``get``: a slice or an index array gives an :class:`AtomsSubset`
    view, an integer the record itself."""
    if isinstance(index, slice):
        return AtomsSubset(records, range(len(records))[index])
    if isinstance(index, (list, tuple, np.ndarray)):
        return AtomsSubset(records, np.asarray(index, dtype=np.int64))
    return records.get(int(index))


class AtomsDataset(Sequence):
    """A lazy Sequence of labelled ase.Atoms.

    ``dataset[i]`` decodes record ``i``. An unusable record raises :class:`InvalidRecordError`, or
    with ``skip_invalid=True`` is counted in ``dataset.skipped`` and comes back as ``None``;
    iteration leaves skipped records out and logs the counts when it ends.

    Args:
        path: the file or directory read.
        skip_invalid: skip (and count) invalid records instead of raising.
        require: labels a record must carry, a subset of ("energy", "forces"); () for unlabelled data.
    """

    format: str = "?"

    def __init__(self, path, *, skip_invalid: bool = False, require: Sequence[str] = ("energy", "forces")):
        self.path = str(path)
        self.skip_invalid = bool(skip_invalid)
        self.require = tuple(require)
        self.skipped = SkipLog(self.path)

    # -- to implement -------------------------------------------------------------------------
    def _length(self) -> int:
        raise NotImplementedError

    def _key(self, index: int) -> str:
        return str(index)

    def _load(self, index: int) -> Atoms:
        raise NotImplementedError

    def groups(self) -> np.ndarray | None:
        """System id per record (OC20 sid, PubChemQCR CID) for leak-free splits; None if the format has none."""
        return None

    def natoms_hint(self) -> np.ndarray | None:
        """Atoms per record when known without decoding records (e.g. fairchem's metadata.npz), else None."""
        return None

    # -- Sequence -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._length()

    def __getitem__(self, index):
        return _subscript(self, index)

    def get(self, index: int) -> Atoms | None:
        """Record ``index`` as Atoms; None only when it is invalid and ``skip_invalid`` is set."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.path}: index {index} out of range for {n} records")
        try:
            with decoding():  # whatever fails while turning the bytes into Atoms makes the record corrupt
                atoms = self._load(index)
            validate_atoms(atoms, self.require)
        except RecordProblem as problem:
            # A refused pickle is a trust decision about the whole file, never a record to skip.
            error_cls = UnsafePickleError if problem.reason == "unsafe_pickle" else InvalidRecordError
            error = error_cls(self.path, self._key(index), problem.reason, problem.detail)
            if error_cls is UnsafePickleError or not self.skip_invalid:
                raise error from problem
            self.skipped.add(index, error)
            return None
        atoms.info.setdefault("source", f"{self.path}:{self._key(index)}")
        return atoms

    def __iter__(self) -> Iterator[Atoms]:
        for i in range(len(self)):
            atoms = self.get(i)
            if atoms is not None:
                yield atoms
        self.skipped.report()

    def summary(self) -> str:
        """Counts of skipped records by reason (so far)."""
        return self.skipped.summary()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, len={len(self)})"


class AtomsSubset(Sequence):
    """A view of some positions of a dataset (used for slices and splits)."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, (slice, list, tuple, np.ndarray)):
            return AtomsSubset(self.dataset, self.indices[index])
        return self.dataset.get(int(self.indices[index]))

    def get(self, index: int) -> Atoms | None:
        return self.dataset.get(int(self.indices[index]))

    def groups(self) -> np.ndarray | None:
        groups = self.dataset.groups()
        return None if groups is None else groups[self.indices]

    def natoms_hint(self) -> np.ndarray | None:
        hint = self.dataset.natoms_hint()
        return None if hint is None else hint[self.indices]

    @property
    def skipped(self) -> SkipLog:
        return self.dataset.skipped

    def __iter__(self) -> Iterator[Atoms]:
        for i in range(len(self)):
            atoms = self.get(i)
            if atoms is not None:
                yield atoms
        self.dataset.skipped.report()


class ConcatAtoms(Sequence):
    """Several datasets read one after the other (e.g. a list of training files)."""

    def __init__(self, datasets: Sequence):
        self.datasets = list(datasets)
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])
        self.path = ",".join(getattr(d, "path", "?") for d in self.datasets)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return part, index - int(self.offsets[part])

    def get(self, index: int) -> Atoms | None:
        part, local = self._locate(index)
        return self.datasets[part].get(local)

    def __getitem__(self, index):
        return _subscript(self, index)

    def groups(self) -> np.ndarray | None:
        parts = [d.groups() for d in self.datasets]
        if any(p is None for p in parts):
            return None
        return np.concatenate(parts)

    def natoms_hint(self) -> np.ndarray | None:
        parts = [d.natoms_hint() for d in self.datasets]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    @property
    def skipped(self) -> SkipLog:
        """Merged view of the parts' skip logs (positions are global)."""
        merged = SkipLog(self.path)
        for offset, dataset in zip(self.offsets, self.datasets):
            log = dataset.skipped
            for index, reason in log._seen.items():
                merged._seen[int(offset) + index if isinstance(index, int) else index] = reason
            for reason, example in log._examples.items():
                merged._examples.setdefault(reason, example)
        return merged

    def summary(self) -> str:
        return self.skipped.summary()

    def __iter__(self) -> Iterator[Atoms]:
        for dataset in self.datasets:
            yield from dataset
