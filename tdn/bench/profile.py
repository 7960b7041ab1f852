"""Where an MD step's time goes: one energy+forces call of a tdn model through :class:`tdn.TDNCalculator`,
split into phases, the forward pass split by block, and the top operators from ``torch.profiler``.

Phases (timed with a device synchronisation between them, median over repetitions):

- ``inputs``: the calculator's input preparation (host -> device positions, skin check, edge selection);
- ``forward/<block>``: the energy, per block of :class:`tdn.models.TDNModel` (hooks on its modules; the edge
  geometry, harmonics and the sum over atoms are ``forward/other``);
- ``backward``: ``autograd.grad`` of the energy (the forces);
- ``to_host``: forces and energies copied to numpy.

The operator table comes from a separate profiled run (no synchronisation inside it), sorted by self time on
the device (CUDA) or the CPU. Synchronising between blocks lengthens a GPU step a little: the phase times say
where the time goes, the MD benchmark (:mod:`tdn.bench.md`) says how long a step takes.

    python scripts/profile_step.py --backends cp cg --natoms 108 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import common
from .md import MDBenchConfig, cu_fcc, model_config

TOP_OPS = 15


class BlockTimer:
    """Forward hooks that time each named submodule, with a device synchronisation at its entry and exit."""

    def __init__(self, blocks: dict[str, nn.Module], device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(blocks, 0.0)
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in blocks.items():
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._exit(name)))

    def _enter(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            common.synchronize(self.device)
            self._start[name] = time.perf_counter()

        return hook

    def _exit(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            common.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - self._start.pop(name)

        return hook

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def model_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks of a TDNModel by kind: ``radial``, ``embedding``, ``interaction.t``, ``product.t``, ..."""
    blocks: dict[str, nn.Module] = {"radial": model.radial, "embedding": model.embedding}
    for kind in ("interactions", "self_connections", "products", "readouts"):
        for t, module in enumerate(getattr(model, kind)):
            if not isinstance(module, nn.Identity):
                blocks[f"{kind[:-1]}.{t}"] = module
    return blocks


def phase_times(calc: Any, atoms: Any, device: torch.device, reps: int, seed: int = 0) -> dict[str, float]:
    """Median milliseconds per phase of one step (see the module docstring), over ``reps`` steps."""
    import numpy as np

    model = calc.model
    timer = BlockTimer(model_blocks(model), device)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}

    def clock(start: float) -> float:
        common.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    try:
        for _ in range(reps):
            atoms.positions += rng.normal(scale=1e-3, size=atoms.positions.shape)
            timer.reset()
            common.synchronize(device)
            start = time.perf_counter()
            graph = calc._prepare(atoms)
            row = {"inputs": clock(start)}
            start = time.perf_counter()
            pos = graph.pos.detach().requires_grad_(True)
            element_index = model.element_index(graph.atomic_numbers)
            shift = graph.unit_shifts @ graph.cell.view(3, 3)
            with torch.enable_grad():
                energy = model.node_energies(pos, element_index, graph.edge_index, shift).sum()
                forward = clock(start)
                start = time.perf_counter()
                (grad,) = torch.autograd.grad(energy, pos)
            row["backward"] = clock(start)
            start = time.perf_counter()
            _ = (-grad).cpu().numpy(), float(energy.detach())
            row["to_host"] = clock(start)
            blocks = {f"forward/{k}": v * 1e3 for k, v in timer.seconds.items()}
            row |= blocks
            row["forward/other"] = max(forward - sum(blocks.values()), 0.0)
            for key, value in row.items():
                samples.setdefault(key, []).append(value)
    finally:
        timer.remove()
    return {key: statistics.median(values) for key, values in samples.items()}


