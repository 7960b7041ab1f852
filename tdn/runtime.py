"""What every way of running a model shares: the calculator, the device-resident MD engine and the integrations
(LAMMPS, torch-sim) load models, resolve dtypes, check structures and build neighbour lists here.

- :func:`prepare_model`: a model file or object on a device and dtype, eval mode, frozen parameters;
  :func:`model_dtype` resolves ``"float32"`` / ``"float64"``;
- :func:`validate_atoms` (and the checks it is made of): input the model cannot evaluate is refused with a message
  naming the atom, element or cell vector; :class:`AtomsTooCloseError` names atoms closer than
  :data:`tdn.data.atoms.MIN_DISTANCE`, which would give NaN energies and forces;
- :func:`neighbor_list` (vesin, on the positions' device or on the host) and :func:`shift_vectors`, computed without
  matmuls so that TF32 settings cannot move an edge.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols
from torch import nn

from .data import neighbors
from .data.atoms import MIN_DISTANCE, cell_problem
from .io import load_model
from .models import UnknownElementError
from .models.config import DTYPES

__all__ = [
    "DTYPES", "MIN_DISTANCE", "NEIGHBOR_LISTS", "AtomsTooCloseError", "GeometryError", "check_cell", "check_elements",
    "check_positions", "closest_pair_error", "compile_energy", "model_dtype", "neighbor_list",
    "pair_distances_squared", "prepare_model", "shift_vectors", "validate_atoms",
]  # fmt: skip


def model_dtype(name: str | torch.dtype, option: str = "default_dtype") -> torch.dtype:
    """``"float32"`` / ``"float64"`` (or the torch dtype) -> the torch dtype; anything else is a ValueError naming
    ``option``."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if name not in DTYPES:
        raise ValueError(f"{option} must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ------------------------------------------------------------------------------------------------ validation
def validate_atoms(atoms: Atoms, elements: Sequence[int]) -> None:
    """Reject input the model cannot evaluate, with a message naming the atom, element or cell vector.

    Empty Atoms, non-finite positions, atomic numbers the model was not built for (a KeyError), a periodic
    direction with a zero or non-finite cell vector, or a fully periodic cell of zero volume.
    """
    if len(atoms) == 0:
        raise ValueError("the Atoms object is empty: nothing to evaluate")
    check_positions(atoms.positions)
    check_elements(atoms.numbers, elements)
    check_cell(np.asarray(atoms.cell), atoms.pbc)


class GeometryError(ValueError):
    """Positions the model cannot evaluate: non-finite coordinates, or atoms on top of each other
    (:class:`AtomsTooCloseError`). In an MD run: the run blew up."""


def check_positions(positions: np.ndarray) -> None:
    finite = np.isfinite(positions).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise GeometryError(
            f"non-finite position of atom {bad[0]}: {positions[bad[0]].tolist()}"
            + (f" (and {len(bad) - 1} more atoms: {bad[1:6].tolist()}...)" if len(bad) > 1 else "")
        )


def check_elements(numbers: np.ndarray, elements: Sequence[int]) -> None:
    known = np.isin(numbers, np.asarray(elements))
    if not known.all():
        first = int(np.flatnonzero(~known)[0])
        z = int(numbers[first])
        symbol = chemical_symbols[z] if 0 <= z < len(chemical_symbols) else "?"
        names = [chemical_symbols[e] for e in elements]
        raise UnknownElementError(
            f"element {symbol} (Z={z}) of atom {first} is not one the model was built for: {names}"
        )


def check_cell(cell: np.ndarray, pbc: np.ndarray) -> None:
    """A periodic direction needs a finite, non-zero cell vector; a fully periodic cell a non-zero volume
    (:func:`tdn.data.atoms.cell_problem`, the one rule for readers, neighbour lists and calculators)."""
    problem = cell_problem(cell, pbc)
    if problem:
        raise ValueError(f"{problem}: set a cell or turn periodicity off")


# ------------------------------------------------------------------------------------------------ close atoms
class AtomsTooCloseError(GeometryError):
    """Two atoms (or an atom and a periodic image) closer than :data:`MIN_DISTANCE`: ``i``, ``j``, ``distance`` (Å),
    ``shift`` (the image's cell shift), ``structure`` (its index in a batch) and ``step`` (of an MD run) or None."""

    def __init__(self, i: int, j: int, distance: float, shift: Sequence[int], structure: int | None = None,
                 step: int | None = None) -> None:  # fmt: skip
        shift = [int(s) for s in shift]
        if i == j:
            which = f"atom {i} and its own periodic image {shift}"
        else:
            which = f"atoms {i} and {j}" + (f" (periodic image {shift})" if any(shift) else "")
        where = "" if structure is None else f"structure {structure}: "
        where += "" if step is None else f"step {step}: "
        super().__init__(
            f"{where}{which} are {distance:.3g} Å apart, closer than {MIN_DISTANCE:g} Å: atoms on top of each other "
            "give NaN energies and forces; fix the structure (a duplicated atom? a cell too small?)"
        )
        self.i, self.j, self.distance, self.shift, self.structure, self.step = i, j, distance, shift, structure, step


def closest_pair_error(d2: torch.Tensor, edge_index: torch.Tensor, unit_shifts: torch.Tensor, offset: int = 0,
                       **where: int) -> AtomsTooCloseError:  # fmt: skip
    """The error naming the edge of least squared length ``d2 [E]`` (atom indices minus ``offset``); ``where``:
    ``structure`` or ``step``. Host syncs: for an error path only."""
    e = int(torch.argmin(d2))
    i, j = (int(v) - offset for v in edge_index[:, e].tolist())
    return AtomsTooCloseError(i, j, float(d2[e]) ** 0.5, unit_shifts[e].round().long().tolist(), **where)


def pair_distances_squared(pos: torch.Tensor, edge_index: torch.Tensor, shift_vectors: torch.Tensor) -> torch.Tensor:
    """``|pos[j] - pos[i] + shift|^2`` per edge ``[E]``."""
    vectors = pos.index_select(0, edge_index[1]) - pos.index_select(0, edge_index[0]) + shift_vectors
    return vectors.square().sum(dim=1)


@torch.no_grad()
def pairs_within(
    pos: torch.Tensor, edge_index: torch.Tensor, shift_vectors: torch.Tensor, cutoff: float
) -> torch.Tensor:
    """Indices ``[E']`` of the candidate pairs closer than ``cutoff``: pairs beyond it contribute exactly zero, so a
    skin list's candidates can be thinned to these before a model call. Reads the count back to the host: free where
    the host is the device."""
    return torch.nonzero(pair_distances_squared(pos, edge_index, shift_vectors) < cutoff**2).squeeze(1)


# ------------------------------------------------------------------------------------------------ neighbours
NEIGHBOR_LISTS = ("auto", "torch", "vesin")


def neighbor_list(
    pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cutoff: float, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs within ``cutoff`` as tensors on ``pos.device``: ``edge_index [2, E]`` (sender, receiver) and
    integer-valued ``unit_shifts [E, 3]`` in ``pos.dtype``, with ``vector = pos[j] - pos[i] + unit_shifts @ cell``,
    sorted by (sender, receiver, shift). Both methods are vesin (:mod:`tdn.data.neighbors`) and give the same edges:

    * ``"torch"``: on ``pos.device`` (:func:`tdn.data.neighbors.neighbor_list_torch`: vesin's CUDA cell list on a
      GPU, the positions never leave it; the host for a device vesin has no kernel for);
    * ``"vesin"``: on the host, the edges copied to ``pos.device``;
    * ``"auto"``: ``"torch"`` on an accelerator, ``"vesin"`` on the CPU (where the two are the same).

    With the skin the list is rebuilt only every few tens of MD steps, so its cost is spread over them.
    """
    if method not in NEIGHBOR_LISTS:
        raise ValueError(f"neighbor_list must be one of {NEIGHBOR_LISTS}, got {method!r}")
    on = pos.detach() if method in ("auto", "torch") else pos.detach().cpu()
    sender, receiver, shifts = neighbors.neighbor_list_torch(on, cell.detach().reshape(3, 3), pbc.reshape(-1), cutoff)
    edge_index = torch.stack([sender, receiver]).to(pos.device)
    return edge_index, shifts.to(device=pos.device, dtype=pos.dtype)


def shift_vectors(unit_shifts: torch.Tensor, cell: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``unit_shifts [E, 3] @ cell`` in Å (``cell [3, 3]``, or ``[E, 3, 3]``: each edge's own), computed in float64
    without a matmul (no TF32 whatever the matmul precision setting), in ``dtype`` (default: the shifts')."""
    cell = cell.to(torch.float64).reshape(-1, 3, 3).squeeze(0)
    vectors = neighbors.rows_times_matrix(unit_shifts.to(torch.float64), cell)
    return vectors.to(unit_shifts.dtype if dtype is None else dtype)



# ------------------------------------------------------------------------------------------------ models
def prepare_model(model_path: str | Path | nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model of a file (``tdn.save_model``) or a model object, on ``device`` in ``dtype``, in eval mode with
    frozen parameters (autograd then follows only the positions and the strain)."""
    if isinstance(model_path, nn.Module):
        model = model_path.to(device=device, dtype=dtype)
    else:
        path = Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"model file {path} does not exist")
        model = load_model(path, device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def compile_energy(model: nn.Module) -> None:
    """Replace ``model.node_energies`` by its ``torch.compile`` d version (forces stay autograd outside).

    ``torch.compile`` compiles lazily, so most failures (no C++ compiler, an unsupported op on this platform) come
    at the first call, not here: that call, and every later one, then falls back to the eager function with one
    warning, instead of failing inside a user's MD step.
    """
    eager = model.node_energies
    try:
        compiled = torch.compile(eager, dynamic=True)
    except Exception as err:  # noqa: BLE001 - compile support differs by platform; eager always works
        warnings.warn(f"torch.compile failed ({err!r}); running eagerly", stacklevel=3)
        return

    def node_energies(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - as above, at the first call
            warnings.warn(f"torch.compile failed at the first call ({type(err).__name__}: {err}); running eagerly",
                          stacklevel=2)  # fmt: skip
            model.node_energies = eager
            return eager(*args, **kwargs)

    model.node_energies = node_energies




def publish_state(atoms: Atoms, positions: np.ndarray, momenta: np.ndarray, results: dict,
                  calculator: object | None = None) -> Atoms:
    """Write an engine's state into ``atoms`` (positions and momenta, constraints not applied again) with its
    ``results``: given to ``calculator`` (which stays attached and answers without recomputing), else held by a
    SinglePointCalculator. Returns ``atoms``."""
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms.set_positions(positions, apply_constraint=False)
    atoms.set_momenta(momenta, apply_constraint=False)
    if calculator is not None:
        calculator.atoms, calculator.results = atoms.copy(), results
        atoms.calc = calculator
    else:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms
