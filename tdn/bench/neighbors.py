"""Neighbour-list benchmark: milliseconds per build against the number of atoms (Cu fcc, 5 Å cutoff), and
exact agreement with ASE's ``neighbor_list`` on periodic, skewed, small (cell shorter than the cutoff), slab and
molecular systems.

Implementations (float64 positions, each returning every pair in both directions with integer shifts ``S``,
``vector = pos[j] - pos[i] + S @ cell``; the tensor ones on ``--device``, ``tdn`` and ``vesin`` on the host):

* ``tdn``: :func:`tdn.data.neighbors.neighbor_list`, what every CPU path of the package runs (vesin, then one sort
  of an int64 key into the order sender, receiver, shift in numpy; inputs vesin cannot take are split first);
* ``tdn device path``: :func:`tdn.data.neighbors.neighbor_list_device` on CPU tensors, the code that runs on a GPU
  (vesin on the tensors, the key sorted by ``torch.sort``): vesin's CUDA cell list with ``--device cuda``;
* ``vesin``: ``vesin.NeighborList`` (``full_list=True``) on numpy arrays, raw (unsorted) output;
* ``vesin-torch``: ``vesin_torch.NeighborList`` on tensors, raw output;
* torch-sim's functions (``torch_sim.neighbors``): ``vesin_nl_ts`` (vesin's TorchScript class),
  ``torch_nl_linked_cell``, ``torch_nl_n2`` (all pairs) and ``standard_nl`` (a torch port of ASE's primitive
  list); they take one periodicity flag for all directions (or ``[S, 3]`` without partial periodicity) and wrapped
  positions, as their docstrings say.

Agreement: the SET of ``(i, j, S)`` triples equals ASE's exactly (positions wrapped into the cell first, as torch-sim
asks); an implementation that cannot take a system (partial periodicity) is reported as such, not as a mismatch.
Timing: median of repeated builds after a warm-up (:func:`tdn.bench.common.time_call`); an implementation whose build
took longer than ``skip_above_s`` is not timed at larger sizes.
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
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from . import common

FULL_SIZES = (108, 864, 4000, 10976, 32000, 108000)
QUICK_SIZES = (108, 864)
CUTOFF = 5.0  # Å, MACE-medium's
IMPLS = ("tdn", "tdn device path", "vesin", "vesin-torch", "torch-sim vesin_nl_ts",
         "torch-sim torch_nl_linked_cell", "torch-sim torch_nl_n2", "torch-sim standard_nl")  # fmt: skip
MAX_ATOMS = {"torch-sim torch_nl_n2": 500}  # all pairs: 9 s per build at 864 atoms (one thread)


@dataclass
class NeighborBenchConfig:
    sizes: tuple[int, ...] = FULL_SIZES
    impls: tuple[str, ...] = IMPLS
    cutoff: float = CUTOFF
    warmup: int = 1
    reps: int = 5
    max_seconds: float = 5.0  # stop repeating one cell after this long
    skip_above_s: float = 1.0  # a build slower than this: the implementation is not timed at larger sizes
    quick: bool = False
    device: str = "cpu"  # of the tensor implementations
    name: str = "neighbors_cpu"
    notes: list[str] = field(default_factory=list)


Triples = tuple[np.ndarray, np.ndarray, np.ndarray]  # sender [E], receiver [E], shifts [E, 3] int64


# ------------------------------------------------------------------------------------------------ systems
def cu_fcc(natoms: int, seed: int = 0) -> Atoms:
    """Rattled, wrapped cubic Cu fcc supercell of ``4 n^3`` atoms."""
    n = round((natoms / 4) ** (1 / 3))
    if 4 * n**3 != natoms:
        raise ValueError(f"Cu fcc cubic supercells have 4 n^3 atoms (108, 864, 4000, ...), got {natoms}")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((n, n, n))
    atoms.rattle(0.05, seed=seed)
    atoms.wrap()
    return atoms


def agreement_systems() -> dict[str, Atoms]:
    """The systems checked against ASE: periodic, skewed, small cells (shorter than the cutoff), a slab and a
    molecule. Periodic positions wrapped into the cell."""
    rng = np.random.default_rng(7)
    periodic = cu_fcc(108, seed=1)
    skewed = Atoms("Cu16", cell=[[6.0, 0.0, 0.0], [3.1, 5.2, 0.0], [1.7, -2.4, 6.3]], pbc=True,
                   scaled_positions=rng.random((16, 3)))  # fmt: skip
    small = bulk("Cu", "fcc", a=3.6)  # primitive cell, vectors 2.55 Å: many images within 5 Å
    small_skewed = Atoms("CuAl", cell=[[2.9, 0.0, 0.0], [1.4, 2.6, 0.0], [0.7, 0.9, 2.8]], pbc=True,
                         scaled_positions=[[0.1, 0.2, 0.3], [0.6, 0.5, 0.7]])  # fmt: skip
    slab = cu_fcc(108, seed=2)
    slab.center(vacuum=4.0, axis=2)
    slab.pbc = [True, True, False]
    mol = molecule("C6H6")
    mol.rattle(0.02, seed=3)
    out = {"periodic Cu108": periodic, "skewed triclinic 16": skewed, "small fcc primitive": small,
           "small skewed 2-atom": small_skewed, "slab (pbc TTF)": slab, "molecule C6H6": mol}  # fmt: skip
    for atoms in out.values():
        if atoms.pbc.any():
            atoms.wrap()
    return out


def ase_triples(atoms: Atoms, cutoff: float) -> Triples:
    i, j, shifts = ase_neighbor_list("ijS", atoms, cutoff)
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64)


# ------------------------------------------------------------------------------------------------ implementations
def builders(atoms: Atoms, cutoff: float, threads: int, device: str = "cpu") -> dict[str, Callable[[], Any]]:
    """For every implementation, a zero-argument call that builds the list of ``atoms`` (inputs prepared
    beforehand, as a caller holding tensors would have them); :func:`to_triples` reads its result."""
    import vesin
    from vesin_torch import NeighborList

    from ..data import neighbors

    pos = np.ascontiguousarray(atoms.positions, dtype=np.float64)
    cell = np.asarray(atoms.cell, dtype=np.float64) if atoms.pbc.any() else np.zeros((3, 3))
    pbc = np.asarray(atoms.pbc, dtype=bool)
    pos_t, cell_t, pbc_t = (torch.from_numpy(x).to(device) for x in (pos, cell, pbc))
    index = torch.zeros(len(atoms), dtype=torch.long, device=device)
    vesin_list = vesin.NeighborList(cutoff=cutoff, full_list=True, n_threads=threads)
    vesin_torch_list = NeighborList(cutoff=cutoff, full_list=True, n_threads=threads)
    uniform = bool(pbc.all()) or not pbc.any()

    calls: dict[str, Callable[[], Any]] = {
        "tdn": lambda: neighbors.neighbor_list(pos, cell, pbc, cutoff),
        "tdn device path": lambda: neighbors.neighbor_list_device(pos_t, cell_t, pbc_t, cutoff),
        "vesin": lambda: vesin_list.compute(points=pos, box=cell, periodic=pbc.tolist(), quantities="ijS"),
        "vesin-torch": lambda: vesin_torch_list.compute(points=pos_t, box=cell_t, periodic=pbc_t, quantities="ijS"),
    }
    try:
        import torch_sim.neighbors as tsn
    except ImportError:  # pragma: no cover - torch-sim is optional
        return calls
    if uniform:  # torch-sim's lists take one periodicity flag (or [S, 3] without partial periodicity)
        flag = bool(pbc.all())
        cutoff_t = torch.tensor(cutoff, dtype=torch.float64, device=device)
        calls["torch-sim vesin_nl_ts"] = lambda: tsn.vesin_nl_ts(pos_t, cell_t, flag, cutoff_t)
        calls["torch-sim torch_nl_linked_cell"] = lambda: tsn.torch_nl_linked_cell(cutoff, pos_t, cell_t,
                                                                                   pbc_t.view(1, 3), index)
        calls["torch-sim torch_nl_n2"] = lambda: tsn.torch_nl_n2(cutoff, pos_t, cell_t, pbc_t.view(1, 3), index)
        calls["torch-sim standard_nl"] = lambda: tsn.standard_nl(pos_t, cell_t, flag, cutoff_t)
    return calls


def to_triples(result: Any) -> Triples:
    """Any implementation's output as numpy ``(i, j, S)``."""
    parts = list(result)
    if len(parts) == 2 or (len(parts) == 3 and parts[0].ndim == 2):  # torch-sim: mapping [2, E], (system,) shifts
        mapping, shifts = parts[0], parts[-1]
        i, j = mapping[0], mapping[1]
    else:
        i, j, shifts = parts
    arrays = [np.asarray(x.cpu().numpy() if torch.is_tensor(x) else x) for x in (i, j, shifts)]
    return arrays[0].astype(np.int64), arrays[1].astype(np.int64), np.rint(arrays[2]).astype(np.int64).reshape(-1, 3)


