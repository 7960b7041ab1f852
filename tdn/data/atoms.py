"""Building labelled ase.Atoms, reading their labels back, and checking them.

Labels live in a SinglePointCalculator: energy (eV), forces (eV/Å, [N,3]) and stress (eV/Å^3, ASE
sign). Fixed atoms are a FixAtoms constraint, tags are ASE tags (OC20: 0 subsurface, 1 surface,
2 adsorbate).

``MIN_DISTANCE`` is the one physical lower bound on interatomic distances the package uses: closer atoms
(two atoms written at the same position, a duplicated atom) make the spherical harmonics of a zero-length
edge undefined and the loss NaN. :func:`check_min_distance` is the check everyone calls.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.data import chemical_symbols
from ase.stress import voigt_6_to_full_3x3_stress

from .errors import CloseAtomsError, RecordProblem

MAX_Z = len(chemical_symbols) - 1  # 118

#: Å. No two atoms of a physical structure are this close (the shortest bond, H2, is 0.74 Å).
MIN_DISTANCE = 0.1

# Periodic structures are searched with a neighbour list of this cutoff and the pairs filtered: a cell list
# with bins as small as MIN_DISTANCE is far slower than one at a bond length.
_PERIODIC_SEARCH = 2.0


def find_close_pairs(positions, cell=None, pbc=False, min_distance: float = MIN_DISTANCE):
    """Pairs of atoms closer than ``min_distance`` (Å), periodic images included.

    Returns ``(i, j, d)``: int arrays of atom indices with ``i <= j`` (``i == j``: an atom and its own image)
    and float distances, each pair once, sorted by distance.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    pbc_arr = np.broadcast_to(np.asarray(pbc, dtype=bool).reshape(-1), (3,))
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))
    if len(pos) < 2 and not pbc_arr.any():
        return empty
    if not pbc_arr.any():
        from scipy.spatial import cKDTree

        pairs = cKDTree(pos).query_pairs(float(min_distance), output_type="ndarray")
        if len(pairs) == 0:
            return empty
        i, j = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
        d = np.linalg.norm(pos[j] - pos[i], axis=1)
    else:
        from .neighbors import neighbor_list

        box = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
        i, j, shifts = neighbor_list(pos, box, pbc_arr, max(float(min_distance), _PERIODIC_SEARCH))
        d = np.linalg.norm(pos[j] - pos[i] + shifts @ box, axis=1)
        # the list has both directions: keep each pair once (an atom and its own image: the positive shift)
        lead = shifts[np.arange(len(shifts)), np.argmax(shifts != 0, axis=1)] if len(shifts) else shifts[:, 0]
        keep = (d < min_distance) & ((i < j) | ((i == j) & (lead > 0)))
        i, j, d = i[keep], j[keep], d[keep]
    order = np.argsort(d, kind="stable")
    return i[order], j[order], d[order]


def check_min_distance(positions, cell=None, pbc=False, min_distance: float = MIN_DISTANCE) -> None:
    """Raise :class:`tdn.data.CloseAtomsError` (a ValueError) naming the closest pair of atoms closer than
    ``min_distance`` Å (periodic images included); return None when there is none.

    positions [N,3] Å; cell [3,3] Å (may be None or zero for a molecule); pbc a bool or three bools.
    """
    i, j, d = find_close_pairs(positions, cell, pbc, min_distance)
    if len(d):
        raise CloseAtomsError(int(i[0]), int(j[0]), float(d[0]), len(d), float(min_distance))


def symbol_to_number(symbol: str) -> int:
    """Atomic number of an element symbol, tolerant of case ("CL") and label digits ("C12").

    Raises RecordProblem("unknown_element") for anything that is not an element.
    """
    text = "".join(ch for ch in str(symbol).strip() if ch.isalpha())
    text = text[:1].upper() + text[1:].lower()
    if text in chemical_symbols[1:]:
        return chemical_symbols.index(text)
    raise RecordProblem("unknown_element", f"element symbol {symbol!r}")


def check_numbers(numbers: np.ndarray) -> np.ndarray:
    """Atomic numbers as int64, rejecting anything outside 1..118 (and non-integral floats)."""
    z = np.asarray(numbers)
    if z.size and np.issubdtype(z.dtype, np.floating):
        if not np.all(np.isfinite(z)) or np.any(z != np.round(z)):
            raise RecordProblem("unknown_element", f"non-integral atomic numbers {z[:8]}")
    z = z.astype(np.int64).reshape(-1)
    bad = (z < 1) | (z > MAX_Z)
    if np.any(bad):
        raise RecordProblem("unknown_element", f"atomic number(s) {sorted(set(z[bad].tolist()))[:5]}")
    return z


def as_stress_3x3(stress) -> np.ndarray | None:
    """Stress as a 3x3 array from Voigt-6 or any 9-element layout; None stays None."""
    if stress is None:
        return None
    s = np.asarray(stress, dtype=np.float64)
    if s.size == 6:
        return voigt_6_to_full_3x3_stress(s.reshape(6))
    if s.size == 9:
        return s.reshape(3, 3)
    raise RecordProblem("shape_mismatch", f"stress with {s.size} components")


