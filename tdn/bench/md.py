"""MD step benchmark: milliseconds per energy+forces call of an ASE calculator, and peak GPU memory, against the
number of atoms (Cu fcc), for every tdn backend at MACE-medium widths and, in the same run, mace-torch's
``MACECalculator`` with an untrained MACE of the same widths (e3nn, and cuEquivariance where importable).

A "step" is what an MD step costs the calculator: every atom is displaced by ~1e-3 Å (as an MD step moves it),
then ``atoms.get_forces()`` runs: ASE's state check, host -> device copy of the positions, neighbour list (tdn:
the cached skin list, rebuilt only when needed), model energy and forces, device -> host copy. Median over
repetitions after warm-up (the first neighbour-list build and any lazy set-up fall into the warm-up).

mace-torch pins e3nn 0.4.4 while tdn needs e3nn >= 0.5, so the reference runs in a child process
(``_mace_worker.py``, which never imports tdn) with its own ``PYTHONPATH`` (``--mace-pythonpath``) or interpreter
(``--mace-python``); it is skipped with a note when mace-torch cannot be imported there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk

from . import common
from .md_report import STEP_NOISE, markdown_report, plot

FULL_SIZES = (864, 4000, 10976, 32000, 108000)
QUICK_SIZES = (32, 108)
DTYPES = ("float32", "float64")
REFERENCES = ("mace-e3nn", "mace-cueq")
CU_LATTICE = 3.6  # Å, as in the reference measurements
WORKER = Path(__file__).with_name("_mace_worker.py")


@dataclass
class MDBenchConfig:
    device: str = "cpu"
    sizes: tuple[int, ...] = FULL_SIZES
    dtypes: tuple[str, ...] = DTYPES
    backends: tuple[str, ...] | None = None  # None: every backend tdn.models knows, and cp:shared
    engine_backends: tuple[str, ...] = ("cp:shared",)  # also timed as whole MD steps of tdn.dynamics ("<b> engine")
    engine_steps: int = 10  # MD steps per timed call of the engine
    references: tuple[str, ...] = REFERENCES
    preset: str = "mace-medium"
    avg_num_neighbors: float = 40.0  # as the reference MACE is built; only scales the messages
    skin: float = 0.5
    warmup: int = 3
    reps: int = 15
    max_seconds: float | None = 60.0
    mace_python: str = sys.executable
    mace_pythonpath: str | None = None
    quick: bool = False
    name: str = "md_cpu"
    notes: list[str] = field(default_factory=list)


OnRow = Callable[[dict[str, Any]], None]

# ------------------------------------------------------------------------------------------------- systems


def cu_fcc(natoms: int, seed: int = 0) -> Atoms:
    """A rattled cubic Cu fcc supercell of ``natoms = 4 n^3`` atoms."""
    n = round((natoms / 4) ** (1 / 3))
    if 4 * n**3 != natoms:
        raise ValueError(f"Cu fcc cubic supercells have 4 n^3 atoms (32, 108, 864, 4000, ...), got {natoms}")
    atoms = bulk("Cu", "fcc", a=CU_LATTICE, cubic=True).repeat((n, n, n))
    atoms.rattle(0.05, seed=seed)
    return atoms


def make_step(atoms: Atoms, seed: int = 0):
    """The timed call: displace every atom by ~``STEP_NOISE`` Å, then energy and forces."""
    rng = np.random.default_rng(seed)

    def step() -> None:
        atoms.positions += rng.normal(scale=STEP_NOISE, size=atoms.positions.shape)
        atoms.get_forces()

    return step


def time_steps(call: Any, cfg: MDBenchConfig, steps_per_call: int = 1) -> dict[str, Any]:
    """Median (and min) ms per step over timed calls of ``call``, each ``steps_per_call`` steps; steps/s; peak GPU
    memory (absolute, as the reference reports it)."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        common.free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
    timing = common.time_call(call, device, warmup=cfg.warmup, reps=cfg.reps, max_seconds=cfg.max_seconds)
    step_ms = timing["median_ms"] / steps_per_call
    return {
        "step_ms": step_ms,
        "min_ms": timing["min_ms"] / steps_per_call,
        "reps": timing["reps"],
        "steps_per_s": 1e3 / step_ms,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }


