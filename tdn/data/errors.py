"""Errors raised for bad input records, and the bookkeeping of records skipped on purpose.

Every reader reports a bad record as :class:`InvalidRecordError`, naming the file, the key (or
index) and a short machine-readable ``reason``. With ``skip_invalid=True`` the record is skipped
instead and counted by reason in a :class:`SkipLog`; the counts are logged when an iteration ends
and can be asked for at any time. Nothing is ever dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger("tdn.data")

#: Reasons a record can be rejected (the ``reason`` attribute of :class:`InvalidRecordError`).
REASONS = (
    "corrupt",  # the bytes could not be decoded / parsed
    "missing_energy",
    "missing_forces",
    "missing_reference",  # a per-system or per-element reference energy is needed but absent
    "unknown_element",
    "nan_positions",
    "nan_labels",  # NaN / inf energy, forces or stress
    "zero_cell_pbc",  # periodic along a direction whose cell vector is zero (or a singular cell)
    "empty",  # no atoms
    "shape_mismatch",  # e.g. forces [M,3] for N != M atoms
    "close_atoms",  # two atoms (or an atom and a periodic image) closer than tdn.data.atoms.MIN_DISTANCE
)


class RecordProblem(Exception):
    """Internal: raised by parsing/validation helpers that do not know the file and key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class InvalidRecordError(ValueError):
    """A record that cannot be used. ``path`` and ``key`` say where it is, ``reason`` what is wrong."""

    def __init__(self, path: str, key: str, reason: str, detail: str = ""):
        msg = f"{path} [key {key}]: {reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
        self.path = path
        self.key = key
        self.reason = reason
        self.detail = detail


class CloseAtomsError(ValueError):
    """Two atoms (or an atom and a periodic image of an atom) closer than a physical lower bound.

    ``i`` and ``j`` are the atom indices of the closest such pair, ``distance`` its distance (Å), ``num_pairs``
    how many pairs are that close and ``min_distance`` the bound (Å).
    """

    def __init__(self, i: int, j: int, distance: float, num_pairs: int, min_distance: float):
        which = f"atom {i} and a periodic image of itself" if i == j else f"atoms {i} and {j}"
        others = f"; {num_pairs} pair(s) in all" if num_pairs > 1 else ""
        super().__init__(f"{which} are {distance:.3g} Å apart, closer than {min_distance:g} Å{others}")
        self.i, self.j, self.distance, self.num_pairs, self.min_distance = i, j, distance, num_pairs, min_distance


class UnsafePickleError(InvalidRecordError):
    """A pickle asked for a class outside the allow-list. Never skipped: it is a trust decision, not bad data."""


class SkipLog:
    """Counts skipped records by reason, once per record so repeated epochs do not inflate it.

    A record is identified by its dataset position (int) or, for records that never got a
    position (a corrupt PubChemQCR molecule found while indexing), by a string key.
    """

    def __init__(self, name: str):
        self.name = name
        self._seen: dict[int | str, str] = {}
        self._examples: dict[str, str] = {}

    def add(self, index: int | str, error: InvalidRecordError) -> None:
        if index not in self._seen:
            self._seen[index] = error.reason
            self._examples.setdefault(error.reason, str(error))

    @property
    def counts(self) -> Counter:
        """Number of skipped records per reason."""
        return Counter(self._seen.values())

    @property
    def indices(self) -> list[int]:
        """Dataset positions that were skipped, sorted."""
        return sorted(k for k in self._seen if isinstance(k, int))

    def __len__(self) -> int:
        return len(self._seen)

    def summary(self) -> str:
        """One line per reason: count and the first example message."""
        if not self._seen:
            return f"{self.name}: no records skipped"
        lines = [f"{self.name}: skipped {len(self._seen)} invalid record(s)"]
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason}: {count}  (e.g. {self._examples[reason]})")
        return "\n".join(lines)

    def report(self) -> None:
        """Log the summary as a warning if anything was skipped."""
        if self._seen:
            logger.warning(self.summary())
