"""What ``tdn-md`` checks before and during a run: its input (files, frame, options, output directory), reported as
:class:`UsageError` (exit code 2, one or two lines, no traceback), and blow-ups of the run (temperature or
total-energy drift past a limit), warned as :class:`MDBlowupWarning` or stopped with :class:`MDBlowupError`.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ase import Atoms, units
from ase.io import read

from .md_spread import UNCERTAIN_NAME

# Files a run writes into its output directory (all of them are replaced by a run with overwrite).
OUTPUT_NAMES = ("md.log", "trajectory.extxyz", "trajectory.traj", "thermo.png", UNCERTAIN_NAME)
INPUT_FORMATS = "any format ase.io.read knows: extxyz, cif, POSCAR, .traj, ..."


class UsageError(ValueError):
    """A mistake in what the user gave ``tdn-md``: a file, a frame, an option. Its message names it and the fix."""


def run_command(prog: str, run: Callable[[], int], debug: bool,
                stopped: tuple[type[BaseException], ...] = ()) -> int:  # fmt: skip
    """``run()``'s exit status, with errors as a command reports them: a :class:`UsageError` in one line and status 2,
    a run ended by one of ``stopped`` (a blow-up, say) as "stopped" and status 1, anything else in one line and
    status 1; ``debug`` re-raises instead (the traceback)."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - a one-line report; --debug shows the traceback
        if debug:
            raise
        if isinstance(err, UsageError):
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, stopped):
            print(f"{prog}: stopped: {err}", file=sys.stderr)
            return 1
        print(f"{prog}: error: {type(err).__name__}: {err}\n  (--debug shows the traceback)", file=sys.stderr)
        return 1


class MDBlowupWarning(RuntimeWarning):
    """The temperature or the total-energy drift of an MD run passed its limit."""


class MDBlowupError(RuntimeError):
    """An MD run stopped because it blew up: a limit was passed (with ``stop``), the energy is no longer finite,
    or the geometry can no longer be evaluated (atoms on top of each other, non-finite positions)."""


# ------------------------------------------------------------------------------------------------ input
def read_structure(path: str | Path, index: str | int = -1) -> Atoms:
    """Frame ``index`` (an integer, negative from the end) of a structure file; a :class:`UsageError` naming the
    file and the frame when it is missing, unreadable or has no such frame."""
    path = Path(path)
    try:
        index = int(index)
    except ValueError:
        raise UsageError(f"--index must be one frame number (0, 1, ... or -1 for the last), got {index!r}") from None
    if not path.is_file():
        raise UsageError(f"structure file {path} does not exist (or is not a file): give a path to {INPUT_FORMATS}")
    try:
        if index >= -1:
            try:
                return _one_frame(read(path, index=index), path)
            except (StopIteration, IndexError):
                pass  # past the end: counted below for the message
        frames = read(path, index=":")
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - ase.io raises many types; all mean the same to the user
        raise UsageError(f"cannot read structure file {path}: {err}\n  give a file in {INPUT_FORMATS}") from None
    count = len(frames)
    if not -count <= index < count:
        raise UsageError(
            f"--index {index} is out of range: {path} has {count} frame{'s' if count != 1 else ''}"
            + (f" (use 0..{count - 1}, or -1..-{count} from the end)" if count else "")
        )
    return _one_frame(frames[index], path)


def _one_frame(atoms: Any, path: Path) -> Atoms:
    if not isinstance(atoms, Atoms):
        raise UsageError(f"cannot read one structure from {path}: got {type(atoms).__name__}")
    return atoms


