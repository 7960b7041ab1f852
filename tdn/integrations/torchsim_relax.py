"""``tdn-relax``: batched structure relaxation with torch-sim's FIRE, every structure of a file at once.

    tdn-relax structures.xyz --model model.pt --fmax 0.05 --max-steps 500 -o relaxed

Fully periodic structures relax their atoms and cell together (FIRE with torch-sim's Fréchet cell filter, the
counterpart of ASE's ``FrechetCellFilter``; ``--cell-filter unit`` its unit-cell filter, ``none`` atoms only);
molecules, slabs and wires relax their atoms only (plain FIRE). Each kind is one torch-sim batch: one model call per
FIRE step for all its structures (:class:`tdn.integrations.torchsim.TDNTorchSimModel`).

Convergence, per structure, as ASE's: the largest atomic force, and with a cell filter the largest row of torch-sim's
cell forces (the virial divided by the number of atoms, ASE's ``exp_cell_factor``), below ``--fmax`` eV/Å. A structure
is taken out of the batch at the step it converges (its geometry then is its result); one that has not converged
after ``--max-steps`` FIRE steps is written as it is then and marked ``converged=False``.

Writes ``OUTPUT_DIR/relaxed.extxyz`` (one frame per input structure, in order, with energy, forces, stress where
periodic, and ``relax_steps``, ``relax_converged``, ``relax_fmax`` in its info) and ``OUTPUT_DIR/summary.md`` (the
table that is printed). Input mistakes exit with code 2 and one message (``--debug``: the traceback), as ``tdn-md``.
"""

from __future__ import annotations

import argparse
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.stress import full_3x3_to_voigt_6_stress

from ..md_checks import UsageError, check_number, run_command
from .torchsim import TDNTorchSimModel, state_from_atoms

CELL_FILTERS = ("frechet", "unit", "none")
OUTPUT_NAMES = ("relaxed.extxyz", "summary.md")


@dataclass
class RelaxResult:
    """One structure's relaxation: energies in eV, forces in eV/Å (fmax includes the cell forces), volumes in Å^3
    (None without a periodic cell)."""

    name: str
    formula: str
    natoms: int
    steps: int
    converged: bool
    energy_start: float
    energy: float
    fmax_start: float
    fmax: float
    volume_start: float | None
    volume: float | None


