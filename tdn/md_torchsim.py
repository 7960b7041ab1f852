"""``tdn-md --engine torchsim``: torch-sim's integrators running a tdn model on every structure of a file at once.

All structures of the input (``--index``: every frame by default, or one frame, or a slice such as ``0:8``) are
integrated together: one torch-sim state, one model call per step for the whole batch
(:class:`tdn.integrations.torchsim.TDNTorchSimModel`). Each structure gets its own subdirectory of the output
directory (``000``, ``001``, ... the frame numbers) with the files of the ASE engine, written by the same code
(:class:`tdn.md.ThermoLogger`, :class:`tdn.md.TrajectoryWriter`, :func:`tdn.md.plot_thermo`, blow-up checks of
:class:`tdn.md_checks.BlowupMonitor`)::

    tdn-md structures.xyz --model model.pt --engine torchsim --ensemble nvt-langevin --steps 1000 -o runs

Ensembles (torch-sim-atomistic 0.3.0): ``nve`` (velocity Verlet), ``nvt-langevin`` (torch-sim's BAOAB; friction
in 1/fs), ``nvt-nose-hoover``, ``npt-iso`` (torch-sim's isotropic Nosé–Hoover NPT) and ``npt-langevin``; the
full-cell MTK barostat (``npt``) is not in torch-sim 0.3.0. torch-sim 0.3.0's Nosé–Hoover chains keep one chain per
state and fail for more than one system, so those two ensembles run the structures one after another (still one
torch-sim state each). Structures periodic in all directions and molecules run as separate batches (torch-sim
0.3.0 has one periodicity flag per state); a slab or wire (periodic in some directions only) is refused.

Conventions: the MD state is in the model's dtype (torch-sim integrates in the dtype of its model; a float32 model
accumulates float32 positions, unlike :class:`tdn.dynamics.TorchDynamics`); torch-sim wraps positions into the cell
every step; the Langevin noise is drawn from torch's global generator, seeded with ``--seed`` at the start of each
batch; initial velocities are drawn per structure as by the ASE engine (seed ``--seed + k`` for the k-th structure);
neighbour lists are rebuilt at every step (``--skin`` does not apply).
"""

from __future__ import annotations

import argparse
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read
from ase.stress import full_3x3_to_voigt_6_stress

from .md import NPT_ENSEMBLES, TRAJ_FORMATS, MDResult, MDSettings, ThermoLogger, TrajectoryWriter, plot_thermo
from .md_checks import (
    INPUT_FORMATS,
    BlowupLimits,
    BlowupMonitor,
    MDBlowupError,
    UsageError,
    check_output_dir,
    clear_outputs,
)

ENSEMBLES = ("nve", "nvt-langevin", "nvt-nose-hoover", "npt-iso", "npt-langevin")
ONE_AT_A_TIME = ("nvt-nose-hoover", "npt-iso")  # torch-sim 0.3.0's Nosé–Hoover chains: one system per state


