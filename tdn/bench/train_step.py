"""Training-step benchmark: optimiser steps per second with forces in the loss, for every tdn backend and, in the
same run, mace-torch's own model at the same widths.

One step is what a training loop does per batch: energies and forces of a batch of 10 molecules (``create_graph``:
forces are differentiated again by the loss), loss ``MSE(E / atom) + 10 MSE(F)``, backward, Adam (amsgrad) update.
Both sides run the same loop around their model on the same molecules (ASE's g2 set, H/C/N/O, rattled) with the
same widths: ``accuracy_cpu`` (conf/experiment/accuracy_cpu.yaml) and MACE-medium. mace-torch runs in a child
process (``_mace_train_worker.py``, it pins e3nn 0.4.4) with its own ``PYTHONPATH``; skipped with a note where it
cannot be imported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.build import molecule
from torch_geometric.data import Batch

from . import common

MOLECULES = ("CH3CH2OH", "C6H6", "CH3CONH2", "CH3COOH", "C5H5N", "C4H4O", "HCOOCH3", "CH3CH2NH2", "C4H4NH",
             "CH3COCH3")  # fmt: skip
ELEMENTS = (1, 6, 7, 8)
# conf/experiment/accuracy_cpu.yaml's model, the learning curves' larger model (tdn.bench.curves.SIZES["large"]),
# and MACE-medium (tdn.models.PRESETS)
_ACCURACY_CPU = dict(channels=16, lmax=2, lmax_hidden=1, correlation=2, num_layers=2, num_bessel=8, radial_mlp=[32, 32],
                     readout_mlp=16, cutoff=5.0)  # fmt: skip
SIZES = {
    "accuracy_cpu": _ACCURACY_CPU,
    "accuracy_cpu_large": {**_ACCURACY_CPU, "channels": 64, "lmax": 3, "correlation": 3},
    "mace-medium": "mace-medium",
}  # fmt: skip
WORKER = Path(__file__).with_name("_mace_train_worker.py")


@dataclass
class TrainBenchConfig:
    device: str = "cpu"
    sizes: tuple[str, ...] = ("accuracy_cpu", "mace-medium")
    dtypes: tuple[str, ...] = ("float32",)
    backends: tuple[str, ...] | None = None  # None: every backend, with its default weights
    references: tuple[str, ...] = ("mace-e3nn",)
    warmup: int = 2
    reps: int = 10  # rounds: every backend once per round, in turn (load from other jobs hits all alike)
    max_seconds: float | None = 60.0
    mace_python: str = sys.executable
    mace_pythonpath: str | None = None
    name: str = "train_step_cpu"
    notes: list[str] = field(default_factory=list)


def batch_molecules(seed: int = 0) -> list[Atoms]:
    """The batch: ten small molecules, rattled by 0.05 Å, with made-up labels (speed does not depend on them)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, name in enumerate(MOLECULES):
        atoms = molecule(name)
        atoms.rattle(0.05, seed=seed + i)
        atoms.info["energy"] = float(rng.normal())
        atoms.arrays["forces"] = rng.normal(size=(len(atoms), 3))
        out.append(atoms)
    return out


def model_values(size: str) -> dict[str, Any]:
    from ..models import PRESETS

    values = SIZES[size]
    return dict(PRESETS[values]) if isinstance(values, str) else dict(values)


def mean_neighbors(molecules: Sequence[Atoms], cutoff: float) -> float:
    """Average number of neighbours within ``cutoff`` (both sides scale their messages by it)."""
    from ase.neighborlist import neighbor_list

    pairs = sum(len(neighbor_list("i", m, cutoff)) for m in molecules)
    return pairs / sum(len(m) for m in molecules)


def mace_widths(values: dict[str, Any], avg_num_neighbors: float) -> dict[str, Any]:
    """mace-torch's hyperparameters for a tdn model of these widths."""
    parity = "eo"
    hidden = "+".join(f"{values['channels']}x{l}{parity[l % 2]}" for l in range(values["lmax_hidden"] + 1))
    return {
        "r_max": values.get("cutoff", 5.0),
        "num_bessel": values.get("num_bessel", 8),
        "num_polynomial_cutoff": values.get("envelope_exponent", 5),
        "max_ell": values["lmax"],
        "num_interactions": values["num_layers"],
        "hidden_irreps": hidden,
        "MLP_irreps": f"{values['readout_mlp']}x0e",
        "radial_MLP": list(values["radial_mlp"]),
        "correlation": values["correlation"],
        "avg_num_neighbors": avg_num_neighbors,
        "atomic_numbers": list(ELEMENTS),
    }


