"""A committee's force spread during ``tdn-md``: a log column, and a threshold for active learning.

With several models (``tdn-md ... --model a.pt --committee b.pt c.pt``) the calculator is a committee
(:mod:`tdn.committee`) and every log line gets the column ``Fspread[eV/A]``: the force spread
``max_k sqrt(sum_a Var_m F_ka)``, the largest root-mean-square deviation of an atom's force from the committee mean.
With ``--max-force-spread X`` a log step whose spread exceeds ``X`` eV/Å (the configuration is outside what the
committee agrees on, so a candidate for new reference calculations):

* ``--on-spread write``: the frame is appended to ``OUTPUT_DIR/uncertain.extxyz`` (with ``step`` and
  ``force_spread`` in its info) and the run continues;
* ``--on-spread stop``: the frame is written there too, and the run stops with :class:`SpreadStop` (``tdn-md``
  exits with code 1, naming the step and the spread).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ase import Atoms
from ase.io import write

__all__ = ["ON_SPREAD", "SPREAD_COLUMN", "UNCERTAIN_NAME", "SpreadMonitor", "SpreadStop"]

ON_SPREAD = ("stop", "write")
SPREAD_COLUMN = "Fspread[eV/A]"
UNCERTAIN_NAME = "uncertain.extxyz"


class SpreadStop(RuntimeError):
    """An MD run stopped because the committee's force spread passed ``--max-force-spread``."""


class SpreadMonitor:
    """An MD observer for a committee calculator: ``dyn.attach(monitor, interval, dyn)``.

    ``columns`` / :meth:`values` give the log column (the spread of the current step, eV/Å). Called with the
    dynamics object, it compares the spread with ``threshold`` (None: log only) and then writes the frame to
    ``path`` (``action="write"``) or writes it and raises :class:`SpreadStop` (``action="stop"``). ``frames``
    counts the frames written, ``events`` lists ``(step, spread)`` of every step past the threshold.
    """

    columns = (SPREAD_COLUMN,)

    def __init__(self, atoms: Atoms, threshold: float | None = None, action: str = "stop",
                 path: str | Path = UNCERTAIN_NAME) -> None:  # fmt: skip
        if action not in ON_SPREAD:
            raise ValueError(f"action must be one of {ON_SPREAD}, got {action!r}")
        if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be a finite number > 0 eV/Å, got {threshold}")
        self.atoms, self.threshold, self.action, self.path = atoms, threshold, action, Path(path)
        self.frames = 0
        self.events: list[tuple[int, float]] = []

    def spread(self) -> float:
        """The force spread of the current geometry (eV/Å): the calculator's cached ``force_spread``."""
        return float(self.atoms.calc.get_property("force_spread", self.atoms))

    def values(self) -> list[float]:
        return [self.spread()]

    def __call__(self, dyn: Any) -> None:
        spread = self.spread()
        if self.threshold is None or not spread > self.threshold:
            return
        step = int(dyn.nsteps)
        self.events.append((step, spread))
        frame = self.atoms.copy()  # positions, cell, numbers, momenta; the results go in as info
        frame.info.update(step=step, force_spread=spread, energy=self.atoms.get_potential_energy())
        write(self.path, frame, format="extxyz", append=self.frames > 0)
        self.frames += 1
        if self.action == "stop":
            raise SpreadStop(
                f"step {step}: the committee's force spread {spread:.4g} eV/Å is above --max-force-spread "
                f"{self.threshold:g} eV/Å; the frame is in {self.path}"
            )
