"""Batched evaluation benchmark: structure-steps per second of a tdn model through torch-sim (S systems, one model
call per step) against a loop of :class:`tdn.TDNCalculator` calls (one call per structure). The MD engines (torch-sim
against :class:`tdn.dynamics.TorchDynamics`, one system) are compared by :mod:`tdn.bench.engines`.

Throughput (``rows``), S rattled Cu fcc cubic supercells of ``n`` atoms each (``n`` in 32 ... 500), the same model:

* ``torch-sim NVE``: one ``torch_sim`` NVE step of the whole batch (velocity Verlet; skin neighbour lists per
  system, one model call: :class:`tdn.integrations.torchsim.TDNTorchSimModel`);
* ``calculator loop``: one ASE velocity-Verlet step (1 fs, the same start) of every structure with its own
  TDNCalculator (skin list, rebuilt only when needed): S model calls, the same motion as torch-sim's;
* ``calculate_batch``: the same moves, then ``TDNCalculator.calculate_batch`` of all S (one graph, one call).

structure-steps/s = S / (seconds per step). Timings: the three methods called in turn, ``reps`` rounds after a
warm-up round (:func:`tdn.bench.common.time_interleaved`), medians. On a CPU the table's throughput counts process
CPU seconds (one thread): on a machine shared with other jobs the wall clock of a 10 ms step measures their load
more than the step; the wall-clock figures are kept in the JSON and in a column of their own. On a GPU: wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms, units

from . import common
from .md import bench_model, cu_fcc

FULL_SIZES = (32, 108, 256, 500)
FULL_SYSTEMS = (1, 8, 64)
LARGE_SYSTEMS = 256  # behind --large
QUICK_SIZES = (32, 108)
QUICK_SYSTEMS = (1, 8)
METHODS = ("torch-sim NVE", "calculator loop", "calculate_batch")


@dataclass
class BatchBenchConfig:
    sizes: tuple[int, ...] = FULL_SIZES
    systems: tuple[int, ...] = FULL_SYSTEMS
    preset: str = "tiny"  # throughput model
    backend: str = "cp:shared"  # a backend, a weight mode after a colon (the fast MD step)
    dtype: str = "float32"
    steps_per_call: int = 1  # throughput: steps per timed call
    warmup: int = 1
    reps: int = 7  # timed rounds, every method once per round
    max_seconds: float = 20.0  # per cell: fewer rounds (at least three) past this
    max_atoms: int = 40_000  # S x n above this: not measured (time and memory)
    device: str = "cpu"
    quick: bool = False
    name: str = "batch_cpu"
    notes: list[str] = field(default_factory=list)


def structures(count: int, natoms: int, temperature: float = 300.0) -> list[Atoms]:
    """``count`` rattled Cu fcc supercells of ``natoms`` atoms (different rattles), Maxwell-Boltzmann momenta."""
    from ..md import initialise_velocities

    out = []
    for k in range(count):
        atoms = cu_fcc(natoms, seed=k)
        initialise_velocities(atoms, temperature, seed=k)
        out.append(atoms)
    return out


# ------------------------------------------------------------------------------------------------ throughput
def throughput_calls(model: torch.nn.Module, count: int, natoms: int, cfg: BatchBenchConfig) -> dict[str, Callable]:
    """One zero-argument call per method, each doing ``cfg.steps_per_call`` steps of all ``count`` structures."""
    from ase.md.verlet import VelocityVerlet
    from torch_sim.integrators import nve

    from ..calculator import TDNCalculator
    from ..integrations.torchsim import TDNTorchSimModel, state_from_atoms

    k = cfg.steps_per_call
    ts_model = TDNTorchSimModel(model, compute_stress=False)
    dt = torch.tensor(units.fs, dtype=ts_model.dtype, device=ts_model.device)
    init, update = nve(ts_model, dt=dt, kT=torch.tensor(300 * units.kB, dtype=ts_model.dtype, device=ts_model.device))
    moving = structures(count, natoms)
    start = state_from_atoms(moving, ts_model)
    start.momenta = torch.as_tensor(np.concatenate([a.get_momenta() for a in moving]), dtype=ts_model.dtype,
                                    device=ts_model.device)  # fmt: skip
    holder = {"state": init(start)}

    def torch_sim_steps() -> None:
        for _ in range(k):
            holder["state"] = update(holder["state"])

    loop = []
    for atoms in structures(count, natoms):
        atoms.calc = TDNCalculator(model, device=cfg.device, default_dtype=cfg.dtype)
        loop.append(VelocityVerlet(atoms, timestep=units.fs))
    rng = np.random.default_rng(0)

    def calculator_loop() -> None:
        for _ in range(k):
            for dyn in loop:
                dyn.run(1)  # one force call per step (the start's forces are kept from the step before)

    batch = structures(count, natoms)
    calc = TDNCalculator(model, device=cfg.device, default_dtype=cfg.dtype)

    def calculate_batch() -> None:
        for _ in range(k):
            for atoms in batch:
                atoms.positions += rng.normal(scale=1e-3, size=atoms.positions.shape)
            calc.calculate_batch(batch, batch_size=count)

    return {"torch-sim NVE": torch_sim_steps, "calculator loop": calculator_loop, "calculate_batch": calculate_batch}


def bench_throughput(cfg: BatchBenchConfig, on_row: Callable[[dict], None]) -> None:
    model = bench_model(cfg.preset, cfg.backend, cfg.dtype, cfg.device)
    for count in cfg.systems:
        for natoms in cfg.sizes:
            base = {"systems": count, "atoms_per_system": natoms, "atoms": count * natoms}
            if count * natoms > cfg.max_atoms:
                for method in METHODS:
                    on_row({**base, "method": method, "err": f"skipped: above {cfg.max_atoms} atoms in all"})
                continue
            calls, err = common.attempt(lambda c=count, n=natoms: throughput_calls(model, c, n, cfg), cfg.device)
            if err is None:
                timings, err = common.attempt(lambda c=calls: timed(c, cfg), cfg.device)
            for method in METHODS:
                row = {**base, "method": method}
                if err is not None:
                    row["err"] = err
                else:
                    row.update(throughput(timings[method], count, cfg.device))
                on_row(row)
            del calls
            common.free_memory(cfg.device)


def timed(calls: dict[str, Callable], cfg: BatchBenchConfig) -> dict[str, dict[str, float]]:
    return common.time_interleaved(calls, cfg.device, cfg.warmup, cfg.reps, cfg.steps_per_call, cfg.max_seconds)


def throughput(timing: dict[str, float], count: int, device: str) -> dict[str, float]:
    """A row's figures from :func:`tdn.bench.common.time_interleaved`: wall ms per step and structure-steps per wall
    second; on a CPU also per process CPU second (``cpu_*``), and ``structure_steps_per_s`` is the one the table
    reads (CPU time on a CPU, wall clock on an accelerator)."""
    row = {"step_ms": timing["step_ms"], "wall_structure_steps_per_s": count / timing["step_ms"] * 1e3,
           "reps": timing["reps"]}  # fmt: skip
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        row.update(cpu_step_ms=timing["cpu_ms"], cpu_structure_steps_per_s=count / timing["cpu_ms"] * 1e3)
    row["structure_steps_per_s"] = row["cpu_structure_steps_per_s" if on_cpu else "wall_structure_steps_per_s"]
    return row


# ------------------------------------------------------------------------------------------------ run + report
def run(cfg: BatchBenchConfig, out_dir: str | Path) -> dict[str, Any]:
    """Throughput rows; ``NAME.json`` after every row, the markdown and PNG at the end."""
    meta = common.run_metadata(cfg.device, packages=("ase", "torch-sim-atomistic", "vesin"))
    meta["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    out_dir = Path(out_dir)
    result: dict[str, Any] = {"meta": meta, "config": asdict(cfg), "rows": [], "notes": cfg.notes}

    def record(key: str) -> Callable[[dict], None]:
        def add(row: dict) -> None:
            result[key].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "reps"}), flush=True)
            common.write_json(out_dir / f"{cfg.name}.json", result)

        return add

    bench_throughput(cfg, record("rows"))
    write_results(result, out_dir, cfg.name)
    return result


def write_results(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    return common.write_report(result, out_dir, name, markdown_report, plot)


def _value(row: dict[str, Any] | None, key: str) -> str:
    if row is None:
        return "—"
    if row.get("err"):
        return "skip" if row["err"].startswith("skipped") else "err"
    value = row.get(key)
    return "—" if value is None else (f"{value:.3g}" if value < 1000 else f"{value:.0f}")


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None


def markdown_report(result: dict[str, Any]) -> str:
    meta, cfg = result["meta"], result["config"]
    git = meta["git"]
    on_cpu = torch.device(cfg["device"]).type == "cpu"
    clock = ("throughput per process CPU second (one thread; the wall clock of a shared machine measures its load)"
             if on_cpu else "throughput per wall-clock second")  # fmt: skip
    table = {(r["systems"], r["atoms_per_system"], r["method"]): r for r in result["rows"]}
    lines = [
        "# Batched evaluation: tdn through torch-sim against a loop of TDNCalculator calls (Cu fcc)",
        "",
        f"- machine: {common.machine_line(meta)}; OMP_NUM_THREADS={meta.get('omp_num_threads')}",
        f"- date: {meta['date']}; commit {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- throughput model: preset {cfg['preset']}, backend {cfg['backend']}, {cfg['dtype']}; the methods called in "
        f"turn, median of up to {cfg['reps']} rounds of {cfg['steps_per_call']} step(s) after {cfg['warmup']} warm-up "
        f"round(s); {clock}",
        "- `torch-sim NVE`: one torch-sim NVE step of all S systems (skin neighbour lists, ONE model call); "
        "`calculator loop`: per structure one ASE velocity-Verlet step (1 fs, the same start) with its own "
        "TDNCalculator (skin list), S model calls; `calculate_batch`: per structure a ~1e-3 Å move, then "
        "TDNCalculator.calculate_batch (one graph, one call)",
        "",
        "## Throughput: structure-steps per second (higher is better)",
        "",
    ]
    header = ["systems S", "atoms each", "atoms in all", *METHODS, "torch-sim / loop"]
    if on_cpu:
        header.append("torch-sim / loop, wall clock")
    body = []
    for count in cfg["systems"]:
        for natoms in cfg["sizes"]:
            cells = [table.get((count, natoms, m)) for m in METHODS]
            ratios = [_ratio(cells[0], cells[1], key) for key in
                      ("structure_steps_per_s", "wall_structure_steps_per_s")[:1 + on_cpu]]  # fmt: skip
            body.append([count, natoms, count * natoms, *[_value(c, "structure_steps_per_s") for c in cells],
                         *[common.fmt_ratio(r) for r in ratios]])  # fmt: skip
    lines.append(common.markdown_table(header, body))
    errors = [f"{r['method']} S={r['systems']} n={r['atoms_per_system']}: {r['err']}" for r in result["rows"]
              if r.get("err")]  # fmt: skip
    notes = list(result.get("notes", [])) + errors
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    cfg = result["config"]
    table = {(r["systems"], r["atoms_per_system"], r["method"]): r for r in result["rows"]}
    panels = {}
    for natoms in cfg["sizes"]:
        panels[f"{natoms} atoms per system"] = {
            m: [table.get((s, natoms, m), {}).get("structure_steps_per_s") for s in cfg["systems"]] for m in METHODS
        }
    title = f"structure-steps/s vs systems per batch — {common.machine_line(result['meta'])}, {result['meta']['date']}"
    return common.line_plot(path, [str(s) for s in cfg["systems"]], panels, ylabel="structure-steps / s", title=title)


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_batch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory for NAME.json / .md / .png")
    p.add_argument("--name", default=None, help="file name stem (default: batch_cpu[_quick])")
    p.add_argument("--quick", action="store_true", help="smoke run (< 1 min): 1 and 8 systems of 32 and 108 atoms")
    p.add_argument("--large", action="store_true", help=f"also {LARGE_SYSTEMS} systems per batch")
    p.add_argument("--systems", type=int, nargs="+", help=f"systems per batch (default {list(FULL_SYSTEMS)})")
    p.add_argument("--sizes", type=int, nargs="+", help=f"atoms per system, 4 n^3 (default {list(FULL_SIZES)})")
    p.add_argument("--preset", default="tiny", help="throughput model widths (a tdn.models.PRESETS name)")
    p.add_argument("--backend", default="cp:shared", help="tensor-product backend, a weight mode after a colon")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu", help="torch device of the models (cpu, cuda)")
    p.add_argument("--max-atoms", type=int, help="skip batches with more atoms in all (default 40000)")
    p.add_argument("--reps", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; --quick uses 1)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BatchBenchConfig:
    cfg = BatchBenchConfig(preset=args.preset, backend=args.backend, dtype=args.dtype, device=args.device,
                           quick=args.quick)  # fmt: skip
    cfg.systems = tuple(args.systems or (QUICK_SYSTEMS if args.quick else FULL_SYSTEMS))
    if args.large and LARGE_SYSTEMS not in cfg.systems:
        cfg.systems += (LARGE_SYSTEMS,)
    cfg.sizes = tuple(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    if args.quick:
        cfg.reps, cfg.max_seconds = 2, 2.0
    if args.reps is not None:
        cfg.reps = args.reps
    if args.max_atoms is not None:
        cfg.max_atoms = args.max_atoms
    for natoms in cfg.sizes:
        cu_fcc(natoms)  # fail early on a size that is not 4 n^3
    cfg.name = args.name or f"batch_{torch.device(args.device).type}{'_quick' if args.quick else ''}"
    return cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.cli_main(argv, parse_args, config_from_args, run)