def measure(calc: Any, natoms: int, cfg: MDBenchConfig) -> dict[str, Any]:
    """Median ms per step, steps/s, peak GPU memory (absolute, as the reference reports it) and edge count."""
    atoms = cu_fcc(natoms)
    atoms.calc = calc
    row = time_steps(make_step(atoms), cfg)
    if hasattr(calc, "neighbor_list_builds"):
        row["neighbors_per_atom"] = calc.num_edges / natoms
        row["neighbor_list_builds"] = calc.neighbor_list_builds
    return row


# ------------------------------------------------------------------------------------------------- tdn


def tdn_backends(cfg: MDBenchConfig) -> tuple[str, ...]:
    from ..models.config import BACKENDS

    if cfg.backends is None:  # every backend with its default weights, and cp's fast MD mode
        from .. import tp

        return ("cp:shared", *(b for b in BACKENDS if b in tp.BACKENDS))
    unknown = sorted({b.partition(":")[0] for b in cfg.backends} - set(BACKENDS))
    if unknown:
        raise ValueError(f"unknown backends {unknown}; known: {BACKENDS} (a weight mode after a colon: cp:shared)")
    return tuple(cfg.backends)


def backend_fields(backend: str) -> dict[str, str]:
    """The model options of ``backend``: a backend name (its default weight mode) or ``name:weights``."""
    kind, _, weights = backend.partition(":")
    return {"tp": kind, **({"tp_weights": weights} if weights else {})}


def bench_model(preset: str, backend: str, dtype: str, device: str = "cpu") -> torch.nn.Module:
    """An untrained model of ``preset`` with ``backend`` (:func:`backend_fields`) for Cu, seed 0, ready on
    ``device`` in ``dtype`` (the batch and engine benchmarks' model)."""
    from ..models import PRESETS, build_model
    from ..runtime import model_dtype, prepare_model

    torch.manual_seed(0)
    model = build_model(**{**PRESETS[preset], **backend_fields(backend), "elements": [29], "avg_num_neighbors": 40.0})
    return prepare_model(model, torch.device(device), model_dtype(dtype))


def model_config(cfg: MDBenchConfig, backend: str) -> dict[str, Any]:
    """The preset's model with ``backend`` (:func:`backend_fields`)."""
    from ..models import PRESETS

    return {**PRESETS[cfg.preset], **backend_fields(backend), "elements": [29],
            "avg_num_neighbors": cfg.avg_num_neighbors}  # fmt: skip


def bench_tdn(cfg: MDBenchConfig, workdir: Path, on_row: OnRow | None = None) -> list[dict[str, Any]]:
    """One row per (backend, dtype, size): the calculator's energy+forces call, and for ``cfg.engine_backends``
    also a whole MD step of the device-resident engine. ``on_row`` sees every row as soon as it is measured."""
    from .. import save_model
    from ..models import build_model

    rows = []
    for backend in tdn_backends(cfg):
        torch.manual_seed(0)
        model, err = common.attempt(lambda b=backend: build_model(**model_config(cfg, b)), "cpu")
        if err is not None:
            rows.append({"impl": f"tdn-{backend}", "err": f"build: {err}"})
            if on_row is not None:
                on_row(rows[-1])
            continue
        path = workdir / f"tdn_{backend}.pt"
        save_model(model, path)
        del model
        cells = [(f"tdn-{backend}", _tdn_cell)]
        if backend in cfg.engine_backends:
            cells.append((f"tdn-{backend} engine", _engine_cell))
        for impl, cell in cells:
            for dtype in cfg.dtypes:
                rows += _size_sweep(impl, backend, dtype, lambda n, d=dtype, c=cell, p=path: c(p, n, d, cfg), cfg,
                                    on_row)  # fmt: skip
    return rows


def _size_sweep(
    impl: str, backend: str, dtype: str, measure_size, cfg: MDBenchConfig, on_row: OnRow | None = None
) -> list[dict[str, Any]]:
    """Rows for every size; after an out-of-memory error the larger sizes are skipped."""
    rows, oom_at = [], None
    for natoms in cfg.sizes:
        row = {"impl": impl, "backend": backend, "atoms": natoms, "dtype": dtype}
        if oom_at is not None:
            row["err"] = f"skipped: out of memory at {oom_at} atoms"
        else:
            result, err = common.attempt(lambda n=natoms: measure_size(n), cfg.device)
            row.update(result or {"err": err})
            if err is not None and err.startswith("OOM"):
                oom_at = natoms
            common.free_memory(cfg.device)
        _print_row(row)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _tdn_cell(path: Path, natoms: int, dtype: str, cfg: MDBenchConfig) -> dict[str, Any]:
    from ..calculator import TDNCalculator

    calc = TDNCalculator(path, device=cfg.device, default_dtype=dtype, skin=cfg.skin)
    return measure(calc, natoms, cfg)


