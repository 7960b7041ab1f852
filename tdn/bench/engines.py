"""MD engine benchmark: milliseconds per MD step of torch-sim's integrators running a tdn model
(:class:`tdn.integrations.torchsim.TDNTorchSimModel`) against :class:`tdn.dynamics.TorchDynamics`, with the same
model object, the same system (a rattled Cu fcc cubic supercell with Maxwell-Boltzmann momenta at 300 K) and the
same device, for each number of atoms, model dtype and ensemble:

* ``nve``: torch-sim's ``nve`` (velocity Verlet) against TorchDynamics' velocity Verlet;
* ``nvt-langevin``: torch-sim's ``nvt_langevin`` (BAOAB) against TorchDynamics' Langevin (ASE's propagator),
  friction 0.01 / fs, 300 K.

What each engine does per step, as shipped: torch-sim calls the model once per step and the model builds every
system's neighbour list within the cutoff at every call (validation, vesin, graph); TorchDynamics keeps a skin list
(``cutoff + skin``, all candidate pairs go to the model) and looks at the displacements every few steps. Both states
are float64 whatever the model's dtype (torch-sim's through ``TDNTorchSimModel(state_dtype="float64")``, as
``tdn-md --engine torch`` runs it).

Timing: the two engines are called in turn, ``rounds`` times after ``warmup`` rounds (so that load from other jobs on
a shared machine hits both alike); one call is ``steps`` MD steps. Median and minimum wall-clock ms per step, and the
median process CPU time per step (on a CPU: far less disturbed by other jobs' load). The ratio torch-sim /
TorchDynamics > 1 means torch-sim is slower. The load average of the machine is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from ase import Atoms, units

from . import common
from .md import bench_model, cu_fcc

FULL_SIZES = (108, 500)
QUICK_SIZES = (32,)
DTYPES = ("float32", "float64")
ENSEMBLES = ("nve", "nvt-langevin")
ENGINES = ("torch-sim", "TorchDynamics")
WITHIN = 1.10  # the project's rule: retire TorchDynamics if torch-sim takes at most this much of its time


@dataclass
class EngineBenchConfig:
    sizes: tuple[int, ...] = FULL_SIZES
    dtypes: tuple[str, ...] = DTYPES
    ensembles: tuple[str, ...] = ENSEMBLES
    preset: str = "tiny"
    backend: str = "cp:shared"  # a backend, a weight mode after a colon (the fast MD step)
    device: str = "cpu"
    steps: int = 10  # MD steps per timed call
    rounds: int = 7  # timed rounds (each engine called once per round)
    warmup: int = 1
    skin: float = 0.5  # Å, TorchDynamics' (tdn's default)
    friction: float = 0.01  # 1/fs, tdn-md's default
    temperature: float = 300.0  # K
    quick: bool = False
    name: str = "engines_cpu"
    notes: list[str] = field(default_factory=list)


def system(natoms: int, temperature: float) -> Atoms:
    from ..md import initialise_velocities

    atoms = cu_fcc(natoms)
    initialise_velocities(atoms, temperature, seed=0)
    return atoms


# ------------------------------------------------------------------------------------------------ engines
def torch_sim_engine(model: torch.nn.Module, atoms: Atoms, ensemble: str, cfg: EngineBenchConfig) -> Callable:
    """``cfg.steps`` steps of torch-sim's integrator per call (the state carried from call to call)."""
    from torch_sim.integrators import nve, nvt_langevin

    from ..integrations.torchsim import TDNTorchSimModel, state_from_atoms

    ts_model = TDNTorchSimModel(model, compute_stress=False, state_dtype="float64")  # as tdn-md --engine torch
    scalar = lambda v: torch.tensor(v, dtype=ts_model.dtype, device=ts_model.device)  # noqa: E731
    dt, kT = scalar(units.fs), scalar(cfg.temperature * units.kB)
    if ensemble == "nve":
        init, update = nve(ts_model, dt=dt, kT=kT)
    else:
        init, update = nvt_langevin(ts_model, dt=dt, kT=kT, gamma=scalar(cfg.friction / units.fs))
    start = state_from_atoms(atoms, ts_model)
    start.momenta = torch.as_tensor(atoms.get_momenta(), dtype=ts_model.dtype, device=ts_model.device)
    holder = {"state": init(start)}

    def steps() -> None:
        for _ in range(cfg.steps):
            holder["state"] = update(holder["state"])

    return steps


def torch_dynamics_engine(model: torch.nn.Module, atoms: Atoms, ensemble: str, cfg: EngineBenchConfig):
    """``cfg.steps`` steps of TorchDynamics per call, and the engine (for its edge count)."""
    from ..dynamics import TorchDynamics

    dyn = TorchDynamics(model, atoms.copy(), timestep=1.0, ensemble=ensemble, temperature_K=cfg.temperature,
                        friction=cfg.friction, skin=cfg.skin)  # fmt: skip
    return (lambda: dyn.run(cfg.steps)), dyn