def compare(found: Triples, expected: Triples) -> dict[str, Any]:
    """Exact set comparison of ``(i, j, S)``: counts of missing and extra edges, duplicates."""

    def rows(t: Triples) -> np.ndarray:
        return np.column_stack([t[0], t[1], t[2]])

    a, b = rows(found), rows(expected)
    unique_a = np.unique(a, axis=0)
    set_a = {tuple(r) for r in unique_a.tolist()}
    set_b = {tuple(r) for r in b.tolist()}
    missing, extra = len(set_b - set_a), len(set_a - set_b)
    duplicates = len(a) - len(unique_a)
    return {"edges": len(a), "ase_edges": len(b), "missing": missing, "extra": extra, "duplicates": duplicates,
            "agrees": missing == 0 and extra == 0 and duplicates == 0}  # fmt: skip


# ------------------------------------------------------------------------------------------------ measurement
def check_agreement(cfg: NeighborBenchConfig, threads: int) -> list[dict[str, Any]]:
    rows = []
    for name, atoms in agreement_systems().items():
        expected = ase_triples(atoms, cfg.cutoff)
        calls = builders(atoms, cfg.cutoff, threads, cfg.device)
        for impl in cfg.impls:
            row: dict[str, Any] = {"system": name, "impl": impl, "atoms": len(atoms), "pbc": atoms.pbc.tolist()}
            if impl not in calls:
                row["err"] = "not applicable: one periodicity flag for all directions"
            else:
                result, err = common.attempt(calls[impl], cfg.device)
                row.update(compare(to_triples(result), expected) if err is None else {"err": err})
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("system", "impl", "agrees", "missing", "extra", "err")}),
                  flush=True)  # fmt: skip
    return rows


