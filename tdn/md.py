"""``tdn-md``: molecular dynamics with an exported tdn model through ASE's integrators.

Ensembles: NVE (velocity Verlet), NVT (Langevin, Nosé–Hoover chain), NPT (isotropic and full-cell MTK, Langevin
BAOAB barostat). Writes a trajectory (extxyz or ASE .traj), a thermo log, and a thermo PNG at the end::

    tdn-md structure.xyz --model model.pt --ensemble nvt-langevin --temperature 300 --steps 10000 -o run1

``--engine torch`` runs NVE and Langevin NVT with torch-sim's integrators on one structure instead
(:class:`tdn.integrations.torchsim_md.TorchSimDynamics`; the state stays on the model's device, in float64), or with
:class:`tdn.dynamics.TorchDynamics` where torch-sim cannot (constraints, slabs and wires, torch-sim not installed);
the log, trajectory and PNG are written by the same code.

Input mistakes (a missing or unreadable file, a frame out of range, a bad option value, a non-empty output
directory without ``--overwrite``) end with one or two lines naming the file or option and the fix, exit code 2,
before anything is written; ``--debug`` shows the traceback. A run that blows up (temperature above
``--max-temperature``, total energy drifting by more than ``--max-energy-drift`` eV/atom) is warned about, or
stopped with exit code 1 under ``--stop-on-blowup`` (see :mod:`tdn.md_checks`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from ase import Atoms, units
from ase.io import Trajectory, write
from ase.md.velocitydistribution import Stationary, ZeroRotation

from .md_checks import (
    BlowupLimits,
    BlowupMonitor,
    MDBlowupError,
    UsageError,
    check_output_dir,
    clear_outputs,
)

try:  # ASE >= 3.29; MaxwellBoltzmannDistribution is deprecated there
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover - older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    def thermalize_momenta(atoms: Atoms, temperature_K: float, *, rng=None) -> None:
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


ENSEMBLES = ("nve", "nvt-langevin", "nvt-nose-hoover", "npt-iso", "npt", "npt-langevin")
NPT_ENSEMBLES = ("npt-iso", "npt", "npt-langevin")
ENGINES = ("ase", "torch", "torchsim")  # torchsim: many structures at once, tdn.md_torchsim
TORCH_ENSEMBLES = ("nve", "nvt-langevin")  # --engine torch
TRAJ_FORMATS = ("extxyz", "traj")
LOG_COLUMNS = ("step", "time[ps]", "Epot[eV]", "Ekin[eV]", "Etot[eV]", "T[K]", "steps/s")
NPT_LOG_COLUMNS = ("V[A^3]", "P[GPa]")


@dataclass
class MDSettings:
    """Everything about the integrator, in user units (fs, K, GPa)."""

    ensemble: str = "nve"
    timestep: float = 1.0  # fs
    temperature: float = 300.0  # K, thermostat target
    friction: float = 0.01  # 1/fs, Langevin
    tdamp: float = 100.0  # fs, Nosé–Hoover / MTK thermostat time
    pressure: float = 0.0  # GPa, barostat target
    pdamp: float = 1000.0  # fs, barostat time
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        for name in ("timestep", "tdamp", "pdamp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.friction < 0 or self.temperature < 0:
            raise ValueError("friction and temperature must not be negative")


def build_dynamics(atoms: Atoms, settings: MDSettings, engine: str = "ase") -> Any:
    """The ASE integrator for ``settings.ensemble`` (no ASE-side logfile or trajectory: tdn-md writes its own), or
    with ``engine="torch"`` (``nve`` and ``nvt-langevin`` only) an integrator running the model of the attached
    TDNCalculator (its device and dtype) on the model's device: torch-sim's
    (:class:`tdn.integrations.torchsim_md.TorchSimDynamics`), or :class:`tdn.dynamics.TorchDynamics` for what
    torch-sim cannot run (:func:`tdn.integrations.torchsim_md.torch_sim_cannot_run`: constraints, slabs and wires,
    torch-sim not installed). All have ``attach``, ``run``, ``nsteps`` and ``dt``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "torchsim":
        raise ValueError("the torchsim engine runs every structure of a file at once: use tdn.md_torchsim.run_md_batch")
    if engine == "torch":
        return _torch_engine(atoms, settings)
    dt = settings.timestep * units.fs
    T = settings.temperature
    rng = np.random.default_rng(settings.seed)
    if settings.ensemble in NPT_ENSEMBLES and not atoms.pbc.all():
        raise ValueError(f"ensemble {settings.ensemble!r} needs a fully periodic cell, got pbc={atoms.pbc.tolist()}")
    if settings.ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if settings.ensemble == "nvt-langevin":
        from ase.md.langevin import Langevin

        return Langevin(
            atoms, timestep=dt, temperature_K=T, friction=settings.friction / units.fs, fixcm=False, rng=rng
        )
    if settings.ensemble == "nvt-nose-hoover":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=T, tdamp=settings.tdamp * units.fs)
    if settings.ensemble in ("npt-iso", "npt"):
        from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

        cls = IsotropicMTKNPT if settings.ensemble == "npt-iso" else MTKNPT
        return cls(
            atoms,
            timestep=dt,
            temperature_K=T,
            pressure_au=settings.pressure * units.GPa,
            tdamp=settings.tdamp * units.fs,
            pdamp=settings.pdamp * units.fs,
        )
    from ase.md.langevinbaoab import LangevinBAOAB  # npt-langevin

    return LangevinBAOAB(
        atoms,
        timestep=dt,
        temperature_K=T,
        externalstress=-settings.pressure * units.GPa,  # ASE stress sign: negative under compression
        T_tau=1.0 / settings.friction * units.fs if settings.friction > 0 else None,
        P_tau=settings.pdamp * units.fs,
        rng=rng,
    )