def edges_within(atoms: Atoms, cutoff: float) -> int:
    from ..data.neighbors import neighbor_list

    return len(neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)[0])


# ------------------------------------------------------------------------------------------------ measurement
def compare(model: torch.nn.Module, atoms: Atoms, ensemble: str, cfg: EngineBenchConfig) -> dict[str, dict]:
    """Both engines on one system: per engine its timings (or ``err``) and edge count."""
    cutoff = float(model.config.cutoff)
    edges = {"torch-sim": edges_within(atoms, cutoff)}
    try:
        dyn_call, dyn = torch_dynamics_engine(model, atoms, ensemble, cfg)
        calls = {"torch-sim": torch_sim_engine(model, atoms, ensemble, cfg), "TorchDynamics": dyn_call}
        edges["TorchDynamics"] = dyn.num_edges
        timings = common.time_interleaved(calls, cfg.device, cfg.warmup, cfg.rounds, cfg.steps)
    except Exception as err:  # noqa: BLE001 - a failure is a row of the report, not the end of the run
        return {engine: {"edges": edges.get(engine), "err": common.describe_error(err)} for engine in ENGINES}
    return {engine: {"edges": edges[engine], **timings[engine]} for engine in ENGINES}


def measure(cfg: EngineBenchConfig, on_row: Callable[[dict], None]) -> None:
    for natoms in cfg.sizes:
        atoms = system(natoms, cfg.temperature)
        for dtype in cfg.dtypes:
            model = bench_model(cfg.preset, cfg.backend, dtype, cfg.device)
            for ensemble in cfg.ensembles:
                for engine, values in compare(model, atoms, ensemble, cfg).items():
                    on_row({"atoms": natoms, "dtype": dtype, "ensemble": ensemble, "engine": engine, **values})
                common.free_memory(cfg.device)


def run(cfg: EngineBenchConfig, out_dir: str | Path) -> dict[str, Any]:
    """The engines' rows; ``NAME.json`` after every row, the markdown and PNG at the end."""
    meta = common.run_metadata(cfg.device, packages=("ase", "torch-sim-atomistic", "vesin"))
    meta["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    meta["load_average_start"] = list(os.getloadavg())
    out_dir = Path(out_dir)
    result: dict[str, Any] = {"meta": meta, "config": asdict(cfg), "rows": [], "notes": cfg.notes}

    def record(row: dict) -> None:
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "reps"}), flush=True)
        common.write_json(out_dir / f"{cfg.name}.json", result)

    measure(cfg, record)
    meta["load_average_end"] = list(os.getloadavg())
    write_results(result, out_dir, cfg.name)
    return result