def top_operators(calc: Any, atoms: Any, device: torch.device, reps: int, top: int = TOP_OPS) -> list[dict[str, Any]]:
    """The ``top`` operators by self time over ``reps`` profiled ``get_forces`` calls (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            atoms.positions += 1e-3
            atoms.get_forces()
        common.synchronize(device)
    on_device = device.type == "cuda"
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if on_device else event.self_cpu_time_total
        rows.append({"op": event.key, "calls_per_step": event.count / reps, "self_ms_per_step": self_us / 1e3 / reps})
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    total = sum(r["self_ms_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["self_ms_per_step"] / total if total > 0 else float("nan")
    return rows[:top]


def profile_backend(
    backend: str, natoms: int, dtype: str, device: torch.device, reps: int, workdir: Path, preset: str = "mace-medium"
) -> dict[str, Any]:
    """Phases and top operators of a freshly initialised ``preset`` model with ``backend`` on Cu fcc."""
    from .. import TDNCalculator, save_model
    from ..models import build_model

    path = workdir / f"{backend}.tdn"
    torch.manual_seed(0)
    save_model(build_model(**model_config(MDBenchConfig(preset=preset), backend)), path)
    calc = TDNCalculator(path, device=str(device), default_dtype=dtype)
    atoms = cu_fcc(natoms)
    atoms.calc = calc
    for _ in range(2):  # warm-up: first neighbour list, lazy tables
        atoms.positions += 1e-3
        atoms.get_forces()
    phases = phase_times(calc, atoms, device, reps)
    ops = top_operators(calc, atoms, device, max(1, reps // 2))
    return {
        "backend": backend,
        "preset": preset,
        "natoms": natoms,
        "dtype": dtype,
        "edges": calc.num_edges,
        "step_ms": sum(phases.values()),
        "phases_ms": phases,
        "top_ops": ops,
    }


def _phase_keys(runs: Sequence[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run["phases_ms"] if k not in keys]
    return keys


def markdown_report(result: dict[str, Any]) -> str:
    meta, runs = result["meta"], result["runs"]
    lines = [
        "# Where an MD step's time goes (tdn, Cu fcc)",
        "",
        f"- {common.machine_line(meta)}",
        f"- date: {meta['date']}; commit {meta['git']['commit'][:12]}{' (dirty)' if meta['git'].get('dirty') else ''}",
        f"- command: `{result['command']}`; model preset: {runs[0]['preset'] if runs else '-'}",
        "- phases: median ms per step with a device synchronisation between phases and blocks "
        "(see tdn/bench/profile.py); operators: torch.profiler self time per step",
        "",
    ]
    keys = _phase_keys(runs)
    header = ["phase"] + [f"{r['backend']} {r['natoms']} atoms {r['dtype']} ms" for r in runs]
    body = [[k] + [common.fmt_ms(r["phases_ms"].get(k)) for r in runs] for k in keys]
    body.append(["**total**"] + [common.fmt_ms(r["step_ms"]) for r in runs])
    lines += [common.markdown_table(header, body), ""]
    for run in runs:
        title = f"{run['backend']}, {run['natoms']} atoms, {run['dtype']} ({run['edges']} edges)"
        lines += [f"## Top operators: {title}", ""]
        lines.append(common.markdown_table(
            ["op", "calls / step", "self ms / step", "share"],
            [[f"`{o['op']}`", f"{o['calls_per_step']:.0f}", common.fmt_ms(o["self_ms_per_step"]),
              f"{100 * o['share']:.1f} %"] for o in run["top_ops"]],
        ))  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    keys = _phase_keys(runs)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(runs)))
    labels = [f"{r['backend']} {r['natoms']} {r['dtype']}" for r in runs]
    left = [0.0] * len(runs)
    cmap = plt.get_cmap("tab20")
    for i, key in enumerate(keys):
        widths = [r["phases_ms"].get(key, 0.0) for r in runs]
        ax.barh(labels, widths, left=left, label=key, color=cmap(i % 20))
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("ms per energy+forces step")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["cp", "cg"])
    p.add_argument("--natoms", type=int, nargs="+", default=[108], help="Cu fcc sizes (4 n^3)")
    p.add_argument("--preset", default="mace-medium", help="model preset (tdn.models.PRESETS)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--name", default=None, help="output name (default profile_<device type>)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, command: str = "python scripts/profile_step.py") -> dict[str, Any]:
    import sys
    import tempfile

    args = parse_args(argv)
    device = torch.device(args.device)
    name = args.name or f"profile_{device.type}"
    runs: list[dict[str, Any]] = []
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    result = {"meta": common.run_metadata(device), "command": f"{command} {argv_text}".strip(), "runs": runs}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tdn_profile_") as tmp:
        for backend in args.backends:
            for natoms in args.natoms:
                run = profile_backend(backend, natoms, args.dtype, device, args.reps, Path(tmp), args.preset)
                print(f"{backend:>6} {natoms:>7} atoms: {run['step_ms']:.1f} ms/step "
                      + ", ".join(f"{k} {v:.1f}" for k, v in run["phases_ms"].items()), flush=True)  # fmt: skip
                runs.append(run)
                common.write_json(out / f"{name}.json", result)  # a run stopped by a time limit keeps its rows
    common.write_json(out / f"{name}.json", result)
    common.write_text(out / f"{name}.md", markdown_report(result))
    plot(result, out / f"{name}.png")
    print(f"wrote {out / name}.{{json,md,png}}")
    return result
