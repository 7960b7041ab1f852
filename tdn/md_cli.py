"""The ``tdn-md`` command line: options, input checks (exit code 2 with one message, no traceback unless
``--debug``), and the run itself (:func:`tdn.md.run_md`). ``tdn-md`` is ``tdn.md:main``, which is :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

from .md import (
    ENGINES,
    ENSEMBLES,
    NPT_ENSEMBLES,
    TORCH_ENSEMBLES,
    TRAJ_FORMATS,
    MDSettings,
    initialise_velocities,
    run_md,
)
from .md_checks import (
    BlowupLimits,
    MDBlowupError,
    MDBlowupWarning,
    UsageError,
    check_number,
    check_output_dir,
    read_structure,
    run_command,
)
from .md_spread import ON_SPREAD, SPREAD_COLUMN, UNCERTAIN_NAME, SpreadMonitor, SpreadStop


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tdn-md",
        description="Molecular dynamics with an exported tdn model (ASE integrators). Writes OUTPUT_DIR/md.log "
        "(step, time, Epot, Ekin, Etot, T, steps/s; + volume and pressure for NPT), OUTPUT_DIR/trajectory.extxyz "
        "(or .traj) and OUTPUT_DIR/thermo.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("structure", help="input structure, any format ase.io.read knows (extxyz, cif, POSCAR, .traj)")
    p.add_argument("--model", required=True, help="model file written by tdn.save_model / tdn-train's export")
    p.add_argument(
        "--index",
        default=None,
        help="frame of the structure file to start from (negative: from the end; default: the last); with --engine "
        "torchsim: the frames to run, one or a slice such as 0:8 (default: every frame)",
    )
    p.add_argument("-o", "--output-dir", default="md_out", help="directory for log, trajectory and PNG")
    g = p.add_argument_group("integrator")
    g.add_argument(
        "--ensemble",
        choices=ENSEMBLES,
        default="nve",
        help="nve: velocity Verlet; nvt-langevin; nvt-nose-hoover: Nosé–Hoover chain; npt-iso: isotropic "
        "MTK; npt: full-cell MTK; npt-langevin: Langevin BAOAB with a Langevin-Hoover barostat",
    )
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default="ase",
        help="ase: ASE's integrators calling the model; torch: torch-sim's integrators on this structure, state "
        "(float64) and step on the model's device (nve and nvt-langevin only; constraints, slabs and wires: "
        "tdn.dynamics.TorchDynamics); torchsim: torch-sim's integrators on every structure of the file at once, "
        "one subdirectory of OUTPUT_DIR per structure (tdn.md_torchsim)",
    )
    g.add_argument("--steps", type=int, default=1000, help="number of MD steps")
    g.add_argument("--timestep", type=float, default=1.0, help="time step in fs")
    g.add_argument("--temperature", type=float, default=300.0, help="thermostat target in K")
    g.add_argument(
        "--init-temperature",
        type=float,
        default=None,
        help="Maxwell-Boltzmann velocities at this temperature in K; None: --temperature; a negative value "
        "keeps the velocities stored in the structure file",
    )
    g.add_argument("--friction", type=float, default=0.01, help="Langevin friction in 1/fs")
    g.add_argument("--tdamp", type=float, default=100.0, help="Nosé–Hoover / MTK thermostat time in fs")
    g.add_argument("--pressure", type=float, default=0.0, help="barostat target pressure in GPa")
    g.add_argument("--pdamp", type=float, default=1000.0, help="barostat time in fs")
    g.add_argument("--seed", type=int, default=0, help="seed for initial velocities and Langevin noise")
    c = p.add_argument_group("calculator")
    c.add_argument("--device", default=_default_device(), help="torch device: cpu, cuda, cuda:1")
    c.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="model precision")
    c.add_argument("--skin", type=float, default=0.5, help="neighbour-list skin in Å (rebuilt after skin/2 moves; "
                   "torch-sim rebuilds the list at every step)")
    c.add_argument("--compile", action="store_true", help="torch.compile the model (experimental)")
    o = p.add_argument_group("output")
    o.add_argument("--traj-format", choices=TRAJ_FORMATS, default="extxyz", help="trajectory file format")
    o.add_argument("--traj-interval", type=int, default=10, help="write a frame every this many steps")
    o.add_argument("--log-interval", type=int, default=10, help="write a log line every this many steps")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--no-plot", action="store_true", help="no thermo PNG")
    o.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty OUTPUT_DIR, replacing an earlier run's files"
    )
    b = p.add_argument_group("blow-up checks (at every log step)")
    b.add_argument(
        "--max-temperature",
        type=float,
        default=None,
        help="warn when the temperature exceeds this, in K; default: 10 x the larger of --temperature (thermostats) "
        "and the initial temperature, at least 5000 K",
    )
    b.add_argument(
        "--max-energy-drift",
        type=float,
        default=None,
        help="warn when the total energy per atom moves further than this from its start, in eV/atom; default: 1, "
        "plus 3 kB T for thermostatted ensembles",
    )
    b.add_argument("--stop-on-blowup", action="store_true", help="stop the run (exit code 1) instead of warning")
    u = p.add_argument_group("committee (uncertainty, active learning; --engine ase)")
    u.add_argument("--committee", nargs="+", default=None, metavar="MODEL",
                   help="further model files: with --model, a committee whose mean forces drive the run; the log gets "
                   f"its force spread (column {SPREAD_COLUMN}: max over atoms of the force std)")  # fmt: skip
    u.add_argument("--max-force-spread", type=float, default=None,
                   help="at log steps where the force spread exceeds this (eV/Å), write the frame to OUTPUT_DIR/"
                   f"{UNCERTAIN_NAME} and act as --on-spread says")  # fmt: skip
    u.add_argument("--on-spread", choices=ON_SPREAD, default="stop",
                   help="stop: stop the run (exit code 1); write: keep running, writing every such frame")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``tdn-md``: 0 on success, 2 for a mistake in the input (one message, no traceback unless ``--debug``),
    1 for a run stopped by a blow-up or another error."""
    args = build_parser().parse_args(argv)  # argparse itself exits with 2 on unknown options and bad types

    def run() -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("always", MDBlowupWarning)
            warnings.showwarning = _WarningPrinter()
            return _run(args)

    return run_command("tdn-md", run, args.debug, stopped=(MDBlowupError, SpreadStop))