# ------------------------------------------------------------------------------------------------ input
def read_structures(path: str | Path, index: str | None = None) -> tuple[list[Atoms], list[int]]:
    """The frames of a structure file selected by ``index`` (None: all; an integer; a slice ``start:stop:step``)
    and their frame numbers; a :class:`UsageError` naming the file when it cannot be read or nothing is selected."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"structure file {path} does not exist (or is not a file): give a path to {INPUT_FORMATS}")
    try:
        frames = read(path, index=":")
    except Exception as err:  # noqa: BLE001 - ase.io raises many types; all mean the same to the user
        raise UsageError(f"cannot read structure file {path}: {err}\n  give a file in {INPUT_FORMATS}") from None
    frames = frames if isinstance(frames, list) else [frames]
    numbers = list(range(len(frames)))
    try:
        if index is None or index == ":":
            chosen = numbers
        elif ":" in str(index):
            parts = [int(p) if p.strip() else None for p in str(index).split(":")]
            chosen = numbers[slice(*parts)]
        else:
            chosen = [numbers[int(index)]]
    except (ValueError, IndexError, TypeError):
        raise UsageError(f"--index {index!r} selects no frame of {path}, which has {len(frames)}: give a frame "
                         "number, a slice such as 0:8, or leave it out for every frame") from None  # fmt: skip
    if not chosen:
        raise UsageError(f"--index {index!r} selects no frame of {path} ({len(frames)} frames)")
    return [frames[k] for k in chosen], chosen


# ------------------------------------------------------------------------------------------------ integrators
def integrator(model: Any, settings: MDSettings) -> tuple[Any, Any, dict[str, Any]]:
    """``(init, update, init_kwargs)`` of torch-sim for ``settings.ensemble`` (units: ASE time, eV, eV/Å^3)."""
    from torch_sim.integrators.npt import npt_langevin, npt_nose_hoover
    from torch_sim.integrators.nve import nve
    from torch_sim.integrators.nvt import nvt_langevin, nvt_nose_hoover

    def scalar(value: float) -> torch.Tensor:
        return torch.tensor(value, device=model.device, dtype=model.dtype)

    dt, kT = scalar(settings.timestep * units.fs), scalar(settings.temperature * units.kB)
    friction = scalar(settings.friction / units.fs)  # 1 / ASE time
    pressure = scalar(settings.pressure * units.GPa)  # eV/Å^3
    ensemble = settings.ensemble
    if ensemble == "nve":
        return (*nve(model, dt=dt, kT=kT), {})
    if ensemble == "nvt-langevin":
        return (*nvt_langevin(model, dt=dt, kT=kT, gamma=friction), {})
    if ensemble == "nvt-nose-hoover":
        return (*nvt_nose_hoover(model=model, dt=dt, kT=kT), {"tau": scalar(settings.tdamp * units.fs)})
    if ensemble == "npt-iso":
        init, update = npt_nose_hoover(model=model, kT=kT, external_pressure=pressure, dt=dt)
        return init, update, {"t_tau": scalar(settings.tdamp * units.fs), "b_tau": scalar(settings.pdamp * units.fs)}
    if ensemble == "npt-langevin":
        init, update = npt_langevin(model, dt=dt, kT=kT, external_pressure=pressure, alpha=friction,
                                    b_tau=scalar(settings.pdamp * units.fs))  # fmt: skip
        return init, update, {}
    raise UsageError(f"--ensemble {ensemble} is not available with --engine torchsim (it has {', '.join(ENSEMBLES)})"
                     ": use --engine ase for it")  # fmt: skip


def batches(structures: Sequence[Atoms], ensemble: str) -> list[list[int]]:
    """Indices of the structures run together: fully periodic ones and molecules apart; one at a time for
    :data:`ONE_AT_A_TIME` ensembles."""
    periodic = [k for k, a in enumerate(structures) if a.pbc.all()]
    isolated = [k for k, a in enumerate(structures) if not a.pbc.any()]
    groups = [g for g in (periodic, isolated) if g]
    if ensemble in ONE_AT_A_TIME:
        groups = [[k] for g in groups for k in g]
    return groups


def check_structures_for(structures: Sequence[Atoms], ensemble: str, names: Sequence[str]) -> None:
    """A :class:`UsageError` for a structure torch-sim cannot run in ``ensemble``."""
    for atoms, name in zip(structures, names):
        pbc = atoms.pbc.tolist()
        if any(pbc) and not all(pbc):
            raise UsageError(f"structure {name} has pbc={pbc}: torch-sim 0.3.0 keeps one periodicity flag for all "
                             "three directions, so slabs and wires cannot run with --engine torchsim; use --engine "
                             "ase")  # fmt: skip
        if ensemble in NPT_ENSEMBLES and not all(pbc):
            raise UsageError(f"--ensemble {ensemble} needs fully periodic cells, but structure {name} has "
                             f"pbc={pbc}: use an NVE/NVT ensemble or periodic structures")  # fmt: skip


# ------------------------------------------------------------------------------------------------ running
@dataclass
class _Output:
    """The files of one structure, and what writes them."""

    atoms: Atoms
    name: str
    directory: Path
    log_fh: IO[str]
    logger: ThermoLogger
    traj: TrajectoryWriter
    monitor: BlowupMonitor

    def close(self) -> None:
        self.traj.close()
        self.log_fh.close()


def run_md_batch(
    structures: Sequence[Atoms],
    model: Any,
    settings: MDSettings,
    steps: int,
    output_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    traj_format: str = "extxyz",
    traj_interval: int = 10,
    log_interval: int = 10,
    progress: bool = True,
    plot: bool = True,
    overwrite: bool = False,
    limits: BlowupLimits | None = None,
) -> list[MDResult]:
    """Run ``steps`` steps of every structure with torch-sim (``model``: a
    :class:`tdn.integrations.torchsim.TDNTorchSimModel`; momenta taken from the structures) and write, per
    structure, ``OUTPUT_DIR/NAME/md.log``, ``trajectory.<traj_format>`` and ``thermo.png``; ``names`` default
    ``000``, ``001``, ... One :class:`tdn.md.MDResult` per structure, in order. Output directory, blow-up limits
    and errors as :func:`tdn.md.run_md` (a message names the structure). Sets ``model.compute_stress`` to what the
    ensemble needs (NPT only)."""
    from .integrations.torchsim import state_from_atoms
    from .runtime import GeometryError

    if traj_format not in TRAJ_FORMATS:
        raise ValueError(f"traj_format must be one of {TRAJ_FORMATS}, got {traj_format!r}")
    if steps < 0 or traj_interval < 1 or log_interval < 1:
        raise ValueError("steps must be >= 0 and the intervals >= 1")
    names = [f"{k:03d}" for k in range(len(structures))] if names is None else list(names)
    if len(names) != len(structures) or len(set(names)) != len(names):
        raise ValueError("names must give every structure its own name")
    out = Path(output_dir)
    check_output_dir(out, overwrite)
    check_structures_for(structures, settings.ensemble, names)
    init, update, init_kwargs = integrator(model, settings)  # raises UsageError for an ensemble it lacks
    model.compute_stress = settings.ensemble in NPT_ENSEMBLES  # the stress costs a strain derivative per step
    limits = limits or BlowupLimits()
    clock = SimpleNamespace(nsteps=0, dt=settings.timestep * units.fs)  # what the writers read of an integrator
    results: list[MDResult | None] = [None] * len(structures)
    for group in batches(structures, settings.ensemble):
        outputs = [_open(structures[k], names[k], out, overwrite, traj_format, clock, settings, limits) for k in group]
        torch.manual_seed(settings.seed)
        state = state_from_atoms([structures[k] for k in group], model)
        momenta = np.concatenate([structures[k].get_momenta() for k in group])
        momenta = torch.as_tensor(momenta, dtype=model.dtype, device=model.device)
        bar = _progress_bar(steps, progress, len(group))
        start = time.perf_counter()
        clock.nsteps = underway = 0
        try:
            if settings.ensemble in ONE_AT_A_TIME:  # these take the momenta as a keyword
                md = init(state, momenta=momenta, **init_kwargs)
            else:
                state.momenta = momenta
                md = init(state, **init_kwargs)
            _observe(md, model, outputs, clock, log_interval, traj_interval)
            for step in range(1, steps + 1):
                underway = step
                md = update(md)
                clock.nsteps = step
                if step % log_interval == 0 or step % traj_interval == 0:
                    _observe(md, model, outputs, clock, log_interval, traj_interval)
                    if bar is not None:
                        bar.update(step - bar.n)
        except GeometryError as err:
            message = rename_structures(str(err), [names[k] for k in group])
            hint = outputs[0].monitor.hint()
            raise MDBlowupError(f"step {underway}: {message}\n  the run blew up{hint}") from err
        finally:
            wall = time.perf_counter() - start
            if bar is not None:
                bar.close()
            for o in outputs:
                o.close()
        rate = steps / wall if wall > 0 else float("nan")
        for k, o in zip(group, outputs):
            png = o.directory / "thermo.png" if plot else None
            if png is not None:
                plot_thermo(o.directory / "md.log", png)
            results[k] = MDResult(steps, wall, rate, o.directory / "md.log", o.traj.path, png, o.monitor.events)
    return results  # type: ignore[return-value]


def _open(atoms: Atoms, name: str, out: Path, overwrite: bool, traj_format: str, clock: SimpleNamespace,
          settings: MDSettings, limits: BlowupLimits) -> _Output:  # fmt: skip
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_outputs(directory)
    max_temperature, max_drift = limits.resolved(settings.ensemble, settings.temperature, atoms.get_temperature())
    log_fh = open(directory / "md.log", "w")
    logger = ThermoLogger(clock, atoms, log_fh, settings.ensemble)
    traj = TrajectoryWriter(directory / f"trajectory.{traj_format}", atoms)

    def warn(message: str) -> None:
        import warnings

        from .md_checks import MDBlowupWarning

        warnings.warn(f"structure {name}: {message}", MDBlowupWarning, stacklevel=3)

    monitor = BlowupMonitor(clock, atoms, max_temperature, max_drift, stop=limits.stop, warn=warn)
    return _Output(atoms, name, directory, log_fh, logger, traj, monitor)


def _observe(md: Any, model: Any, outputs: list[_Output], clock: SimpleNamespace, log_interval: int,
             traj_interval: int) -> None:  # fmt: skip
    """Copy the state into every structure's Atoms (one transfer) and call its writers and blow-up check, in the
    order of :func:`tdn.md.run_md`: log, trajectory, check."""
    step = clock.nsteps
    stress = getattr(md, "stress", None)
    if stress is None and outputs[0].logger.with_pressure:  # the state does not keep it: one more evaluation
        stress = model(md)["stress"]
    cell = md.cell.transpose(-1, -2)  # torch-sim keeps the cell vectors as columns
    with torch.no_grad():
        parts = [md.positions, md.momenta, md.forces, md.energy, cell] + ([stress] if stress is not None else [])
        host = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in parts]).cpu().numpy()
    n, s = md.positions.shape[0], len(outputs)
    sizes = [3 * n, 3 * n, 3 * n, s, 9 * s] + ([9 * s] if stress is not None else [])
    arrays = np.split(host, np.cumsum(sizes)[:-1])
    positions, momenta, forces = (a.reshape(n, 3) for a in arrays[:3])
    energy, cells = arrays[3], arrays[4].reshape(s, 3, 3)
    stresses = arrays[5].reshape(s, 3, 3) if stress is not None else None
    start = 0
    for b, o in enumerate(outputs):
        atoms, stop = o.atoms, start + len(o.atoms)
        if atoms.pbc.any():
            atoms.set_cell(cells[b], scale_atoms=False)
        atoms.set_positions(positions[start:stop], apply_constraint=False)
        atoms.set_momenta(momenta[start:stop], apply_constraint=False)
        results = {"energy": float(energy[b]), "free_energy": float(energy[b]), "forces": forces[start:stop].copy()}
        if stresses is not None:
            results["stress"] = full_3x3_to_voigt_6_stress(stresses[b])
        atoms.calc = SinglePointCalculator(atoms, **results)
        if step % log_interval == 0:
            o.logger()
        if step % traj_interval == 0:
            o.traj()
        if step % log_interval == 0:
            try:
                o.monitor()
            except MDBlowupError as err:
                raise MDBlowupError(f"structure {o.name}: {err}") from None
        start = stop


def rename_structures(message: str, names: Sequence[str]) -> str:
    """``"structure k: ..."`` of a batch -> the name of its k-th structure."""
    match = re.match(r"structure (\d+)", message)
    if match and int(match.group(1)) < len(names):
        return f"structure {names[int(match.group(1))]}" + message[match.end() :]
    return message


def _progress_bar(steps: int, enabled: bool, size: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, unit="step", desc=f"tdn-md torchsim x{size}", dynamic_ncols=True, mininterval=0.5)


# ------------------------------------------------------------------------------------------------ command line
def run_from_args(args: argparse.Namespace) -> int:
    """``tdn-md --engine torchsim`` after the option checks of :mod:`tdn.md_cli`: read every selected frame, load the
    model, check, initialise velocities, run, report. Exit code as ``tdn-md``."""
    from .integrations.batch import check_structures
    from .integrations.torchsim import TDNTorchSimModel, state_from_atoms
    from .md import initialise_velocities
    from .runtime import GeometryError, compile_energy

    if args.ensemble not in ENSEMBLES:
        raise UsageError(f"--ensemble {args.ensemble} is not available with --engine torchsim (it has "
                         f"{', '.join(ENSEMBLES)}): use --engine ase for it")  # fmt: skip
    check_output_dir(args.output_dir, args.overwrite)
    structures, frames = read_structures(args.structure, args.index)
    names = [f"{f:03d}" for f in frames]
    check_structures_for(structures, args.ensemble, names)
    path = Path(args.model)
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise UsageError(f"--model {path}: not a tdn model file; give one written by tdn.save_model or tdn-train")
    try:
        model = TDNTorchSimModel(path, device=args.device, dtype=args.dtype,
                                 compute_stress=args.ensemble in NPT_ENSEMBLES)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - whatever the loader found wrong, the file is the problem
        raise UsageError(f"--model {path} cannot be loaded as a tdn model: {err}") from None
    try:
        check_structures(structures, model.elements)
        model(state_from_atoms(structures, model))  # the first evaluation, before anything is written
    except (ValueError, KeyError) as err:  # GeometryError and UnknownElementError included
        raise UsageError(f"{args.structure}: {rename_structures(str(err), names)}") from None
    if args.compile:
        compile_energy(model.model)
    init_t = args.temperature if args.init_temperature is None else args.init_temperature
    for k, atoms in enumerate(structures):
        if init_t >= 0:
            initialise_velocities(atoms, init_t, args.seed + k)
    settings = MDSettings(ensemble=args.ensemble, timestep=args.timestep, temperature=args.temperature,
                          friction=args.friction, tdamp=args.tdamp, pressure=args.pressure, pdamp=args.pdamp,
                          seed=args.seed)  # fmt: skip
    limits = BlowupLimits(args.max_temperature, args.max_energy_drift, args.stop_on_blowup)
    try:
        results = run_md_batch(structures, model, settings, args.steps, args.output_dir, names=names,
                               traj_format=args.traj_format, traj_interval=args.traj_interval,
                               log_interval=args.log_interval, progress=not args.no_progress, plot=not args.no_plot,
                               overwrite=args.overwrite, limits=limits)  # fmt: skip
    except GeometryError as err:  # pragma: no cover - run_md_batch turns these into MDBlowupError
        raise MDBlowupError(str(err)) from err
    wall = sum(results[group[0]].wall_s for group in batches(structures, args.ensemble))  # batches run in turn
    total = args.steps * len(results)
    print(f"tdn-md: {len(results)} structures x {args.steps} steps with torch-sim in {wall:.1f} s "
          f"({total / wall if wall > 0 else float('nan'):.1f} structure-steps/s); outputs in "
          f"{Path(args.output_dir)}/{{{','.join(names[:3])}{',...' if len(names) > 3 else ''}}}")  # fmt: skip
    events = [(name, step) for name, r in zip(names, results) for step, _ in r.blowups]
    if events:
        import sys

        print(f"tdn-md: warning: {len(events)} blow-up checks failed (structures "
              f"{', '.join(sorted({n for n, _ in events}))}; see the warnings above)", file=sys.stderr)  # fmt: skip
    return 0