def _engine_cell(path: Path, natoms: int, dtype: str, cfg: MDBenchConfig) -> dict[str, Any]:
    """A whole NVE step of :class:`tdn.dynamics.TorchDynamics` (integrator, skin list, energy and forces, all on
    the device), timed over ``cfg.engine_steps`` steps per call from a 300 K start."""
    from ..dynamics import TorchDynamics
    from ..md import initialise_velocities

    atoms = cu_fcc(natoms)
    initialise_velocities(atoms, 300.0, seed=0)
    dyn = TorchDynamics(path, atoms, timestep=1.0, device=cfg.device, dtype=dtype, skin=cfg.skin)
    row = time_steps(lambda: dyn.run(cfg.engine_steps), cfg, cfg.engine_steps)
    return row | {"neighbor_list_builds": dyn.neighbor_list_builds, "missed_rebuilds": dyn.missed_rebuilds}


# ------------------------------------------------------------------------------------------------- mace


def mace_widths(cfg: MDBenchConfig) -> dict[str, Any]:
    """The reference MACE's hyperparameters, the same widths as the tdn model of ``cfg.preset``."""
    from ..models import PRESETS, ModelConfig

    c = ModelConfig.from_dict({**PRESETS[cfg.preset], "elements": [29]})
    parity = "eo"
    hidden = "+".join(f"{c.channels}x{l}{parity[l % 2]}" for l in range(c.lmax_hidden + 1))
    return {
        "r_max": c.cutoff,
        "num_bessel": c.num_bessel,
        "num_polynomial_cutoff": c.envelope_exponent,
        "max_ell": c.lmax,
        "num_interactions": c.num_layers,
        "hidden_irreps": hidden,
        "MLP_irreps": f"{c.readout_mlp}x0e",
        "radial_MLP": list(c.radial_mlp),
        "correlation": c.correlation,
        "avg_num_neighbors": cfg.avg_num_neighbors,
    }