class _WarningPrinter:
    """``warnings.showwarning`` for the command line: one line per warning, and no more than ``limit`` from one
    place (a blowing-up run warns at every step)."""

    def __init__(self, limit: int = 3) -> None:
        self.limit, self.seen = limit, {}

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        key = (category, filename, lineno)
        self.seen[key] = count = self.seen.get(key, 0) + 1
        if count <= self.limit:
            name = "" if issubclass(category, MDBlowupWarning) else f"{category.__name__}: "
            print(f"tdn-md: warning: {name}{message}", file=sys.stderr)
        elif count == self.limit + 1:
            print("tdn-md: warning: (more warnings like the last are not shown)", file=sys.stderr)


def _check_options(args: argparse.Namespace) -> None:
    """Every option value, before any file is read or written."""
    for option, value, low, strict, unit in (
        ("--steps", args.steps, 0, False, ""),
        ("--timestep", args.timestep, 0, True, " fs"),
        ("--temperature", args.temperature, 0, False, " K"),
        ("--init-temperature", args.init_temperature, None, False, " K"),
        ("--friction", args.friction, 0, False, " 1/fs"),
        ("--tdamp", args.tdamp, 0, True, " fs"),
        ("--pressure", args.pressure, None, False, " GPa"),
        ("--pdamp", args.pdamp, 0, True, " fs"),
        ("--skin", args.skin, 0, False, " Å"),
        ("--traj-interval", args.traj_interval, 1, False, ""),
        ("--log-interval", args.log_interval, 1, False, ""),
        ("--max-temperature", args.max_temperature, 0, True, " K"),
        ("--max-energy-drift", args.max_energy_drift, 0, True, " eV/atom"),
        ("--max-force-spread", args.max_force_spread, 0, True, " eV/Å"),
    ):
        check_number(option, value, low=low, strict=strict, unit=unit)
    if args.max_force_spread is not None and not args.committee:
        raise UsageError("--max-force-spread needs a committee: give its further models with --committee")
    if args.committee and args.engine != "ase":
        raise UsageError(f"--committee runs with --engine ase only: --engine {args.engine} evaluates one model")
    if args.engine == "torch":
        if args.ensemble not in TORCH_ENSEMBLES:
            raise UsageError(
                f"--ensemble {args.ensemble} is not available with --engine torch (it has "
                f"{', '.join(TORCH_ENSEMBLES)}): use --engine ase for it"
            )
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here; use --device cpu")