def relax_structures(
    structures: Sequence[Atoms],
    model: TDNTorchSimModel,
    *,
    fmax: float = 0.05,
    max_steps: int = 500,
    cell_filter: str = "frechet",
    pressure: float = 0.0,
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> tuple[list[Atoms], list[RelaxResult]]:
    """Relax every structure (see the module docstring); ``pressure`` in GPa (cell filters only). Returns the relaxed
    structures (new Atoms with a SinglePointCalculator: energy, forces, stress where periodic) and one
    :class:`RelaxResult` each, in input order. Sets ``model.compute_stress`` as each batch needs it."""
    if cell_filter not in CELL_FILTERS:
        raise ValueError(f"cell_filter must be one of {CELL_FILTERS}, got {cell_filter!r}")
    if not fmax > 0 or max_steps < 0:
        raise ValueError(f"fmax must be > 0 and max_steps >= 0, got {fmax} and {max_steps}")
    names = [f"{k:03d}" for k in range(len(structures))] if names is None else list(names)
    relaxed: list[Atoms | None] = [None] * len(structures)
    results: list[RelaxResult | None] = [None] * len(structures)
    periodic = [k for k, a in enumerate(structures) if a.pbc.all()]
    other = [k for k, a in enumerate(structures) if not a.pbc.all()]
    for group, with_cell in ((periodic, cell_filter != "none"), (other, False)):
        if group:
            out = _relax_group([structures[k] for k in group], model, fmax, max_steps,
                               cell_filter if with_cell else "none", pressure, progress)  # fmt: skip
            for k, (atoms, row) in zip(group, out):
                start = structures[k]
                relaxed[k] = atoms
                results[k] = RelaxResult(names[k], start.get_chemical_formula(), len(start), row["steps"],
                                         row["converged"], row["energy_start"], row["energy"], row["fmax_start"],
                                         row["fmax"], _volume(start), _volume(atoms))  # fmt: skip
    return relaxed, results  # type: ignore[return-value]


def _volume(atoms: Atoms) -> float | None:
    return float(atoms.get_volume()) if atoms.pbc.all() else None


def _optimizer(model: TDNTorchSimModel, cell_filter: str, pressure: float) -> tuple[Any, Any]:
    from torch_sim.optimizers import fire, frechet_cell_fire, unit_cell_fire

    if cell_filter == "none":
        return fire(model)
    make = frechet_cell_fire if cell_filter == "frechet" else unit_cell_fire
    return make(model, scalar_pressure=pressure * units.GPa)  # torch-sim adds it to the stress: eV/Å^3


def _relax_group(structures: list[Atoms], model: TDNTorchSimModel, fmax: float, max_steps: int, cell_filter: str,
                 pressure: float, progress: bool) -> list[tuple[Atoms, dict[str, Any]]]:  # fmt: skip
    """One batch: FIRE steps until every structure has converged (each leaves the batch then) or ``max_steps``."""
    model.compute_stress = cell_filter != "none"
    init, update = _optimizer(model, cell_filter, pressure)
    first = state_from_atoms(structures, model)
    pbc_rows = first.pbc if torch.is_tensor(first.pbc) else None  # per structure: restored after slicing
    state = init(first)
    active = list(range(len(structures)))  # input position of every structure still in the batch
    done: dict[int, tuple[Atoms, dict[str, Any]]] = {}
    start: dict[int, tuple[float, float]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(structures), unit="structure", desc=f"tdn-relax {cell_filter}", mininterval=0.5)
    for step in range(max_steps + 1):
        energies, largest = _energy_and_fmax(state)
        for b, k in enumerate(active):
            start.setdefault(k, (energies[b], largest[b]))
        finished = [b for b in range(len(active)) if largest[b] < fmax or step == max_steps]
        if finished:
            snapshots = _snapshots(state, [structures[active[b]] for b in finished], finished)
            for b, atoms in zip(finished, snapshots):
                k = active[b]
                done[k] = (atoms, {"steps": step, "converged": largest[b] < fmax, "energy_start": start[k][0],
                                   "energy": energies[b], "fmax_start": start[k][1], "fmax": largest[b]})  # fmt: skip
            if bar is not None:
                bar.update(len(finished))
            keep = [b for b in range(len(active)) if b not in set(finished)]
            if not keep:
                break
            state = state[keep]
            active = [active[b] for b in keep]
            if pbc_rows is not None:
                state.pbc = pbc_rows[active]
        state = update(state)
    if bar is not None:
        bar.close()
    return [done[k] for k in range(len(structures))]


def _energy_and_fmax(state: Any) -> tuple[list[float], list[float]]:
    """Energy and the largest force (atoms, and cell forces where the state has them) of every structure, one
    host read."""
    with torch.no_grad():
        norms = torch.linalg.vector_norm(state.forces, dim=1)  # [N]
        largest = norms.new_zeros(state.energy.shape[0]).scatter_reduce(0, state.system_idx, norms, "amax")  # [S]
        cell_forces = getattr(state, "cell_forces", None)
        if cell_forces is not None:
            largest = torch.maximum(largest, torch.linalg.vector_norm(cell_forces, dim=2).amax(dim=1))
        values = torch.stack([state.energy.detach(), largest]).double().cpu()
    return values[0].tolist(), values[1].tolist()


def _snapshots(state: Any, originals: list[Atoms], rows: list[int]) -> list[Atoms]:
    """The structures ``rows`` of the batch as new Atoms (one host copy of the state)."""
    with torch.no_grad():
        positions = state.positions.detach().double().cpu().numpy()
        forces = state.forces.detach().double().cpu().numpy()
        cells = state.cell.detach().double().cpu().numpy().transpose(0, 2, 1)  # torch-sim: cell vectors as columns
        energy = state.energy.detach().double().cpu().numpy()
        stress = getattr(state, "stress", None)
        stress = stress.detach().double().cpu().numpy() if stress is not None else None
        index = state.system_idx.cpu().numpy()
    out = []
    for atoms, b in zip(originals, rows):
        mask = index == b
        relaxed = atoms.copy()
        relaxed.calc = None
        if atoms.pbc.all():
            relaxed.set_cell(cells[b], scale_atoms=False)
        relaxed.set_positions(positions[mask])
        results = {"energy": float(energy[b]), "free_energy": float(energy[b]), "forces": forces[mask]}
        if stress is not None and atoms.pbc.all():
            results["stress"] = full_3x3_to_voigt_6_stress(stress[b])
        relaxed.calc = SinglePointCalculator(relaxed, **results)
        out.append(relaxed)
    return out


# ------------------------------------------------------------------------------------------------ report
def summary_table(results: Sequence[RelaxResult], fmax: float) -> str:
    """The markdown table of a relaxation (printed and written to summary.md)."""
    def volume(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    rows = [
        [r.name, r.formula, r.natoms, r.steps, "yes" if r.converged else "NO", f"{r.fmax_start:.3g}", f"{r.fmax:.3g}",
         f"{r.energy_start:.4f}", f"{r.energy:.4f}", f"{(r.energy - r.energy_start) / r.natoms * 1e3:.2f}",
         volume(r.volume_start), volume(r.volume)]  # fmt: skip
        for r in results
    ]
    header = ["structure", "formula", "atoms", "FIRE steps", f"fmax < {fmax:g}", "fmax start [eV/Å]",
              "fmax end [eV/Å]", "E start [eV]", "E end [eV]", "ΔE [meV/atom]", "V start [Å³]",
              "V end [Å³]"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tdn-relax",
        description="Relax every structure of a file at once with torch-sim's FIRE and a tdn model. Writes "
        "OUTPUT_DIR/relaxed.extxyz (one frame per input structure) and OUTPUT_DIR/summary.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("structures", help="input structures, any format ase.io.read knows (every frame is relaxed)")
    p.add_argument("--model", required=True, help="model file written by tdn.save_model / tdn-train's export")
    p.add_argument("--index", default=None, help="frames to relax: one, or a slice such as 0:8 (default: all)")
    p.add_argument("-o", "--output-dir", default="relax_out", help="directory for relaxed.extxyz and summary.md")
    p.add_argument("--fmax", type=float, default=0.05, help="convergence: largest force (and cell force) in eV/Å")
    p.add_argument("--max-steps", type=int, default=500, help="FIRE steps at most")
    p.add_argument("--cell-filter", choices=CELL_FILTERS, default="frechet",
                   help="periodic structures: frechet (ASE's FrechetCellFilter counterpart), unit, or none (atoms "
                   "only); molecules and slabs always relax their atoms only")  # fmt: skip
    p.add_argument("--pressure", type=float, default=0.0, help="external pressure in GPa (cell filters)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="model precision")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in OUTPUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``tdn-relax``: 0 when done (structures that did not converge are warned about), 2 for a mistake in the
    input, 1 for another error."""
    args = build_parser().parse_args(argv)
    return run_command("tdn-relax", lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    from ..md_torchsim import read_structures, rename_structures
    from .batch import check_structures

    check_number("--fmax", args.fmax, low=0, strict=True, unit=" eV/Å")
    check_number("--max-steps", args.max_steps, low=0)
    check_number("--pressure", args.pressure)
    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise UsageError(f"output directory {out} is a file or not empty: choose another -o, or pass --overwrite "
                         f"to replace {', '.join(OUTPUT_NAMES)}")  # fmt: skip
    structures, frames = read_structures(args.structures, args.index)
    names = [f"{f:03d}" for f in frames]
    path = Path(args.model)
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise UsageError(f"--model {path}: not a tdn model file; give one written by tdn.save_model or tdn-train")
    try:
        model = TDNTorchSimModel(path, device=args.device, dtype=args.dtype)
    except Exception as err:  # noqa: BLE001 - whatever the loader found wrong, the file is the problem
        raise UsageError(f"--model {path} cannot be loaded as a tdn model: {err}") from None
    try:
        check_structures(structures, model.elements)
        model(state_from_atoms(structures, model))  # the first evaluation: atoms on top of each other, ...
    except (ValueError, KeyError) as err:
        raise UsageError(f"{args.structures}: {rename_structures(str(err), names)}") from None
    start = time.perf_counter()
    relaxed, results = relax_structures(structures, model, fmax=args.fmax, max_steps=args.max_steps,
                                        cell_filter=args.cell_filter, pressure=args.pressure, names=names,
                                        progress=not args.no_progress)  # fmt: skip
    wall = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    for atoms, result in zip(relaxed, results):
        atoms.info.update(relax_steps=result.steps, relax_converged=result.converged, relax_fmax=result.fmax)
    write(out / "relaxed.extxyz", relaxed, format="extxyz")
    table = summary_table(results, args.fmax)
    steps = sum(r.steps for r in results)
    head = (f"tdn-relax: {len(results)} structures, {steps} structure-steps of FIRE ({args.cell_filter} cell filter "
            f"for periodic ones) in {wall:.1f} s; fmax < {args.fmax:g} eV/Å")  # fmt: skip
    (out / "summary.md").write_text(f"# Relaxation of {args.structures}\n\n- {head}\n- model {path}, {args.dtype}, "
                                    f"{args.device}\n\n{table}\n")  # fmt: skip
    print(head)
    print(table)
    print(f"tdn-relax: wrote {out / 'relaxed.extxyz'} and {out / 'summary.md'}")
    missed = [r.name for r in results if not r.converged]
    if missed:
        print(f"tdn-relax: warning: {len(missed)} structures did not reach fmax < {args.fmax:g} eV/Å in "
              f"{args.max_steps} steps: {', '.join(missed[:10])}{' ...' if len(missed) > 10 else ''}",
              file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
