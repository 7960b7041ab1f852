"""torch-sim glue: :class:`TDNTorchSimModel`, a ``torch_sim.models.interface.ModelInterface`` running a tdn model.

A batch of S systems is ONE graph and ONE model call (:mod:`tdn.integrations.batch`): every system's neighbour list
is built on its own (vesin) and concatenated with atom offsets, on the model's device (vesin's CUDA cell list on a
GPU, its CPU cell list on the CPU). Periodic crystals, slabs and molecules may share a batch (a per-system ``pbc``).

torch-sim's conventions, as read here (torch-sim-atomistic 0.3.0; older and newer releases are handled too):

* ``state.cell [S, 3, 3]`` holds the cell vectors as COLUMNS; ``state.row_vector_cell`` the ASE rows. A state
  dict's ``"cell"`` is read in the column convention too (``"row_vector_cell"`` if given wins);
* ``state.pbc``: one bool for all systems and directions in 0.3.0, a ``[3]`` tensor in newer releases; a
  ``[S, 3]`` tensor (one row per system, what :func:`state_from_atoms` makes for a mixed list) is understood too;
* ``state.system_idx [N]`` (``state.batch`` in older releases), ``state.atomic_numbers [N]`` (any integer dtype);
* units: Å, eV, amu (ASE's); ``stress [S, 3, 3]`` in eV/Å^3 with ASE's sign (``(1/V) dE/d(strain)``, what
  ``torch_sim.quantities.get_pressure`` expects: pressure = -trace / 3); zero for a system that is not periodic
  in all three directions.

Example::

    import torch_sim as ts
    from tdn.integrations.torchsim import TDNTorchSimModel, state_from_atoms

    model = TDNTorchSimModel("model.pt", device="cuda", dtype="float64")
    state = state_from_atoms([crystal, molecule], model)     # or ts.io.atoms_to_state(..., model.device, model.dtype)
    out = model(state)                                        # energy [2], forces [N, 3], stress [2, 3, 3]

The state's dtype must be ``model.dtype``, as torch-sim's integrators assume: the model's own dtype, or the
``state_dtype`` it was built with (a float64 state integrated around a float32 model, which sees float32 positions
and returns float64 results).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from torch import nn

from ..runtime import NEIGHBOR_LISTS, model_dtype, prepare_model
from .batch import SkinNeighbors, check_structures, evaluate, systems_from_tensors

try:
    with warnings.catch_warnings():  # torch-sim 0.3.0's own imports (vesin.torch, torch.jit.script): not the user's
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch_sim.models.interface import ModelInterface
        from torch_sim.state import SimState
except ImportError as err:  # pragma: no cover - the optional extra is missing
    raise ImportError("tdn.integrations.torchsim needs torch-sim: pip install 'tdn[torchsim]' "
                      "(torch-sim-atomistic >= 0.3)") from err  # fmt: skip

__all__ = ["TDNTorchSimModel", "state_from_atoms"]


class TDNTorchSimModel(ModelInterface):
    """A tdn model as a torch-sim model: ``model(state) -> {"energy" [S], "forces" [N, 3], "stress" [S, 3, 3]}``.

    Args:
        model: a model file (``tdn.save_model``) or a :class:`tdn.models.TDNModel` (used in place: eval mode, its
            parameters frozen, moved to ``device`` / ``dtype``; :func:`tdn.runtime.prepare_model`).
        device: torch device; default the model object's, for a file CUDA when available, else the CPU.
        dtype: ``"float32"`` / ``"float64"`` or a torch dtype; default the model object's, for a file float32.
        compute_forces, compute_stress: which outputs ``forward`` computes (both settable later, as torch-sim's
            ``validate_model_outputs`` does).
        state_dtype: the dtype of the states it takes and of its outputs (``model.dtype``, what torch-sim integrates
            in); default ``dtype``. float64 with a float32 model: positions accumulate in float64, the model runs in
            float32 (as :class:`tdn.dynamics.TorchDynamics` does).
        neighbor_list: ``"auto"`` (on an accelerator the device's list, on the CPU the host's), ``"torch"`` (vesin
            on the model's device) or ``"vesin"`` (vesin on the host), see :func:`tdn.runtime.neighbor_list`.
        skin: neighbour-list skin in Å: the pairs within ``cutoff + skin`` are reused from step to step until an atom
            has moved more than ``skin / 2`` or a cell, pbc or the atoms changed
            (:class:`tdn.integrations.batch.SkinNeighbors`, the attribute ``neighbors``, per structure of a batch;
            ``neighbor_list_builds`` counts the calls that rebuilt pairs); 0 builds the list at every call.

    Outputs are detached, in ``state_dtype`` and on the model's device. Input the model cannot evaluate raises before it
    runs, naming the system: an empty system, non-finite positions, an unknown element, an unusable periodic
    cell, a state whose dtype is not the model's, atoms closer than :data:`tdn.runtime.MIN_DISTANCE`
    (:class:`tdn.runtime.AtomsTooCloseError`).
    """

    def __init__(
        self,
        model: str | Path | nn.Module,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        compute_forces: bool = True,
        compute_stress: bool = True,
        neighbor_list: str = "auto",
        skin: float = 0.5,
        state_dtype: str | torch.dtype | None = None,
        dispersion: str | None = None,
        functional: str | None = None,
        dispersion_cutoff: float | None = None,
    ) -> None:
        super().__init__()
        if neighbor_list not in NEIGHBOR_LISTS:
            raise ValueError(f"neighbor_list must be one of {NEIGHBOR_LISTS}, got {neighbor_list!r}")
        if isinstance(model, nn.Module):
            tensor = next(iter(model.buffers()), None)
            device = device if device is not None else (tensor.device if tensor is not None else "cpu")
            dtype = dtype if dtype is not None else model.dtype
        else:
            device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = dtype if dtype is not None else "float32"
        self._device = torch.device(device)
        self._model_dtype = model_dtype(dtype, "dtype")  # what the network computes in
        self._dtype = self._model_dtype if state_dtype is None else model_dtype(state_dtype, "state_dtype")
        self.model = prepare_model(model, self._device, self._model_dtype)
        self.cutoff = float(self.model.config.cutoff)
        self.elements = list(self.model.config.elements)
        self.neighbor_list = neighbor_list
        self.neighbors = SkinNeighbors(self.cutoff, skin, neighbor_list)
        self._compute_forces = bool(compute_forces)
        self._compute_stress = bool(compute_stress)
        self._memory_scales_with = "n_atoms_x_density"
        # Grimme's D3, as TDNCalculator(dispersion=..., functional=...) adds it (tdn.dispersion)
        if dispersion is None and (functional is not None or dispersion_cutoff is not None):
            raise ValueError("functional and dispersion_cutoff set the D3 dispersion: give dispersion='d3bj' too")
        self.dispersion = None
        if dispersion is not None:
            from ..dispersion import DEFAULT_CUTOFF, D3Dispersion

            cutoff = DEFAULT_CUTOFF if dispersion_cutoff is None else float(dispersion_cutoff)
            self.dispersion = D3Dispersion(dispersion, functional or "pbe", self.elements, self._device,
                                           self._model_dtype, cutoff)  # fmt: skip

    @property
    def neighbor_list_builds(self) -> int:
        """How many neighbour lists were built (every structure of a batch in one build)."""
        return self.neighbors.builds

    # torch-sim's ModelInterface makes these read-only; validate_model_outputs sets them, so they are settable here
    @property
    def compute_forces(self) -> bool:
        return self._compute_forces

    @compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        self._compute_forces = bool(value)

    @property
    def compute_stress(self) -> bool:
        return self._compute_stress

    @compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        self._compute_stress = bool(value)

    def forward(self, state: SimState | dict[str, Any], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Energies ``[S]`` (eV), and as configured forces ``[N, 3]`` (eV/Å) and stress ``[S, 3, 3]`` (eV/Å^3,
        ASE sign) of every system of ``state`` (a ``SimState`` or a dict with the same fields), in one model
        call. The state is not modified."""
        positions, cell, pbc, numbers, system_idx = read_state(state)
        if self._dtype != self._model_dtype and positions.dtype == cell.dtype == self._dtype:  # see state_dtype
            positions, cell = positions.to(self._model_dtype), cell.to(self._model_dtype)
        systems = systems_from_tensors(positions, cell, pbc, numbers, system_idx, self.elements, self._model_dtype)
        graph = self.neighbors(systems)
        out = evaluate(self.model, systems, graph, compute_forces=self._compute_forces,
                       compute_stress=self._compute_stress)  # fmt: skip
        results = {"energy": out["energy"]}
        if self._compute_forces:
            results["forces"] = out["forces"]
        if self._compute_stress:
            results["stress"] = out["stress"]
        if self.dispersion is not None:
            self._add_dispersion(systems, results)
        return {key: value.to(self._dtype) for key, value in results.items()}

    def _add_dispersion(self, systems: Any, results: dict[str, torch.Tensor]) -> None:
        """Add the D3 energy, forces and stress of every system (its own pairs within the D3 cutoff)."""
        results["energy"] = results["energy"].clone()
        for key in ("forces", "stress"):
            if key in results:
                results[key] = results[key].clone()
        start = 0
        for s, count in enumerate(systems.counts):
            atoms = slice(start, start + count)
            start += count
            pos, cell64, pbc = systems.positions[atoms].detach(), systems.cell[s], systems.pbc[s]
            cell = cell64.to(pos.dtype)
            pairs, _, shifts = self.dispersion.neighbors(pos, cell, pbc, cell64, 0.0, self.neighbor_list)
            periodic = bool(systems.host_pbc[s].all())
            d3 = self.dispersion.evaluate(systems.atomic_numbers[atoms], pos, cell, pairs, shifts,
                                          with_virial=periodic and "stress" in results)  # fmt: skip
            results["energy"][s] += d3["energy"].to(results["energy"].dtype)
            if "forces" in results:
                results["forces"][atoms] += d3["forces"].to(results["forces"].dtype)
            if "virial" in d3:
                volume = torch.linalg.det(cell64).abs()
                results["stress"][s] += (-d3["virial"] / volume).to(results["stress"].dtype)  # ASE sign: -W / V


# ------------------------------------------------------------------------------------------------ states
def read_state(state: SimState | dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """``positions [N, 3]``, ``cell [S, 3, 3]`` (ROWS are the cell vectors), ``pbc [S, 3]`` bool,
    ``atomic_numbers [N]`` and ``system_idx [N]`` of a torch-sim state or state dict (see the module docstring
    for the conventions of the different torch-sim releases)."""
    get = state.get if isinstance(state, dict) else (lambda name, default=None: getattr(state, name, default))
    positions = get("positions")
    numbers = get("atomic_numbers")
    if positions is None or numbers is None:
        raise ValueError("the state needs positions and atomic_numbers")
    system_idx = get("system_idx")
    if system_idx is None:
        system_idx = get("batch")  # torch-sim before 0.3 named it batch
    if system_idx is None:
        system_idx = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
    cell = get("row_vector_cell")
    if cell is None:
        cell = get("cell")
        if cell is None:
            raise ValueError("the state needs a cell ([S, 3, 3], zeros for molecules)")
        cell = cell.transpose(-1, -2)  # torch-sim keeps the cell vectors as columns
    cell = cell.reshape(-1, 3, 3)
    pbc = _pbc_rows(get("pbc", False), cell.shape[0], positions.device)
    return positions, cell, pbc, numbers, system_idx


def _pbc_rows(pbc: Any, num_systems: int, device: torch.device) -> torch.Tensor:
    """torch-sim's ``pbc`` (a bool, a ``[3]`` tensor, or ``[S, 3]`` per system) as ``[S, 3]`` bool."""
    rows = torch.as_tensor(pbc, dtype=torch.bool, device=device)
    if rows.numel() == 1:
        rows = rows.reshape(1, 1).expand(num_systems, 3)
    elif rows.numel() == 3:
        rows = rows.reshape(1, 3).expand(num_systems, 3)
    elif rows.shape != (num_systems, 3):
        raise ValueError(f"pbc must be a bool, [3] or [S, 3] = [{num_systems}, 3], got shape {list(rows.shape)}")
    return rows


def state_from_atoms(structures: Atoms | Sequence[Atoms], model: TDNTorchSimModel) -> SimState:
    """ASE structures as one torch-sim ``SimState`` in the model's device and dtype (checked first: an error names
    the structure). ``pbc`` is a bool when every structure is periodic in all or in no direction (what torch-sim
    0.3.0's integrators and optimisers take), else a ``[S, 3]`` tensor, which :class:`TDNTorchSimModel` reads per
    system (evaluation; torch-sim 0.3.0's integrators need the bool). The cell is stored as columns, as
    ``torch_sim.io.atoms_to_state`` does."""
    structures = [structures] if isinstance(structures, Atoms) else list(structures)
    if not structures:
        raise ValueError("no structure given")
    check_structures(structures, model.elements)
    device, dtype = model.device, model.dtype
    pbc_rows = np.stack([np.asarray(a.pbc, dtype=bool) for a in structures])
    uniform = bool(pbc_rows.all()) or not pbc_rows.any()
    pbc: bool | torch.Tensor = bool(pbc_rows.all()) if uniform else torch.as_tensor(pbc_rows, device=device)
    cells = np.stack([np.asarray(a.cell, dtype=np.float64).T for a in structures])
    counts = torch.as_tensor([len(a) for a in structures], device=device)
    return SimState(
        positions=torch.as_tensor(np.concatenate([a.positions for a in structures]), dtype=dtype, device=device),
        masses=torch.as_tensor(np.concatenate([a.get_masses() for a in structures]), dtype=dtype, device=device),
        cell=torch.as_tensor(cells, dtype=dtype, device=device),
        pbc=pbc,
        atomic_numbers=torch.as_tensor(np.concatenate([a.numbers for a in structures]), dtype=torch.long,
                                       device=device),  # fmt: skip
        system_idx=torch.repeat_interleave(torch.arange(len(structures), device=device), counts),
    )
