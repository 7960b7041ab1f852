"""Device-resident molecular dynamics for tdn models: the MD step never leaves the model's device.

``tdn-md --engine torch`` runs torch-sim's integrators (:mod:`tdn.integrations.torchsim_md`, as fast on the CPU:
docs/benchmarks/engines_cpu.md) and this engine only for what torch-sim 0.3.0 cannot run: FixAtoms constraints,
slabs and wires (partial periodicity), or without torch-sim installed.

:class:`TorchDynamics` keeps the state (positions, velocities, masses, forces, cell, pbc, atomic numbers) in
device tensors and integrates in torch, so that on an accelerator a step queues kernels without waiting for them:

* **Integrators.** NVE velocity Verlet, and NVT Langevin with the propagator of :class:`ase.md.langevin.Langevin`
  (Vanden-Eijnden & Ciccotti, Chem. Phys. Lett. 429, 310 (2006), eq. 23; ``fixcm=False``), the noise drawn
  from a seeded ``torch.Generator`` on the device.
* **Units** as ASE: Å, eV, amu, ASE time (the user gives the time step in fs, the friction in 1/fs, T in K).
  The state is float64 whatever the model's dtype (as in the ASE path, whose integrators work in float64
  numpy): a float32 model only sees float32 positions, accumulated positions do not lose precision.
* **Neighbour list with a skin.** Pairs within ``cutoff + skin`` are built with :func:`tdn.runtime.neighbor_list`
  (vesin, on the model's device) and ALL of them go to the model: the radial envelope is exactly
  zero at ``r >= cutoff`` and the radial MLP maps 0 to 0, so the pairs between ``cutoff`` and ``cutoff + skin``
  contribute exactly nothing (energy and forces). No per-step ``nonzero`` selection (a host sync), and the edge
  count is constant between rebuilds (one shape for ``torch.compile``).
* **Rebuild rule (no per-step sync).** Every step updates, on the device, ``peak`` = the largest displacement of
  any atom from where the list was built, over every geometry evaluated since. The host reads it only at a
  *check*, every ``interval`` steps (``interval <= check_interval``; also at log / observer steps and at the end of
  ``run``), together with ``d`` (largest displacement now), ``v`` (largest speed) and ``a`` (largest |F|/m), and:

  1. if ``peak > skin/2`` the list may have missed a pair entering the cutoff during the window: counted in
     ``missed_rebuilds``, warned, the list rebuilt, the forces recomputed and ``check_interval`` halved;
  2. otherwise the list is still exact. With ``B(K) = v K dt + a (K dt)^2 / 2`` (Taylor bound on the further
     displacement in ``K`` steps) let ``fit(d)`` be the largest ``K`` with ``d + safety * B(K) <= skin/2``.
     The list is rebuilt now if ``fit(d) < min(check_interval, fit(0)) / 2``: windows may shrink to half of
     what a fresh list would give before a rebuild (a check, a few scalars, is cheaper than a rebuild);
  3. the next window is ``clamp(fit(d), 1, check_interval)`` steps (``d = 0`` after a rebuild).

  Measured (400 steps of a tiny model): with ``safety = 2`` (default) no miss in 64-atom Cu at 1500 K (skin 0.3),
  Cu at 300 K (skin 0.5), ethanol at 300 K (dt 0.5 fs) and Langevin ethanol at 600 K (skin 0.3), for 1.3-1.5
  times the rebuilds of the exact rule (rebuild once ``d > skin/2``, a host look at every step), 3 times for
  the hot hydrogens; ``safety = 1`` missed under Langevin noise.
  ``skin = 0`` rebuilds before every force evaluation (a host sync per step).
* **Atoms on top of each other.** Every check also reads the shortest candidate-pair distance (in the same
  transfer); below :data:`tdn.data.atoms.MIN_DISTANCE` the energy is NaN or meaningless from there on, and the run
  raises :class:`tdn.runtime.AtomsTooCloseError` naming the pair and the step.
* **Host traffic.** Energies and temperature stay on the device; they are copied (a few scalars, one transfer)
  only at log steps; :meth:`TorchDynamics.sync_atoms` copies positions, momenta, energy and forces into the ASE
  ``Atoms`` for observers such as a trajectory writer.

Example::

    dyn = TorchDynamics("model.pt", atoms, timestep=1.0, ensemble="nvt-langevin", temperature_K=300,
                        friction=0.01, device="cuda")
    for row in dyn.run(10000, log_interval=100):
        print(row.step, row.temperature)
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from ase import Atoms, units
from ase.constraints import FixAtoms
from torch import nn

from .calculator import TDNCalculator
from .runtime import (
    DTYPES,
    MIN_DISTANCE,
    closest_pair_error,
    compile_energy,
    neighbor_list,
    pair_distances_squared,
    prepare_model,
    publish_state,
    shift_vectors,
    validate_atoms,
)

ENSEMBLES = ("nve", "nvt-langevin")
STATE_DTYPE = torch.float64  # positions, velocities, forces: see the module docstring


class ThermoRow(NamedTuple):
    """One log line, in the column order of ``tdn.md.LOG_COLUMNS``."""

    step: int
    time_ps: float
    epot: float  # eV
    ekin: float  # eV
    etot: float  # eV
    temperature: float  # K, 2 Ekin / (dof kB), dof = 3N minus 3 per fixed atom (as Atoms.get_temperature)
    steps_per_s: float  # since the previous row of this run; nan for the first


class _Observer(NamedTuple):
    interval: int
    function: Callable[..., Any]
    args: tuple
    kwargs: dict


class TorchDynamics:
    """NVE / Langevin NVT molecular dynamics of ``atoms`` with a tdn model, state and step on the model's device.

    Args:
        model: a model file (``tdn.save_model``), a :class:`tdn.models.TDNModel` (used in place: eval mode,
            parameters frozen, moved to ``device`` / ``dtype``), or a :class:`tdn.TDNCalculator` whose model,
            device, dtype, skin and neighbour-list method are used.
        atoms: initial positions, momenta (zero if unset), masses, cell and pbc. Only ``FixAtoms`` constraints
            are supported (fixed atoms neither move nor carry momentum, as in ASE). Not updated during the run:
            call :meth:`sync_atoms`.
        timestep: fs.
        ensemble: ``"nve"`` (velocity Verlet) or ``"nvt-langevin"``.
        temperature_K, friction: Langevin target (K) and friction (1/fs); ``friction = 0`` is velocity Verlet.
        seed: seed of the device ``torch.Generator`` for the Langevin noise.
        device, dtype: the model's device and precision (``"float32"`` / ``"float64"`` or a torch dtype);
            default: the model's own (a file: ``"cpu"``, ``"float32"``).
        skin: neighbour-list skin in Å (default 0.5, or the calculator's).
        neighbor_list: ``"auto"``, ``"torch"`` or ``"vesin"``, see :func:`tdn.runtime.neighbor_list`.
        check_interval: at most this many steps between looks at the displacements (a host sync each).
        safety: factor on the predicted displacement in the rebuild rule (module docstring); 0 disables it.
        compile: ``torch.compile`` the model's energy function (:func:`tdn.runtime.compile_energy`).

    Attributes: ``positions``, ``velocities`` (Å per ASE time unit), ``masses`` ``[N, 1]``, ``forces`` (float64
    device tensors), ``energy`` (device scalar, eV), ``nsteps``, ``neighbor_list_builds``, ``missed_rebuilds``.
    """

    def __init__(
        self,
        model: str | Path | nn.Module | TDNCalculator,
        atoms: Atoms,
        timestep: float = 1.0,
        *,
        ensemble: str = "nve",
        temperature_K: float = 300.0,
        friction: float = 0.01,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        skin: float | None = None,
        neighbor_list: str | None = None,
        check_interval: int = 10,
        safety: float = 2.0,
        compile: bool = False,
    ) -> None:
        if ensemble not in ENSEMBLES:
            raise ValueError(
                f"ensemble {ensemble!r} is not available with the torch engine (it has {', '.join(ENSEMBLES)}); "
                "use the ASE engine for it"
            )
        if not timestep > 0:
            raise ValueError(f"timestep must be positive, got {timestep}")
        if friction < 0 or temperature_K < 0:
            raise ValueError("friction and temperature_K must not be negative")
        if check_interval < 1 or safety < 0:
            raise ValueError(f"check_interval must be >= 1 and safety >= 0, got {check_interval}, {safety}")
        free = _free_mask(atoms)

        if isinstance(model, TDNCalculator):
            if device is not None or dtype is not None:
                raise ValueError("with a TDNCalculator, device and dtype are the calculator's: do not pass them")
            calc = self.calculator = model
            self.model, self.device, self.dtype = calc.model, calc.device, calc.dtype
            skin = calc.skin if skin is None else skin
            neighbor_list = calc.neighbor_list if neighbor_list is None else neighbor_list
        else:
            self.calculator = None
            if isinstance(model, nn.Module):
                tensor = next(iter(model.parameters()), None)
                tensor = next(iter(model.buffers())) if tensor is None else tensor
                device = tensor.device if device is None else device
                dtype = getattr(model, "dtype", tensor.dtype) if dtype is None else dtype
            dtype = "float32" if dtype is None else dtype
            if isinstance(dtype, str):
                if dtype not in DTYPES:
                    raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
                dtype = DTYPES[dtype]
            self.device, self.dtype = torch.device("cpu" if device is None else device), dtype
            self.model = prepare_model(model, self.device, self.dtype)
        self.skin = 0.5 if skin is None else float(skin)
        self.neighbor_list = "auto" if neighbor_list is None else neighbor_list
        if self.skin < 0:
            raise ValueError(f"skin must be >= 0, got {self.skin}")
        if compile:
            compile_energy(self.model)
        self.cutoff = float(self.model.config.cutoff)
        validate_atoms(atoms, list(self.model.config.elements))
        masses = atoms.get_masses()
        if not (masses > 0).all():
            raise ValueError(f"every atom needs a positive mass, atom {int(np.argmin(masses))} has {masses.min()}")

        self.atoms = atoms
        self.ensemble = ensemble
        self.timestep_fs = float(timestep)
        self.dt = self.timestep_fs * units.fs  # ASE time units
        self.check_interval, self.safety = int(check_interval), float(safety)

        dev, f64 = self.device, STATE_DTYPE
        n = len(atoms)
        self.atomic_numbers = torch.as_tensor(atoms.numbers, dtype=torch.long, device=dev)
        self.element_index = self.model.element_index(self.atomic_numbers)  # once: it syncs to check the elements
        # As tdn.calculator: a molecule's dummy box is zeroed so that it cannot leak into the model.
        self.cell = torch.as_tensor(
            np.asarray(atoms.cell) if atoms.pbc.any() else np.zeros((3, 3)), dtype=f64, device=dev
        )
        self.pbc = torch.as_tensor(atoms.pbc, device=dev)
        self.masses = torch.as_tensor(masses, dtype=f64, device=dev).view(n, 1)
        self.positions = torch.as_tensor(atoms.positions, dtype=f64, device=dev).clone()
        self.free = None if free is None else torch.as_tensor(free, dtype=f64, device=dev).view(n, 1)
        self.velocities = torch.as_tensor(atoms.get_momenta(), dtype=f64, device=dev) / self.masses
        if self.free is not None:
            self.velocities.mul_(self.free)  # fixed atoms carry no momentum (ASE's set_momenta does the same)
        self.degrees_of_freedom = 3 * (n if free is None else int(free.sum()))

        # Velocity Verlet: v += (dt/2) F/m, x += dt v, new F, v += (dt/2) F/m.
        self._kick = 0.5 * self.dt / self.masses  # [N, 1]
        if ensemble == "nvt-langevin":
            self._langevin_coefficients(temperature_K, friction)
        self.temperature_K, self.friction = float(temperature_K), float(friction)
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(int(seed))

        self.nsteps = 0
        self.neighbor_list_builds = 0
        self.missed_rebuilds = 0
        self.num_edges = 0
        self.observers: list[_Observer] = []
        self.edge_index: torch.Tensor | None = None
        self.edge_shift: torch.Tensor | None = None
        self._reference = torch.empty_like(self.positions)
        self._peak = torch.zeros((), dtype=f64, device=dev)  # largest squared displacement since the build, Å^2
        self._interval = 1  # steps between checks; set by the first check
        self._next_check = 0
        self._last_check = 0
        self._last_row: tuple[int, float] | None = None
        self.evaluate()

    # ---------------------------------------------------------------------------------------------- set-up
    def _langevin_coefficients(self, temperature_K: float, friction: float) -> None:
        """The constants of ase.md.langevin.Langevin.updatevars, with per-atom ``sigma = sqrt(2 kT fr / m)``."""
        dt, fr, kT = self.dt, friction / units.fs, units.kB * temperature_K
        sigma = torch.sqrt(2 * kT * fr / self.masses)  # [N, 1]
        if self.free is not None:
            sigma = sigma * self.free  # no noise on fixed atoms: they stay put with zero momentum, as in ASE
        self._c1_over_m = (dt / 2.0 - dt * dt * fr / 8.0) / self.masses
        self._one_minus_c2 = 1.0 - (dt * fr / 2 - dt * dt * fr * fr / 8.0)
        self._c3 = math.sqrt(dt) * sigma / 2.0 - dt**1.5 * fr * sigma / 8.0
        self._c5 = dt**1.5 * sigma / (2 * math.sqrt(3))
        self._c4 = fr / 2.0 * self._c5

    # ---------------------------------------------------------------------------------------------- physics
    @torch.no_grad()
    def _rebuild(self) -> None:
        """Candidate pairs within ``cutoff + skin`` of the current positions (host syncs inside the list)."""
        edge_index, unit_shifts = neighbor_list(
            self.positions, self.cell, self.pbc, self.cutoff + self.skin, self.neighbor_list
        )
        self.edge_index = edge_index
        self._unit_shifts = unit_shifts
        self._edge_shift_state = shift_vectors(unit_shifts, self.cell, STATE_DTYPE)  # [E, 3] Å, fixed until rebuilt
        self.edge_shift = self._edge_shift_state.to(self.dtype)
        self.num_edges = edge_index.shape[1]
        self._reference.copy_(self.positions)
        self._peak.zero_()
        self.neighbor_list_builds += 1

    def evaluate(self) -> None:
        """Energy and forces at the current positions with the current candidate list (built if there is none,
        or at every call when ``skin = 0``): ``energy`` (eV), ``node_energy`` and ``forces = -dE/dx`` (eV/Å).
        Queues device work only; the displacement from the list's positions enters the running ``peak``."""
        if self.edge_index is None or self.skin == 0:
            self._rebuild()
        self._track()
        # The model's energy network directly: TDNModel.forward's batch, cell and stress bookkeeping is not needed.
        pos = self.positions.detach().to(self.dtype).requires_grad_(True)
        with torch.enable_grad():
            node_energy = self.model.node_energies(pos, self.element_index, self.edge_index, self.edge_shift)
            energy = node_energy.sum()
            grad = None
            if energy.requires_grad:  # False only without any edge
                (grad,) = torch.autograd.grad(energy, pos, allow_unused=True)
        forces = torch.zeros_like(self.positions) if grad is None else grad.neg().to(STATE_DTYPE)
        if self.free is not None:
            forces = forces * self.free
        self.forces, self.energy, self.node_energy = forces, energy.detach(), node_energy.detach()

    @torch.no_grad()
    def _track(self) -> None:
        """Running maximum of the squared displacement since the build, on the device (no sync)."""
        if self.skin > 0:
            d2 = (self.positions - self._reference).square().sum(dim=1).max()
            torch.maximum(self._peak, d2, out=self._peak)

    @torch.no_grad()
    def _step(self) -> None:
        """One time step; queues device work only (unless ``skin = 0``)."""
        x, v = self.positions, self.velocities
        if self.ensemble == "nve":
            v.addcmul_(self.forces, self._kick)
            x.add_(v, alpha=self.dt)
            self.evaluate()
            v.addcmul_(self.forces, self._kick)
            return
        # ase.md.langevin.Langevin.step with fixcm=False: the same random numbers (xi, eta) in both half kicks.
        xi = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        eta = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        rnd_pos = self._c5 * eta
        rnd_vel = self._c3 * xi - self._c4 * eta
        v.mul_(self._one_minus_c2).addcmul_(self.forces, self._c1_over_m).add_(rnd_vel)
        x.add_(v, alpha=self.dt).add_(rnd_pos)
        self.evaluate()
        v.mul_(self._one_minus_c2).addcmul_(self.forces, self._c1_over_m).add_(rnd_vel)

    def kinetic_energy(self) -> torch.Tensor:
        """``sum m v^2 / 2`` in eV, a device scalar."""
        return 0.5 * (self.masses * self.velocities.square()).sum()

    # ---------------------------------------------------------------------------------------------- checks
    def _fetch(self) -> list[float]:
        """One device-to-host copy: peak^2, d^2, v^2, a^2 (maxima over atoms), Epot, Ekin and the shortest squared
        distance of a candidate pair (inf without pairs)."""
        with torch.no_grad():
            d2 = (self.positions - self._reference).square().sum(dim=1).max()
            v2 = self.velocities.square().sum(dim=1).max()
            a2 = (self.forces / self.masses).square().sum(dim=1).max()
            closest = torch.cat([self._pair_distances_squared(), self._peak.new_full((1,), math.inf)]).amin()
            values = torch.stack([self._peak, d2, v2, a2, self.energy.to(STATE_DTYPE), self.kinetic_energy(), closest])
        return values.tolist()

    def _pair_distances_squared(self) -> torch.Tensor:
        return pair_distances_squared(self.positions, self.edge_index, self._edge_shift_state)  # [E]

    def _assert_apart(self, closest2: float) -> None:
        """Atoms on top of each other make the energy and forces NaN or meaningless from here on: stop."""
        if closest2 < MIN_DISTANCE**2:
            d2 = self._pair_distances_squared()
            raise closest_pair_error(d2, self.edge_index, self._unit_shifts, step=self.nsteps)

    def _steps_that_fit(self, d: float, v: float, a: float) -> float:
        """Largest K with ``d + safety (v K dt + a (K dt)^2 / 2) <= skin / 2`` (inf when nothing moves)."""
        room = 0.5 * self.skin - d
        if room < 0:
            return 0.0
        lin, quad = self.safety * v * self.dt, 0.5 * self.safety * a * self.dt**2
        if quad > 0:
            return (-lin + math.sqrt(lin * lin + 4 * quad * room)) / (2 * quad)
        return room / lin if lin > 0 else math.inf

    def _check(self) -> list[float]:
        """The rebuild rule of the module docstring; returns the (fresh) values of :meth:`_fetch`."""
        values = self._fetch()
        window_start, self._last_check = self._last_check, self.nsteps
        if self.skin == 0:  # rebuilt at every evaluation: nothing to decide, no periodic checks needed
            self._next_check = sys.maxsize
            self._assert_apart(values[6])
            return values
        peak2, d2, v2, a2 = values[:4]
        half = 0.5 * self.skin
        if peak2 > half * half:
            self.missed_rebuilds += 1
            self.check_interval = max(1, self.check_interval // 2)
            warnings.warn(
                f"TorchDynamics: an atom moved {math.sqrt(peak2):.3f} Å > skin/2 = {half:.3f} Å before step "
                f"{self.nsteps}'s check: forces after step {window_start} may have missed pairs "
                f"entering the cutoff. Rebuilt; check_interval now {self.check_interval} (a larger skin or "
                "safety avoids this)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._rebuild()
            self.evaluate()
            values = self._fetch()
            peak2, d2, v2, a2 = values[:4]  # d2 = 0 now
        else:
            v, a = math.sqrt(v2), math.sqrt(a2)
            fresh = min(self.check_interval, self._steps_that_fit(0.0, v, a))  # the window a rebuild would give
            if self._steps_that_fit(math.sqrt(d2), v, a) < max(1, int(fresh) // 2):
                self._rebuild()  # the current forces used a list that was still exact: no re-evaluation
                d2 = 0.0
        self._assert_apart(values[6])
        fit = self._steps_that_fit(math.sqrt(d2), math.sqrt(v2), math.sqrt(a2))
        self._interval = int(max(1, min(self.check_interval, fit)))
        self._next_check = self.nsteps + self._interval
        return values

    # ---------------------------------------------------------------------------------------------- running
    def attach(self, function: Callable[..., Any], interval: int = 1, *args: Any, **kwargs: Any) -> None:
        """Call ``function(*args, **kwargs)`` every ``interval`` steps (and at step 0), as ASE's ``attach``;
        :meth:`sync_atoms` runs first, so the function may read ``self.atoms`` (positions, momenta, energy,
        forces)."""
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.observers.append(_Observer(int(interval), function, args, kwargs))

    def run(
        self, steps: int, log_interval: int | None = None, callback: Callable[[ThermoRow], Any] | None = None
    ) -> list[ThermoRow]:
        """Integrate ``steps`` steps; returns a :class:`ThermoRow` every ``log_interval`` steps (none if None),
        each also passed to ``callback``. As ASE, step 0 is logged and observed when ``nsteps == 0``.
        The host waits for the device only at checks, log and observer steps, and at the end (a last check)."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if log_interval is not None and log_interval < 1:
            raise ValueError(f"log_interval must be >= 1 or None, got {log_interval}")
        rows: list[ThermoRow] = []
        self._last_row = None
        if self.nsteps == 0:
            self._sync_point(log_interval, rows, callback)
        end = self.nsteps + steps
        synced = True
        while self.nsteps < end:
            self._step()
            self.nsteps += 1
            synced = self._due(log_interval) or self.nsteps >= self._next_check
            if synced:
                self._sync_point(log_interval, rows, callback)
        if not synced:  # the last window is checked too: never leave a missed rebuild uncounted
            self._check()
        return rows

    def _due(self, log_interval: int | None) -> bool:
        step = self.nsteps
        return (log_interval is not None and step % log_interval == 0) or any(
            step % o.interval == 0 for o in self.observers
        )

    def _sync_point(self, log_interval: int | None, rows: list[ThermoRow], callback: Callable | None) -> None:
        step = self.nsteps
        values = self._check()
        if log_interval is not None and step % log_interval == 0:
            now = time.perf_counter()
            rate = float("nan")
            if self._last_row is not None and step > self._last_row[0]:
                rate = (step - self._last_row[0]) / (now - self._last_row[1])
            self._last_row = (step, now)
            epot, ekin = values[4], values[5]
            temperature = 2 * ekin / (self.degrees_of_freedom * units.kB) if self.degrees_of_freedom else 0.0
            row = ThermoRow(step, step * self.timestep_fs / 1000, epot, ekin, epot + ekin, temperature, rate)
            rows.append(row)
            if callback is not None:
                callback(row)
        observers = [o for o in self.observers if step % o.interval == 0]
        if observers:
            self.sync_atoms()
            for o in observers:
                o.function(*o.args, **o.kwargs)

    def sync_atoms(self) -> Atoms:
        """Copy positions, momenta, energy, per-atom energies and forces into ``self.atoms`` (one device-to-host
        transfer) and return it. The results go to the TDNCalculator the engine was built from (it stays attached
        and answers without recomputing), else to a SinglePointCalculator."""
        n = len(self.atoms)
        with torch.no_grad():
            arrays = torch.cat(
                [self.positions, self.velocities * self.masses, self.forces, self.node_energy.to(STATE_DTYPE)[:, None]],
                dim=1,
            )
            host = torch.cat([arrays.reshape(-1), self.energy.to(STATE_DTYPE).view(1)]).cpu().numpy()
        arrays, energy = host[:-1].reshape(n, 10), float(host[-1])
        results = {"energy": energy, "free_energy": energy, "energies": arrays[:, 9].copy(),
                   "forces": arrays[:, 6:9].copy()}  # fmt: skip
        return publish_state(self.atoms, arrays[:, 0:3], arrays[:, 3:6], results, self.calculator)


def _free_mask(atoms: Atoms) -> np.ndarray | None:
    """``[N]`` 1.0 for moving atoms, 0.0 for atoms fixed by FixAtoms; None without constraints."""
    if not atoms.constraints:
        return None
    free = np.ones(len(atoms))
    for constraint in atoms.constraints:
        if not isinstance(constraint, FixAtoms):
            raise ValueError(
                f"the torch engine supports FixAtoms constraints only, got {type(constraint).__name__}: "
                "use the ASE engine for this structure"
            )
        free[constraint.index] = 0.0
    return free