def bench_mace(
    cfg: MDBenchConfig, workdir: Path, on_row: OnRow | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of the reference, measured by the worker in a child process; notes say what was skipped. The worker's
    rows are read as it prints them (``on_row`` sees each at once), so a run stopped early keeps what was measured."""
    if not cfg.references:
        return [], []
    job = {
        "device": cfg.device,
        "sizes": list(cfg.sizes),
        "dtypes": list(cfg.dtypes),
        "references": list(cfg.references),
        "widths": mace_widths(cfg),
        "warmup": cfg.warmup,
        "reps": cfg.reps,
        "max_seconds": cfg.max_seconds,
        "lattice": CU_LATTICE,
        "noise": STEP_NOISE,
        "workdir": str(workdir),
        "threads": torch.get_num_threads(),
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # mace-torch pickles whole models
    if cfg.mace_pythonpath:
        env["PYTHONPATH"] = cfg.mace_pythonpath
    rows, notes = [], []
    with tempfile.TemporaryFile("w+") as stderr:  # a file, not a pipe: a chatty stderr cannot block the worker
        with subprocess.Popen([cfg.mace_python, str(WORKER), json.dumps(job)], stdout=subprocess.PIPE,
                              stderr=stderr, text=True, env=env, cwd=workdir) as proc:  # fmt: skip
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith("ROW "):
                    row = json.loads(line[4:])
                    _print_row(row)
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
                elif line.startswith("NOTE "):
                    notes.append(line[5:])
                elif line.startswith("VERSIONS "):
                    notes.append("reference versions: " + line[9:])
        if proc.returncode != 0:
            stderr.seek(0)
            tail = " ".join(stderr.read().strip().splitlines()[-3:])[:400]
            notes.append(f"mace worker exited with {proc.returncode}: {tail}")
    return rows, notes


# ------------------------------------------------------------------------------------------------- run + report


def run(cfg: MDBenchConfig, out_dir: str | Path) -> dict[str, Any]:
    """Measure, writing ``NAME.json`` after every row (a run stopped by a time limit keeps its rows) and the
    markdown and PNG at the end, or with what was measured when interrupted (KeyboardInterrupt)."""
    meta = common.run_metadata(cfg.device, packages=("ase", "torch-geometric", "e3nn"))
    if hasattr(os, "getloadavg"):
        meta["load_average_1min"] = round(os.getloadavg()[0], 2)
    out_dir = Path(out_dir)
    result: dict[str, Any] = {
        "meta": meta,
        "config": asdict(cfg),
        "model": {"preset": cfg.preset, **model_config(cfg, "<backend>"), "mace": mace_widths(cfg)},
        "rows": [],
        "notes": list(cfg.notes),
    }

    def record(row: dict[str, Any]) -> None:
        result["rows"].append(row)
        common.write_json(out_dir / f"{cfg.name}.json", result)

    try:
        with tempfile.TemporaryDirectory(prefix="tdn_bench_md_") as tmp:
            bench_tdn(cfg, Path(tmp), record)
            _, notes = bench_mace(cfg, Path(tmp), record)
            result["notes"] += notes
    except KeyboardInterrupt:
        result["notes"].append("interrupted before the end (e.g. a time limit): only the rows above were measured")
        write_results(result, out_dir, cfg.name)
        raise
    write_results(result, out_dir, cfg.name)
    return result


def write_results(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    return common.write_report(result, out_dir, name, markdown_report, plot)


def _print_row(row: dict[str, Any]) -> None:
    keys = ("impl", "atoms", "dtype", "step_ms", "peak_mem_gb", "neighbors_per_atom", "err")
    print(json.dumps({k: row[k] for k in keys if row.get(k) is not None}), flush=True)


# ------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_md.py",
        description="ms per energy+forces call and peak GPU memory vs atoms (Cu fcc) for every tdn backend and, "
        "in the same run, mace-torch's MACECalculator at the same widths.",
    )
    p.add_argument("--out", required=True, help="output directory for NAME.json / .md / .png")
    p.add_argument("--name", default=None, help="file name stem (default: md_<device>[_quick])")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"CPU smoke run (< 1 min): {list(QUICK_SIZES)} atoms, tiny widths, 1 warm-up, 3 reps",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", help=f"numbers of atoms, 4 n^3 (default {list(FULL_SIZES)})")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--backends", nargs="+",
                   help="tdn backends, a weight mode after a colon (cp:shared); default: every registered one")
    p.add_argument(
        "--references",
        nargs="*",
        choices=REFERENCES,
        default=list(REFERENCES),
        help="mace-torch columns (mace-cueq only where cuequivariance-torch imports)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="model widths, a tdn.models.PRESETS name (default: mace-medium; tiny with --quick)",
    )
    p.add_argument("--skin", type=float, default=0.5, help="tdn neighbour-list skin in Å")
    p.add_argument("--engine-backends", nargs="*", default=["cp:shared"],
                   help="backends also timed as whole MD steps of the device-resident engine (tdn.dynamics)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--max-seconds", type=float, help="stop repeating a cell's timing after this long")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; --quick uses 1)")
    p.add_argument("--mace-python", default=sys.executable, help="interpreter with mace-torch for the reference")
    p.add_argument(
        "--mace-pythonpath",
        default=None,
        help="PYTHONPATH of the reference process, e.g. a `pip install --target DIR mace-torch` folder "
        "(mace-torch pins e3nn 0.4.4, tdn needs e3nn >= 0.5)",
    )
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> MDBenchConfig:
    cfg = MDBenchConfig(
        device=args.device,
        sizes=tuple(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)),
        dtypes=tuple(args.dtypes),
        backends=tuple(args.backends) if args.backends else None,
        references=tuple(args.references),
        preset=args.preset or ("tiny" if args.quick else "mace-medium"),
        skin=args.skin,
        engine_backends=tuple(args.engine_backends),
        mace_python=args.mace_python,
        mace_pythonpath=args.mace_pythonpath,
        quick=args.quick,
    )
    if args.quick:
        cfg.warmup, cfg.reps, cfg.max_seconds = 1, 3, 5.0
    for attr in ("warmup", "reps", "max_seconds"):
        if getattr(args, attr) is not None:
            setattr(cfg, attr, getattr(args, attr))
    for natoms in cfg.sizes:
        cu_fcc(natoms)  # fail early on a size that is not 4 n^3
    cfg.name = args.name or f"md_{torch.device(args.device).type}{'_quick' if args.quick else ''}"
    return cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.cli_main(argv, parse_args, config_from_args, run)
