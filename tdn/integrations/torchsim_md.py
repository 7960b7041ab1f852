"""One structure through torch-sim's integrators, with the interface tdn-md's writers use: ``tdn-md --engine torch``.

:class:`TorchSimDynamics` holds a torch-sim MD state of ONE structure and steps it with a torch-sim ``update``
function (``nve`` or ``nvt_langevin`` of :func:`tdn.md_torchsim.integrator`); like ASE's integrators and
:class:`tdn.dynamics.TorchDynamics` it has ``attach``, ``run``, ``nsteps``, ``dt`` and ``atoms``, so that
:func:`tdn.md.run_md` writes its log, trajectory, thermo PNG and progress bar and runs its blow-up checks unchanged.
At observer steps the state is copied into ``atoms`` (positions, momenta, energy, forces: one transfer) and the
results are handed to the calculator the run started from, which stays attached.

Conventions: the state is float64 whatever the model's dtype (``TDNTorchSimModel(state_dtype="float64")``: a
float32 model sees float32 positions, positions and momenta accumulate in float64, as in TorchDynamics); torch-sim
wraps periodic positions into the cell at every step; the Langevin noise comes from torch's global generator,
seeded once when the engine is built; the neighbour list is rebuilt at every step (the skin does not apply).

What torch-sim 0.3.0 cannot run (:func:`torch_sim_cannot_run`): constraints (it has none; its Langevin step moves
every atom) and partial periodicity (its integrators keep one periodicity flag for all directions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.calculator import Calculator

from ..runtime import AtomsTooCloseError, GeometryError, publish_state

__all__ = ["TorchSimDynamics", "torch_sim_cannot_run"]


def torch_sim_cannot_run(atoms: Atoms) -> str | None:
    """Why torch-sim (0.3.0) cannot integrate ``atoms`` as tdn-md would (None when it can): constraints, partial
    periodicity, or torch-sim not installed."""
    if atoms.constraints:
        names = sorted({type(c).__name__ for c in atoms.constraints})
        return f"torch-sim has no constraints ({', '.join(names)})"
    if atoms.pbc.any() and not atoms.pbc.all():
        return f"torch-sim keeps one periodicity flag for all directions (pbc={atoms.pbc.tolist()})"
    try:
        import torch_sim  # noqa: F401
    except ImportError:
        return "torch-sim is not installed (pip install 'tdn[torchsim]')"
    return None


class _Observer(NamedTuple):
    interval: int
    function: Callable[..., Any]
    args: tuple
    kwargs: dict


class TorchSimDynamics:
    """MD of one structure with torch-sim's integrator functions and a :class:`tdn.integrations.torchsim.
    TDNTorchSimModel`.

    Args:
        model: the torch-sim model (its ``dtype`` is the state's).
        atoms: positions, momenta, masses, cell and pbc at the start (fully periodic or a molecule, no
            constraints: :func:`torch_sim_cannot_run`). Updated at observer steps and by :meth:`sync_atoms`.
        init, update: torch-sim's ``(init, update)`` pair of one integrator, built for ``model``.
        timestep: fs (what ``update`` was built with; ``dt`` for the writers).
        seed: seeds torch's global generator (torch-sim draws its Langevin noise there).
        init_kwargs: further keywords of ``init``.
        calculator: the calculator the results are handed to at every sync (it stays attached to ``atoms``);
            None: a SinglePointCalculator.

    Errors of the model during a step (atoms on top of each other, non-finite positions) are raised as
    :class:`tdn.runtime.GeometryError` naming the step.
    """

    def __init__(self, model: Any, atoms: Atoms, init: Callable, update: Callable, *, timestep: float, seed: int = 0,
                 init_kwargs: dict[str, Any] | None = None, calculator: Calculator | None = None) -> None:  # fmt: skip
        from .torchsim import state_from_atoms

        reason = torch_sim_cannot_run(atoms)
        if reason is not None:
            raise ValueError(f"torch-sim cannot run this structure: {reason}")
        self.model, self.atoms, self.update, self.calculator = model, atoms, update, calculator
        self.dt = float(timestep) * units.fs
        self.nsteps = 0
        self.observers: list[_Observer] = []
        torch.manual_seed(int(seed))
        start = state_from_atoms(atoms, model)
        start.momenta = torch.as_tensor(atoms.get_momenta(), dtype=model.dtype, device=model.device)
        self.state = self._call(lambda: init(start, **(init_kwargs or {})), step=0)

    def attach(self, function: Callable[..., Any], interval: int = 1, *args: Any, **kwargs: Any) -> None:
        """Call ``function(*args, **kwargs)`` every ``interval`` steps (and at step 0), after :meth:`sync_atoms`."""
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.observers.append(_Observer(int(interval), function, args, kwargs))

    def run(self, steps: int) -> None:
        """Integrate ``steps`` steps; as ASE, step 0 is observed when ``nsteps == 0``."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if self.nsteps == 0:
            self._observe()
        for _ in range(steps):
            self.state = self._call(lambda: self.update(self.state), step=self.nsteps + 1)
            self.nsteps += 1
            self._observe()

    def _call(self, step_function: Callable[[], Any], step: int) -> Any:
        """The model's geometry errors, named by step instead of by structure (there is one)."""
        try:
            return step_function()
        except AtomsTooCloseError as err:
            raise AtomsTooCloseError(err.i, err.j, err.distance, err.shift, step=step) from None
        except GeometryError as err:
            raise GeometryError(f"step {step}: {str(err).removeprefix('structure 0: ')}") from None

    def _observe(self) -> None:
        due = [o for o in self.observers if self.nsteps % o.interval == 0]
        if due:
            self.sync_atoms()
            for o in due:
                o.function(*o.args, **o.kwargs)

    def sync_atoms(self) -> Atoms:
        """Copy positions, momenta, energy and forces into ``self.atoms`` (one device-to-host transfer) and return
        it; the results go to ``calculator`` (else to a SinglePointCalculator)."""
        state, n = self.state, len(self.atoms)
        with torch.no_grad():
            parts = [state.positions, state.momenta, state.forces, state.energy]
            host = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in parts]).cpu().numpy()
        positions, momenta, forces = (host[k * 3 * n : (k + 1) * 3 * n].reshape(n, 3) for k in range(3))
        energy = float(host[9 * n])
        results = {"energy": energy, "free_energy": energy, "forces": np.array(forces)}
        return publish_state(self.atoms, positions, momenta, results, self.calculator)