def _torch_engine(atoms: Atoms, settings: MDSettings) -> Any:
    """``--engine torch``: torch-sim's integrator, or TorchDynamics where torch-sim cannot run the structure."""
    from .calculator import TDNCalculator
    from .integrations.torchsim_md import torch_sim_cannot_run

    calc = atoms.calc
    if not isinstance(calc, TDNCalculator):
        raise ValueError("the torch engine needs a TDNCalculator attached to the atoms: it runs that model")
    if settings.ensemble not in TORCH_ENSEMBLES:
        raise ValueError(f"ensemble {settings.ensemble!r} is not available with the torch engine (it has "
                         f"{', '.join(TORCH_ENSEMBLES)}); use the ASE engine for it")  # fmt: skip
    if torch_sim_cannot_run(atoms) is not None:
        from .dynamics import TorchDynamics

        return TorchDynamics(calc, atoms, settings.timestep, ensemble=settings.ensemble,
                             temperature_K=settings.temperature, friction=settings.friction, seed=settings.seed)
    from .integrations.torchsim import TDNTorchSimModel
    from .integrations.torchsim_md import TorchSimDynamics
    from .md_torchsim import integrator

    model = TDNTorchSimModel(calc.model, device=calc.device, dtype=calc.dtype, state_dtype="float64",
                             compute_stress=False, neighbor_list=calc.neighbor_list)  # fmt: skip
    init, update, init_kwargs = integrator(model, settings)
    return TorchSimDynamics(model, atoms, init, update, timestep=settings.timestep, seed=settings.seed,
                            init_kwargs=init_kwargs, calculator=calc)  # fmt: skip


def initialise_velocities(atoms: Atoms, temperature: float, seed: int) -> None:
    """Maxwell–Boltzmann velocities at ``temperature`` K, no centre-of-mass drift (no rotation for molecules)."""
    thermalize_momenta(atoms, temperature, rng=np.random.default_rng(seed))
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)