def time_builds(cfg: NeighborBenchConfig, threads: int, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    rows, skipped = [], {}
    for natoms in cfg.sizes:
        atoms = cu_fcc(natoms)
        calls = builders(atoms, cfg.cutoff, threads, cfg.device)
        for impl in cfg.impls:
            row: dict[str, Any] = {"impl": impl, "atoms": natoms}
            if impl in skipped:
                row["err"] = skipped[impl]
            elif natoms > MAX_ATOMS.get(impl, natoms):
                row["err"] = f"skipped above {MAX_ATOMS[impl]} atoms (all pairs: time and memory grow as N^2)"
            else:
                timing, err = common.attempt(
                    lambda c=calls[impl]: common.time_call(c, cfg.device, warmup=cfg.warmup, reps=cfg.reps,
                                                           max_seconds=cfg.max_seconds), cfg.device)  # fmt: skip
                if err is not None:
                    row["err"] = err
                    skipped[impl] = f"skipped: failed at {natoms} atoms"
                else:
                    row.update(ms=timing["median_ms"], min_ms=timing["min_ms"], reps=timing["reps"])
                    if timing["median_ms"] > 1e3 * cfg.skip_above_s:
                        skipped[impl] = f"skipped: {timing['median_ms'] / 1e3:.1f} s per build at {natoms} atoms"
            if impl == "tdn" and "ms" in row:
                row["edges"] = int(calls[impl]()[0].shape[0])
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("impl", "atoms", "ms", "err") if row.get(k) is not None}),
                  flush=True)  # fmt: skip
            if on_row is not None:
                on_row(row)
            common.free_memory(cfg.device)
    return rows