def _run(args: argparse.Namespace) -> int:
    from .calculator import TDNCalculator
    from .runtime import GeometryError, validate_atoms

    _check_options(args)
    if args.engine == "torchsim":  # every structure of the file at once
        from .md_torchsim import run_from_args

        return run_from_args(args)
    check_output_dir(args.output_dir, args.overwrite)
    index = "-1" if args.index is None else args.index
    atoms = read_structure(args.structure, index)
    frame = f"{args.structure} (frame {index})"
    if args.ensemble in NPT_ENSEMBLES and not atoms.pbc.all():
        raise UsageError(
            f"--ensemble {args.ensemble} needs a fully periodic cell, but {frame} has pbc={atoms.pbc.tolist()}: "
            "use an NVE/NVT ensemble or a periodic structure"
        )
    paths = [Path(args.model), *map(Path, args.committee or ())]
    for option, model in zip(["--model"] + ["--committee"] * len(paths), paths):
        if not model.is_file():
            raise UsageError(f"{option} {model}: no such file; give a model written by tdn.save_model or tdn-train")
        if not zipfile.is_zipfile(model):  # what torch.save (and so tdn.save_model) writes
            raise UsageError(f"{option} {model} is not a tdn model file: give one written by tdn.save_model or "
                             "tdn-train")  # fmt: skip
    model = paths[0] if len(paths) == 1 else paths
    try:
        calc = TDNCalculator(model, device=args.device, default_dtype=args.dtype, compile=args.compile, skin=args.skin)
    except Exception as err:  # noqa: BLE001 - whatever the loader found wrong, the file is the problem
        what = f"--model {paths[0]}" if len(paths) == 1 else f"the committee {', '.join(map(str, paths))}"
        raise UsageError(f"{what} cannot be loaded as a tdn model: {err}") from None
    try:
        validate_atoms(atoms, calc.elements)
    except (ValueError, KeyError) as err:
        raise UsageError(f"{frame}: {err}") from None
    settings = MDSettings(
        ensemble=args.ensemble,
        timestep=args.timestep,
        temperature=args.temperature,
        friction=args.friction,
        tdamp=args.tdamp,
        pressure=args.pressure,
        pdamp=args.pdamp,
        seed=args.seed,
    )
    atoms.calc = calc
    try:
        atoms.get_forces()  # the first evaluation, before anything is written (cached: the run does not redo it)
    except GeometryError as err:
        raise UsageError(f"{frame}: {err}") from None
    init_t = args.temperature if args.init_temperature is None else args.init_temperature
    if init_t >= 0:
        initialise_velocities(atoms, init_t, args.seed)
    limits = BlowupLimits(args.max_temperature, args.max_energy_drift, args.stop_on_blowup)
    spread = None
    if len(paths) > 1:
        spread = SpreadMonitor(atoms, args.max_force_spread, args.on_spread, Path(args.output_dir) / UNCERTAIN_NAME)
    result = run_md(
        atoms,
        settings,
        args.steps,
        args.output_dir,
        traj_format=args.traj_format,
        traj_interval=args.traj_interval,
        log_interval=args.log_interval,
        progress=not args.no_progress,
        plot=not args.no_plot,
        engine=args.engine,
        overwrite=args.overwrite,
        limits=limits,
        **({"monitors": [spread]} if spread is not None else {}),  # the force-spread column and threshold
    )
    print(
        f"tdn-md: {result.steps} steps in {result.wall_s:.1f} s ({result.steps_per_s:.1f} steps/s); "
        f"log {result.log}, trajectory {result.trajectory}" + (f", plot {result.png}" if result.png else "")
    )
    if result.blowups:
        first, last = result.blowups[0][0], result.blowups[-1][0]
        print(f"tdn-md: warning: the run was past its blow-up limits at {len(result.blowups)} checks, steps {first} "
              f"to {last} (see the warnings above)", file=sys.stderr)  # fmt: skip
    if spread is not None and spread.frames:
        print(f"tdn-md: {spread.frames} frame(s) with a force spread above {args.max_force_spread:g} eV/Å in "
              f"{spread.path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