def training_step(model: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer):
    """One optimiser step of ``MSE(E / atom) + 10 MSE(F)`` (forces differentiated again by the loss)."""
    natoms = batch.natoms.to(batch.pos.dtype)

    def step() -> None:
        out = model(batch, training=True)
        loss = ((out["energy"] - batch.energy) / natoms).square().mean()
        loss = loss + 10.0 * (out["forces"] - batch.forces).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def warm_step(backend: str, values: dict[str, Any], dtype: str, avg_num_neighbors: float, batch: Batch,
              device: str) -> Callable[[], None]:  # fmt: skip
    """A fresh model of ``backend`` at the widths ``values`` and its training step, run once (a failure raises here,
    before any timing)."""
    from ..models import build_model
    from .md import backend_fields

    torch.manual_seed(0)
    model = build_model(**{**values, **backend_fields(backend), "elements": list(ELEMENTS), "dtype": dtype,
                           "avg_num_neighbors": avg_num_neighbors}).to(device).train()  # fmt: skip
    step = training_step(model, batch, torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True))
    step()
    return step


def bench_tdn(cfg: TrainBenchConfig) -> list[dict[str, Any]]:
    from ..data.graph import atoms_to_graph
    from .md import tdn_backends

    molecules = batch_molecules()
    rows = []
    for size in cfg.sizes:
        values = model_values(size)
        avg = mean_neighbors(molecules, values.get("cutoff", 5.0))
        for dtype in cfg.dtypes:
            batch = Batch.from_data_list([atoms_to_graph(m, values.get("cutoff", 5.0), dtype=dtype)
                                          for m in molecules]).to(cfg.device)  # fmt: skip
            steps, cells = {}, {}
            for backend in tdn_backends(cfg):
                cells[backend] = {"impl": f"tdn-{backend}", "size": size, "dtype": dtype}
                build = partial(warm_step, backend, values, dtype, avg, batch, cfg.device)
                steps[backend], err = common.attempt(build, cfg.device)
                if err:
                    cells[backend]["err"] = err
                    del steps[backend]
            timings = common.time_interleaved(steps, cfg.device, cfg.warmup, max(cfg.reps, 1),
                                              max_seconds=cfg.max_seconds) if steps else {}  # fmt: skip
            for backend, row in cells.items():
                if backend in timings:
                    t = timings[backend]
                    row.update(step_ms=t["step_ms"], cpu_ms=t["cpu_ms"], steps_per_s=1e3 / t["step_ms"], reps=t["reps"])
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def bench_mace(cfg: TrainBenchConfig, workdir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    if not cfg.references:
        return [], []
    molecules = batch_molecules()
    jobs = []
    for size in cfg.sizes:
        values = model_values(size)
        jobs.append({"size": size, "widths": mace_widths(values, mean_neighbors(molecules, values.get("cutoff", 5.0)))})
    job = {"jobs": jobs, "dtypes": list(cfg.dtypes), "device": cfg.device, "warmup": cfg.warmup, "reps": cfg.reps,
           "max_seconds": cfg.max_seconds, "threads": torch.get_num_threads(), "workdir": str(workdir),
           "molecules": list(MOLECULES)}  # fmt: skip
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")  # mace-torch pickles whole models
    if cfg.mace_pythonpath:
        env["PYTHONPATH"] = cfg.mace_pythonpath
    proc = subprocess.run([cfg.mace_python, str(WORKER), json.dumps(job)], capture_output=True, text=True, env=env,
                          cwd=workdir)  # fmt: skip
    rows, notes = [], []
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            rows.append(json.loads(line[4:]))
            print(line[4:], flush=True)
        elif line.startswith("NOTE "):
            notes.append(line[5:])
        elif line.startswith("VERSIONS "):
            notes.append("reference versions: " + line[9:])
    if proc.returncode != 0:
        notes.append(f"mace-torch worker failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return rows, notes


def run(cfg: TrainBenchConfig, out_dir: str | Path) -> dict[str, Any]:
    meta = common.run_metadata(cfg.device, packages=("ase", "torch-geometric", "e3nn"))
    if hasattr(os, "getloadavg"):
        meta["load_average_1min"] = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="tdn_bench_train_") as tmp:
        rows = bench_tdn(cfg)
        mace_rows, notes = bench_mace(cfg, Path(tmp))
    if hasattr(os, "getloadavg"):
        meta["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    result = {"meta": meta, "config": asdict(cfg), "molecules": list(MOLECULES),
              "models": {s: model_values(s) for s in cfg.sizes}, "rows": rows + mace_rows,
              "notes": cfg.notes + notes}  # fmt: skip
    common.write_report(result, out_dir, cfg.name, markdown_report, plot)
    return result


def _impls(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen = dict.fromkeys(r["impl"] for r in rows)
    return [i for i in seen if i.startswith("tdn-")] + [i for i in seen if not i.startswith("tdn-")]


def markdown_report(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    impls = _impls(rows)
    table = {(r["impl"], r["size"], r["dtype"]): r for r in rows}
    lines = [
        "# Training step: optimiser steps per second, forces in the loss (batch of 10 molecules)",
        "",
        f"- machine: {common.machine_line(meta)}",
        f"- 1-min load average: {meta.get('load_average_1min')} at the start, {meta.get('load_average_1min_end')} "
        "at the end (compare within one run)",
        f"- date: {meta.get('date')}; commit {meta.get('git', {}).get('commit', '?')[:12]}"
        + (" (dirty)" if meta.get("git", {}).get("dirty") else ""),
        "- step: energy and forces (create_graph), loss MSE(E/atom) + 10 MSE(F), backward, Adam (amsgrad); the "
        "same loop around each model; molecules: " + ", ".join(result["molecules"]),
        "- widths: " + "; ".join(f"{s}: {v}" for s, v in result["models"].items()),
        "- cells: optimiser steps per second (wall clock) and, on a CPU, the median process CPU ms per step; tdn's "
        "backends are timed in turn, one step each per round, so load from other jobs hits them alike",
        "",
    ]
    header = ["size", "dtype", *[f"{i} steps/s" for i in impls], "best tdn / mace-e3nn"]
    body = []
    for size in dict.fromkeys(r["size"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            cells = [table.get((i, size, dtype)) for i in impls]
            rates = [c.get("steps_per_s") if c else None for c in cells]
            tdn_best = max((r for i, r in zip(impls, rates) if i.startswith("tdn-") and r), default=None)
            mace = table.get(("mace-e3nn", size, dtype), {}).get("steps_per_s")
            ratio = tdn_best / mace if tdn_best and mace else None
            body.append([size, dtype, *[_rate(c) for c in cells], common.fmt_ratio(ratio)])
    lines.append(common.markdown_table(header, body))
    if result["notes"]:
        lines += ["", "## Notes", "", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def _rate(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    if row.get("err"):
        return "error: " + row["err"][:60]
    cpu_ms = row.get("cpu_ms")
    return f"{row['steps_per_s']:.3g}" + (f" ({cpu_ms:.0f} CPU ms)" if cpu_ms and math.isfinite(cpu_ms) else "")


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("steps_per_s")]
    impls = _impls(rows)
    groups = list(dict.fromkeys((r["size"], r["dtype"]) for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(impls) * len(groups) / 2, 4))
    width = 0.8 / max(len(impls), 1)
    lookup = {(r["impl"], r["size"], r["dtype"]): r["steps_per_s"] for r in rows}
    for k, impl in enumerate(impls):
        values = [lookup.get((impl, *g), 0.0) for g in groups]
        ax.bar([g + k * width for g in range(len(groups))], values, width, label=impl)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [f"{s}\n{d}" for s, d in groups])
    ax.set_ylabel("training steps / s (higher is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Training step, forces in the loss, 10 molecules")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory for NAME.json / .md / .png")
    p.add_argument("--name", default=None, help="file name stem (default: train_step_<device>[_quick])")
    p.add_argument("--quick", action="store_true", help="smoke run: accuracy_cpu size only, 1 warm-up, 2 reps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None)
    p.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32"])
    p.add_argument("--backends", nargs="+", default=None, help="tdn backends (default: every registered one)")
    p.add_argument("--references", nargs="*", default=["mace-e3nn"], choices=["mace-e3nn"])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mace-python", default=sys.executable)
    p.add_argument("--mace-pythonpath", default=None)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainBenchConfig:
    quick = args.quick
    return TrainBenchConfig(
        device=args.device,
        sizes=tuple(args.sizes or (("accuracy_cpu",) if quick else ("accuracy_cpu", "mace-medium"))),
        dtypes=tuple(args.dtypes),
        backends=tuple(args.backends) if args.backends else None,
        references=tuple(args.references),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 2),
        reps=args.reps if args.reps is not None else (2 if quick else 10),
        max_seconds=args.max_seconds,
        mace_python=args.mace_python,
        mace_pythonpath=args.mace_pythonpath,
        name=args.name or f"train_step_{torch.device(args.device).type}{'_quick' if quick else ''}",
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.cli_main(argv, parse_args, config_from_args, run)