def make_atoms(
    numbers,
    positions,
    *,
    cell=None,
    pbc=False,
    energy: float | None = None,
    forces=None,
    stress=None,
    tags=None,
    fixed=None,
    info: dict | None = None,
) -> Atoms:
    """Labelled Atoms from plain arrays.

    numbers [N] atomic numbers; positions [N,3] Å; cell [3,3] Å (or anything reshapeable to it);
    pbc bool or [3]; energy eV; forces [N,3] eV/Å; stress Voigt-6 or 3x3 eV/Å^3; tags [N] int;
    fixed [N] bool (becomes a FixAtoms constraint).
    """
    z = check_numbers(numbers)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3) if len(z) else np.zeros((0, 3))
    if len(pos) != len(z):
        raise RecordProblem("shape_mismatch", f"{len(pos)} positions for {len(z)} atoms")
    cell_arr = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
    atoms = Atoms(numbers=z, positions=pos, cell=cell_arr, pbc=pbc)
    if tags is not None:
        atoms.set_tags(np.asarray(tags, dtype=np.int64).reshape(-1))
    if fixed is not None:
        mask = np.asarray(fixed).reshape(-1).astype(bool)
        if len(mask) != len(z):
            raise RecordProblem("shape_mismatch", f"fixed mask of length {len(mask)} for {len(z)} atoms")
        if mask.any():
            atoms.set_constraint(FixAtoms(mask=mask))
    results = {}
    if energy is not None:
        results["energy"] = float(energy)
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float64)
        if forces.ndim == 1 and forces.size == 3 * len(z):  # a flat [3N] array
            forces = forces.reshape(-1, 3)
        results["forces"] = forces  # any other shape is kept as stored, for validate_atoms to quote
    if stress is not None:
        results["stress"] = as_stress_3x3(stress)
    if results:
        # Attach results directly: SinglePointCalculator would otherwise check them against the
        # atoms, and a shape error must surface as a record problem from validate_atoms instead.
        calc = SinglePointCalculator(atoms)
        calc.results.update(results)
        atoms.calc = calc
    if info:
        atoms.info.update(info)
    return atoms


def get_energy(atoms: Atoms) -> float | None:
    """Energy (eV) stored on the atoms' calculator results, or None."""
    results = getattr(atoms.calc, "results", None) or {}
    value = results.get("energy", results.get("free_energy"))
    return None if value is None else float(np.asarray(value).reshape(-1)[0])


def get_forces(atoms: Atoms) -> np.ndarray | None:
    """Forces [N,3] (eV/Å) stored on the calculator results, or None."""
    results = getattr(atoms.calc, "results", None) or {}
    value = results.get("forces")
    return None if value is None else np.asarray(value, dtype=np.float64)


def get_stress(atoms: Atoms) -> np.ndarray | None:
    """Stress as 3x3 (eV/Å^3, ASE sign) from the calculator results, or None."""
    results = getattr(atoms.calc, "results", None) or {}
    return as_stress_3x3(results.get("stress"))


def fixed_mask(atoms: Atoms) -> np.ndarray:
    """Boolean [N]: True for atoms held by a FixAtoms constraint."""
    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.get_indices()] = True
    return mask


AXES = "abc"


def cell_problem(cell, pbc, tol: float = 1e-8) -> str | None:
    """What makes ``cell`` unusable with ``pbc``, or None: a periodic direction needs a finite cell vector longer
    than ``tol`` (Å), a fully periodic cell a volume above ``tol``. The one rule of readers, neighbour lists and
    calculators."""
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    for axis in np.flatnonzero(pbc):
        vector = cell[axis]
        if not np.isfinite(vector).all() or np.linalg.norm(vector) < tol:
            return f"pbc is True along {AXES[axis]} but cell vector {AXES[axis]} is {vector.tolist()}"
    if pbc.all() and abs(np.linalg.det(cell)) < tol:
        return f"fully periodic cell has zero volume: {cell.tolist()}"
    return None


def check_cell(cell: np.ndarray, pbc: np.ndarray) -> None:
    """:func:`cell_problem` as a record problem (reason ``zero_cell_pbc``)."""
    problem = cell_problem(cell, pbc)
    if problem:
        raise RecordProblem("zero_cell_pbc", problem)


def validate_atoms(atoms: Atoms, require: Iterable[str] = ("energy", "forces")) -> None:
    """Raise RecordProblem if the structure cannot be trained on.

    Checks: at least one atom, known elements, finite positions, a usable cell where periodic, no two
    atoms closer than :data:`MIN_DISTANCE`, the required labels present ("energy", "forces"), labels
    finite and of the right shape.
    """
    require = set(require)
    n = len(atoms)
    if n == 0:
        raise RecordProblem("empty", "structure has no atoms")
    check_numbers(atoms.numbers)
    if not np.all(np.isfinite(atoms.positions)):
        raise RecordProblem("nan_positions", "non-finite coordinates")
    check_cell(atoms.cell.array, atoms.pbc)
    try:
        check_min_distance(atoms.positions, atoms.cell.array, atoms.pbc)
    except CloseAtomsError as error:
        raise RecordProblem("close_atoms", str(error)) from None
    energy = get_energy(atoms)
    forces = get_forces(atoms)
    stress = get_stress(atoms)
    if energy is None and "energy" in require:
        raise RecordProblem("missing_energy", "no energy label")
    if forces is None and "forces" in require:
        raise RecordProblem("missing_forces", "no forces label")
    if energy is not None and not np.isfinite(energy):
        raise RecordProblem("nan_labels", f"energy {energy}")
    if forces is not None:
        if forces.shape != (n, 3):
            raise RecordProblem("shape_mismatch", f"forces of shape {forces.shape} for {n} atoms (expected ({n}, 3))")
        if not np.all(np.isfinite(forces)):
            raise RecordProblem("nan_labels", "non-finite forces")
    if stress is not None and not np.all(np.isfinite(stress)):
        raise RecordProblem("nan_labels", "non-finite stress")