def check_output_dir(path: str | Path, overwrite: bool) -> None:
    """A :class:`UsageError` when ``path`` is a file, or a non-empty directory and ``overwrite`` is False."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output directory {path} is a file: choose another -o")
    if path.is_dir() and not overwrite:
        names = sorted(p.name for p in path.iterdir())
        if names:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise UsageError(
                f"output directory {path} is not empty ({shown}): choose another -o, or pass --overwrite to "
                f"replace the run's files ({', '.join(OUTPUT_NAMES)})"
            )


def clear_outputs(path: str | Path) -> None:
    """Remove the files an earlier run wrote into ``path`` (:data:`OUTPUT_NAMES`); nothing else."""
    for name in OUTPUT_NAMES:
        (Path(path) / name).unlink(missing_ok=True)


def check_number(option: str, value: float | None, *, low: float | None = None, strict: bool = False,
                 unit: str = "") -> None:  # fmt: skip
    """A :class:`UsageError` naming ``option`` unless ``value`` is None or a finite number above ``low`` (or at it,
    unless ``strict``)."""
    if value is None:
        return
    ok = math.isfinite(value) and (low is None or (value > low if strict else value >= low))
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}{unit}"
        raise UsageError(f"{option} must be a finite number{bound}, got {value}")


# ------------------------------------------------------------------------------------------------ blow-ups
@dataclass
class BlowupLimits:
    """When an MD run counts as blowing up (checked at every log step) and whether to stop it.

    ``max_temperature`` (K); None: 10 times the larger of the thermostat target (thermostatted ensembles) and the
    initial temperature, at least 5000 K. ``max_energy_drift`` (eV/atom, |Etot - Etot(start)| / N); None: 1 eV/atom,
    plus ``3 kB T`` for a thermostatted ensemble (what a thermostat at ``T`` may add). Non-finite energies always
    stop the run.
    """

    max_temperature: float | None = None
    max_energy_drift: float | None = None
    stop: bool = False

    def resolved(self, ensemble: str, target_temperature: float, initial_temperature: float) -> tuple[float, float]:
        """``(max_temperature, max_energy_drift)`` with the defaults filled in."""
        thermostat = target_temperature if ensemble != "nve" else 0.0
        hottest = max(thermostat, initial_temperature)
        max_t = self.max_temperature if self.max_temperature is not None else max(5000.0, 10.0 * hottest)
        drift = self.max_energy_drift
        if drift is None:
            drift = 1.0 + (3.0 * units.kB * hottest if ensemble != "nve" else 0.0)
        return float(max_t), float(drift)


class BlowupMonitor:
    """An MD observer (``dyn.attach(monitor, interval)``) that compares the temperature and the total-energy drift
    per atom with their limits. Past a limit: one :class:`MDBlowupWarning` per kind, or :class:`MDBlowupError` with
    ``stop``; non-finite energies always raise. ``events`` lists ``(step, message)`` of every limit passed."""

    def __init__(self, dyn: Any, atoms: Atoms, max_temperature: float, max_energy_drift: float, stop: bool = False,
                 warn: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.dyn, self.atoms = dyn, atoms
        self.max_temperature, self.max_energy_drift, self.stop = max_temperature, max_energy_drift, stop
        self.warn = warn or (lambda message: warnings.warn(message, MDBlowupWarning, stacklevel=2))
        self.reference: float | None = None  # Etot / N at the first call
        self.events: list[tuple[int, str]] = []
        self._warned: set[str] = set()

    def __call__(self) -> None:
        atoms, step = self.atoms, int(self.dyn.nsteps)
        etot = (atoms.get_potential_energy() + atoms.get_kinetic_energy()) / len(atoms)
        temperature = atoms.get_temperature()
        if not (math.isfinite(etot) and math.isfinite(temperature)):
            raise MDBlowupError(f"step {step}: the energy or the temperature is no longer finite (T = {temperature} K, "
                                f"Etot = {etot} eV/atom): the run blew up{self.hint()}")  # fmt: skip
        if self.reference is None:
            self.reference = etot
        drift = abs(etot - self.reference)
        problems = []
        if temperature > self.max_temperature:
            problems.append(("temperature", f"temperature {temperature:.4g} K is above the limit of "
                                            f"{self.max_temperature:g} K (--max-temperature)"))  # fmt: skip
        if drift > self.max_energy_drift:
            problems.append(("energy", f"total energy drifted by {drift:.3f} eV/atom since the start, above the "
                                       f"limit of {self.max_energy_drift:g} eV/atom (--max-energy-drift)"))  # fmt: skip
        for kind, text in problems:
            message = f"step {step}: {text}: the run is blowing up{self.hint()}"
            self.events.append((step, message))
            if self.stop:
                raise MDBlowupError(message + "; --stop-on-blowup stopped it")
            if kind not in self._warned:
                self._warned.add(kind)
                self.warn(message + "; --stop-on-blowup stops such runs")

    def hint(self) -> str:
        """The likely causes of a blow-up, for messages."""
        dt = self.dyn.dt / units.fs
        return f" (is the time step of {dt:g} fs too long, or the structure far from the model's training data?)"