class ThermoLogger:
    """Writes one whitespace-separated line per call: step, time, Epot, Ekin, Etot, T, steps/s (+ V, P for NPT).

    ``steps/s`` is measured over the steps since the previous line. Reads only cached calculator results
    (the torch engine puts its results into ``atoms`` before calling it).
    """

    def __init__(self, dyn: Any, atoms: Atoms, fh: IO[str], ensemble: str,
                 extra: Sequence[Any] = ()) -> None:  # fmt: skip
        self.dyn, self.atoms, self.fh = dyn, atoms, fh
        self.with_pressure = ensemble in NPT_ENSEMBLES
        self.extra = list(extra)  # objects with ``columns`` and ``values()``: more columns after the standard ones
        columns = LOG_COLUMNS + (NPT_LOG_COLUMNS if self.with_pressure else ())
        columns += tuple(name for item in self.extra for name in item.columns)
        fh.write(f"# tdn-md ensemble={ensemble} natoms={len(atoms)} timestep_fs={dyn.dt / units.fs:g}\n")
        fh.write("#" + f"{columns[0]:>13} " + " ".join(f"{c:>14}" for c in columns[1:]) + "\n")
        self._last_step, self._last_time = None, time.perf_counter()

    def __call__(self) -> None:
        step = self.dyn.nsteps
        now = time.perf_counter()
        rate = float("nan")
        if self._last_step is None or step > self._last_step:
            if self._last_step is not None:
                rate = (step - self._last_step) / (now - self._last_time)
            self._last_step, self._last_time = step, now
        epot = self.atoms.get_potential_energy()
        ekin = self.atoms.get_kinetic_energy()
        values = [
            step,
            step * self.dyn.dt / (1000 * units.fs),
            epot,
            ekin,
            epot + ekin,
            self.atoms.get_temperature(),
            rate,
        ]
        if self.with_pressure:
            pressure = -np.trace(self.atoms.get_stress(voigt=False, include_ideal_gas=True)) / 3 / units.GPa
            values += [self.atoms.get_volume(), pressure]
        for item in self.extra:
            values += list(item.values())
        self.fh.write(f"{step:>14d} " + " ".join(f"{v:>14.6f}" for v in values[1:]) + "\n")
        self.fh.flush()


class TrajectoryWriter:
    """Appends frames (with energy and forces) to an extxyz file or an ASE .traj file."""

    def __init__(self, path: Path, atoms: Atoms) -> None:
        self.path, self.atoms = path, atoms
        self.format = "traj" if path.suffix == ".traj" else "extxyz"
        self._traj = Trajectory(str(path), "w", atoms) if self.format == "traj" else None
        self._fh = None if self._traj else open(path, "w")
        self.frames = 0

    def __call__(self) -> None:
        if self._traj is not None:
            self._traj.write()
        else:
            write(self._fh, self.atoms, format="extxyz")
            self._fh.flush()
        self.frames += 1

    def close(self) -> None:
        (self._traj or self._fh).close()


def read_log(path: str | Path) -> tuple[dict[str, str], list[str], np.ndarray]:
    """Run metadata (ensemble, natoms, timestep_fs), column names and values ``[rows, columns]`` of a tdn-md log."""
    with open(path) as fh:
        meta = dict(item.split("=", 1) for item in fh.readline().lstrip("#").split() if "=" in item)
        names = fh.readline().lstrip("#").split()
    values = np.loadtxt(path, comments="#", ndmin=2)
    return meta, names, values