# ------------------------------------------------------------------------------------------------ report
def write_results(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    return common.write_report(result, out_dir, name, markdown_report, plot)


def ratios(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (atoms, dtype, ensemble): torch-sim / TorchDynamics of the median wall, minimum wall and median CPU ms."""
    table = {(r["atoms"], r["dtype"], r["ensemble"], r["engine"]): r for r in result["rows"]}
    out = []
    for natoms, dtype, ensemble, engine in table:
        if engine != "torch-sim":
            continue
        ours, theirs = table[(natoms, dtype, ensemble, "torch-sim")], table.get((natoms, dtype, ensemble, ENGINES[1]))
        if theirs is None or "step_ms" not in ours or "step_ms" not in theirs:
            continue
        out.append({"atoms": natoms, "dtype": dtype, "ensemble": ensemble,
                    **{key: ours[key] / theirs[key] for key in ("step_ms", "min_ms", "cpu_ms")}})  # fmt: skip
    return out


def _ms(row: dict[str, Any] | None, key: str) -> str:
    if row is None or row.get("err"):
        return "err" if row else "—"
    return common.fmt_ms(row[key])


def markdown_report(result: dict[str, Any]) -> str:
    meta, cfg = result["meta"], result["config"]
    git = meta["git"]
    table = {(r["atoms"], r["dtype"], r["ensemble"], r["engine"]): r for r in result["rows"]}
    load = [meta.get("load_average_start"), meta.get("load_average_end")]
    lines = [
        "# One MD step: torch-sim against tdn.dynamics.TorchDynamics (same tdn model, system and device)",
        "",
        f"- machine: {common.machine_line(meta)}; OMP_NUM_THREADS={meta.get('omp_num_threads')}; load average "
        f"(1, 5, 15 min) at the start {_load(load[0])}, at the end {_load(load[1])}",
        f"- date: {meta['date']}; commit {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- model: preset {cfg['preset']}, backend {cfg['backend']}; rattled Cu fcc, {cfg['temperature']:g} K; "
        f"Langevin friction {cfg['friction']:g} / fs; TorchDynamics skin {cfg['skin']:g} Å",
        f"- ms per MD step: median (min) wall clock and median process CPU time of {cfg['rounds']} calls of "
        f"{cfg['steps']} steps after {cfg['warmup']} warm-up round(s), the engines called in turn",
        "- torch-sim rebuilds the neighbour list (within the cutoff) at every step; TorchDynamics keeps a skin list "
        "(all pairs within cutoff + skin go to the model) and checks it every few steps",
        "",
        "## ms per step",
        "",
    ]
    body = []
    for natoms in cfg["sizes"]:
        for dtype in cfg["dtypes"]:
            for ensemble in cfg["ensembles"]:
                for engine in ENGINES:
                    row = table.get((natoms, dtype, ensemble, engine))
                    body.append([natoms, dtype, ensemble, engine, (row or {}).get("edges", "—"),
                                 f"{_ms(row, 'step_ms')} ({_ms(row, 'min_ms')})", _ms(row, "cpu_ms")])  # fmt: skip
    lines.append(common.markdown_table(["atoms", "dtype", "ensemble", "engine", "edges", "wall: median (min)",
                                        "CPU: median"], body))  # fmt: skip
    lines += ["", f"## torch-sim / TorchDynamics (> 1: torch-sim slower; the rule: within {WITHIN:.2f})", ""]
    rows = [[r["atoms"], r["dtype"], r["ensemble"], common.fmt_ratio(r["step_ms"]), common.fmt_ratio(r["min_ms"]),
             common.fmt_ratio(r["cpu_ms"]), "yes" if r["cpu_ms"] <= WITHIN else "no"] for r in ratios(result)]
    lines.append(common.markdown_table(["atoms", "dtype", "ensemble", "wall medians", "wall minima", "CPU medians",
                                        f"within {WITHIN:.2f} (CPU)"], rows))  # fmt: skip
    errors = [f"{r['engine']} {r['atoms']} atoms {r['dtype']} {r['ensemble']}: {r['err']}"
              for r in result["rows"] if r.get("err")]  # fmt: skip
    notes = list(result.get("notes", [])) + errors
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _load(values: Sequence[float] | None) -> str:
    return "—" if not values else ", ".join(f"{v:.2f}" for v in values)


def plot(result: dict[str, Any], path: Path) -> Path:
    cfg = result["config"]
    table = {(r["atoms"], r["dtype"], r["ensemble"], r["engine"]): r for r in result["rows"]}
    labels = [(n, d) for n in cfg["sizes"] for d in cfg["dtypes"]]
    panels = {f"{ensemble}: CPU ms per MD step": {
        engine: [table.get((n, d, ensemble, engine), {}).get("cpu_ms") for n, d in labels] for engine in ENGINES}
        for ensemble in cfg["ensembles"]}  # fmt: skip
    title = f"torch-sim vs TorchDynamics — {common.machine_line(result['meta'])}, {result['meta']['date']}"
    return common.line_plot(path, [f"{n} {d}" for n, d in labels], panels, ylabel="ms per step", title=title)


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_engines.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory for NAME.json / .md / .png")
    p.add_argument("--name", default=None, help="file name stem (default: engines_<device>[_quick])")
    p.add_argument("--quick", action="store_true", help=f"smoke run (< 1 min): {list(QUICK_SIZES)} atoms, 2 rounds")
    p.add_argument("--sizes", type=int, nargs="+", help=f"atoms, 4 n^3 (default {list(FULL_SIZES)})")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--ensembles", nargs="+", choices=ENSEMBLES, default=list(ENSEMBLES))
    p.add_argument("--preset", default="tiny", help="model widths (a tdn.models.PRESETS name)")
    p.add_argument("--backend", default="cp:shared", help="tensor-product backend, a weight mode after a colon")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--steps", type=int, help="MD steps per timed call (default 10)")
    p.add_argument("--rounds", type=int, help="timed rounds (default 7)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; --quick uses 1)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> EngineBenchConfig:
    cfg = EngineBenchConfig(sizes=tuple(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)),
                            dtypes=tuple(args.dtypes), ensembles=tuple(args.ensembles), preset=args.preset,
                            backend=args.backend, device=args.device, quick=args.quick)  # fmt: skip
    if args.quick:
        cfg.steps, cfg.rounds = 3, 2
    cfg.steps = args.steps or cfg.steps
    cfg.rounds = args.rounds or cfg.rounds
    for natoms in cfg.sizes:
        cu_fcc(natoms)  # fail early on a size that is not 4 n^3
    cfg.name = args.name or f"engines_{torch.device(args.device).type}{'_quick' if args.quick else ''}"
    return cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.cli_main(argv, parse_args, config_from_args, run)