def run(cfg: NeighborBenchConfig, out_dir: str | Path) -> dict[str, Any]:
    """Agreement first, then timings; ``NAME.json`` after every timing row, the markdown and PNG at the end."""
    threads = torch.get_num_threads()
    meta = common.run_metadata(cfg.device, packages=("ase", "vesin", "vesin-torch", "torch-sim-atomistic"))
    meta["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    out_dir = Path(out_dir)
    result: dict[str, Any] = {"meta": meta, "config": asdict(cfg), "agreement": [], "rows": [], "notes": cfg.notes}
    result["agreement"] = check_agreement(cfg, threads)

    def record(row: dict[str, Any]) -> None:
        result["rows"].append(row)
        common.write_json(out_dir / f"{cfg.name}.json", result)

    time_builds(cfg, threads, record)
    write_results(result, out_dir, cfg.name)
    return result


# ------------------------------------------------------------------------------------------------ report
def write_results(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    return common.write_report(result, out_dir, name, markdown_report, plot)


def _impls(result: dict[str, Any]) -> list[str]:
    return [i for i in result["config"]["impls"] if any(r["impl"] == i for r in result["rows"] + result["agreement"])]


def markdown_report(result: dict[str, Any]) -> str:
    meta, cfg = result["meta"], result["config"]
    git = meta["git"]
    impls = _impls(result)
    table = {(r["impl"], r["atoms"]): r for r in result["rows"]}
    lines = [
        f"# Neighbour lists on {'the CPU' if cfg.get('device', 'cpu') == 'cpu' else cfg['device']}: ms per build (Cu "
        f"fcc, cutoff {cfg['cutoff']} Å)",
        "",
        f"- machine: {common.machine_line(meta)}; OMP_NUM_THREADS={meta.get('omp_num_threads')}",
        f"- date: {meta['date']}; commit {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- median of up to {cfg['reps']} builds after {cfg['warmup']} warm-up; float64 positions already in tensors "
        "or arrays; `tdn` (tdn.data.neighbors.neighbor_list, every CPU path of the package) and `tdn device path` "
        "(neighbor_list_device, what runs on a GPU, here on CPU tensors) are vesin plus one sort into tdn's edge "
        "order (sender, receiver, shift); `vesin` and `vesin-torch` are raw, unsorted output",
        "",
        "## Time per build [ms]",
        "",
    ]
    header = ["atoms", "edges", *impls]
    body = []
    for natoms in cfg["sizes"]:
        edges = table.get(("tdn", natoms), {}).get("edges", "—")
        body.append([natoms, edges, *[_cell(table.get((i, natoms))) for i in impls]])
    lines.append(common.markdown_table(header, body))
    lines += ["", "## Exact agreement with ASE's neighbor_list (set of (i, j, S))", ""]
    systems = list(dict.fromkeys(r["system"] for r in result["agreement"]))
    agree = {(r["system"], r["impl"]): r for r in result["agreement"]}
    rows = []
    for system in systems:
        first = next(r for r in result["agreement"] if r["system"] == system)
        edges = next((r["ase_edges"] for r in result["agreement"] if r["system"] == system and "ase_edges" in r), "—")
        rows.append([system, first["atoms"], edges, *[_agreement(agree.get((system, i))) for i in impls]])
    lines.append(common.markdown_table(["system", "atoms", "ASE edges", *impls], rows))
    notes = list(result.get("notes", []))
    notes.append("agreement: positions wrapped into the cell first (torch-sim's lists ask for wrapped positions); "
                 "n/a: the function takes one periodicity flag for all directions")  # fmt: skip
    skipped = sorted({f"{r['impl']}: {r['err']}" for r in result["rows"] if r.get("err")})
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes + skipped]
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    if row.get("err"):
        return "skip" if row["err"].startswith("skipped") else "err"
    return common.fmt_ms(row["ms"])


def _agreement(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    if row.get("err"):
        return "n/a" if row["err"].startswith("not applicable") else "error"
    if row["agrees"]:
        return "exact"
    return f"NO (-{row['missing']} +{row['extra']}" + (f", {row['duplicates']} dup" if row["duplicates"] else "") + ")"


def plot(result: dict[str, Any], path: Path) -> Path:
    cfg = result["config"]
    table = {(r["impl"], r["atoms"]): r for r in result["rows"]}
    series = {i: [table.get((i, n), {}).get("ms") for n in cfg["sizes"]] for i in _impls(result)}
    meta = result["meta"]
    title = f"Neighbour lists, {common.machine_line(meta)}, {meta['date']}"
    return common.line_plot(path, [str(n) for n in cfg["sizes"]], {"ms per build (Cu fcc, 5 Å)": series},
                            ylabel="ms", title=title)  # fmt: skip


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_neighbors.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory for NAME.json / .md / .png")
    p.add_argument("--name", default=None, help="file name stem (default: neighbors_<device>[_quick])")
    p.add_argument("--device", default="cpu", help="torch device of the tensor implementations (cpu, cuda)")
    p.add_argument("--quick", action="store_true", help=f"smoke run (< 30 s): {list(QUICK_SIZES)} atoms, 3 reps")
    p.add_argument("--sizes", type=int, nargs="+", help=f"numbers of atoms, 4 n^3 (default {list(FULL_SIZES)})")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--reps", type=int)
    p.add_argument("--threads", type=int, help="torch and vesin threads (default: torch's own; --quick uses 1)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> NeighborBenchConfig:
    cfg = NeighborBenchConfig(sizes=tuple(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)),
                              impls=tuple(args.impls), quick=args.quick, device=args.device)  # fmt: skip
    if args.quick:
        cfg.reps, cfg.max_seconds = 3, 2.0
    if args.reps is not None:
        cfg.reps = args.reps
    for natoms in cfg.sizes:
        cu_fcc(natoms)  # fail early on a size that is not 4 n^3
    cfg.name = args.name or f"neighbors_{torch.device(args.device).type}{'_quick' if args.quick else ''}"
    return cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.cli_main(argv, parse_args, config_from_args, run)