def plot_thermo(log_path: str | Path, png_path: str | Path) -> None:
    """Energies, temperature (and volume, pressure for NPT) against time, one panel each, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, names, values = read_log(log_path)
    natoms = int(meta.get("natoms", 1))
    col = {name: values[:, i] for i, name in enumerate(names)}
    t = col["time[ps]"]
    panels = [("E - E(0) [meV/atom]", ("Epot[eV]", "Etot[eV]")), ("T [K]", ("T[K]",))]
    panels += [(label, (name,)) for name, label in (("V[A^3]", "V [Å³]"), ("P[GPa]", "P [GPa]")) if name in col]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels) + 0.6), sharex=True, squeeze=False)
    for ax, (label, keys) in zip(axes[:, 0], panels):
        for key in keys:
            y = col[key]
            if key.startswith("E"):
                y = (y - y[0]) / natoms * 1000
            ax.plot(t, y, label=key.split("[")[0])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(
        f"tdn-md {meta.get('ensemble', '')}, {natoms} atoms, dt = {meta.get('timestep_fs', '?')} fs", fontsize=10
    )
    axes[-1, 0].set_xlabel("time [ps]")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


@dataclass
class MDResult:
    steps: int
    wall_s: float
    steps_per_s: float
    log: Path
    trajectory: Path
    png: Path | None
    blowups: list[tuple[int, str]] = field(default_factory=list)  # (step, message) of every limit passed


def run_md(
    atoms: Atoms,
    settings: MDSettings,
    steps: int,
    output_dir: str | Path,
    *,
    traj_format: str = "extxyz",
    traj_interval: int = 10,
    log_interval: int = 10,
    progress: bool = True,
    plot: bool = True,
    engine: str = "ase",
    overwrite: bool = False,
    limits: BlowupLimits | None = None,
    monitors: Sequence[Any] = (),
) -> MDResult:
    """Run ``steps`` MD steps of ``atoms`` (calculator attached) and write log, trajectory and thermo PNG.

    ``engine``: ``"ase"`` (ASE's integrators) or ``"torch"`` (torch-sim's, or :class:`tdn.dynamics.TorchDynamics`),
    see :func:`build_dynamics`. ``output_dir`` must be empty or new unless ``overwrite`` (then the files of an earlier
    run are replaced; :class:`tdn.md_checks.UsageError` otherwise). ``limits`` (default: warn only, default limits)
    are checked at every log step: :class:`tdn.md_checks.MDBlowupWarning`, or :class:`tdn.md_checks.MDBlowupError`
    with ``limits.stop``; a geometry the model cannot evaluate any more (atoms on top of each other) also raises
    MDBlowupError. The files written up to then stay. ``monitors``: observers called with the dynamics object at
    every log step, after the blow-up check, whose ``columns`` / ``values()`` are logged (e.g.
    :class:`tdn.md_spread.SpreadMonitor`)."""
    from .runtime import GeometryError

    if traj_format not in TRAJ_FORMATS:
        raise ValueError(f"traj_format must be one of {TRAJ_FORMATS}, got {traj_format!r}")
    if steps < 0 or traj_interval < 1 or log_interval < 1:
        raise ValueError("steps must be >= 0 and the intervals >= 1")
    out = Path(output_dir)
    check_output_dir(out, overwrite)
    limits = limits or BlowupLimits()
    max_temperature, max_drift = limits.resolved(settings.ensemble, settings.temperature, atoms.get_temperature())
    try:
        dyn = build_dynamics(atoms, settings, engine)  # before anything is written: it checks the settings
    except ValueError as err:  # a setting or a structure the integrator cannot take: the user's to fix
        raise UsageError(str(err)) from err
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_outputs(out)
    log_path, traj_path = out / "md.log", out / f"trajectory.{traj_format}"
    traj = TrajectoryWriter(traj_path, atoms)
    monitor = BlowupMonitor(dyn, atoms, max_temperature, max_drift, stop=limits.stop)
    bar = _progress_bar(steps, progress)
    with open(log_path, "w") as log_fh:
        logger = ThermoLogger(dyn, atoms, log_fh, settings.ensemble, extra=monitors)
        dyn.attach(logger, interval=log_interval)
        dyn.attach(traj, interval=traj_interval)
        dyn.attach(monitor, interval=log_interval)  # after the logger: the log has the step that stops a run
        for extra in monitors:
            dyn.attach(extra, log_interval, dyn)
        if bar is not None:
            dyn.attach(lambda: bar.update(dyn.nsteps - bar.n), interval=log_interval)
        start = time.perf_counter()
        try:
            dyn.run(steps)
        except GeometryError as err:
            where = "" if getattr(err, "step", None) is not None else f"step {dyn.nsteps + 1}: "  # the step under way
            raise MDBlowupError(f"{where}{err}\n  the run blew up{monitor.hint()}") from err
        finally:
            wall = time.perf_counter() - start
            if bar is not None:
                bar.update(dyn.nsteps - bar.n)
                bar.close()
            traj.close()
    png = out / "thermo.png" if plot else None
    if png is not None:
        plot_thermo(log_path, png)
    rate = steps / wall if wall > 0 else float("nan")
    return MDResult(steps, wall, rate, log_path, traj_path, png, monitor.events)


def _progress_bar(steps: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, unit="step", desc="tdn-md", dynamic_ncols=True, mininterval=0.5)


# The command line lives in tdn.md_cli; ``tdn-md`` is ``tdn.md:main``.
from .md_cli import build_parser, main  # noqa: E402, F401
