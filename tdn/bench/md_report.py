"""The report of the MD step benchmark (:mod:`.md`): the markdown table (ms per step, the speed-up over mace-torch)
and the plot, from the rows a run measured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import common

STEP_NOISE = 1e-3  # Å, displacement per step


def _impls(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(row["impl"], None)
    return list(seen)


def _lookup(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, Any]]:
    return {(r["impl"], r.get("atoms"), r.get("dtype")): r for r in rows if "atoms" in r}


def speedup(table: dict, impls: Sequence[str], natoms: int, dtype: str) -> float | None:
    """Fastest reference time over fastest tdn time (> 1: tdn is faster)."""

    def best(prefix: str) -> float | None:
        times = [
            table[(i, natoms, dtype)].get("step_ms")
            for i in impls
            if i.startswith(prefix) and (i, natoms, dtype) in table
        ]
        times = [t for t in times if t is not None]
        return min(times) if times else None

    ours, ref = best("tdn-"), best("mace-")
    return ref / ours if ours and ref else None


def markdown_report(result: dict[str, Any]) -> str:
    meta, cfg, rows = result["meta"], result["config"], result["rows"]
    impls = _impls(rows)
    table = _lookup(rows)
    gpu = torch.device(cfg["device"]).type == "cuda"
    neighbors = next((r["neighbors_per_atom"] for r in rows if r.get("neighbors_per_atom")), None)
    git = meta["git"]
    lines = [
        "# MD step: ms per energy+forces call (Cu fcc)",
        "",
        f"- machine: {common.machine_line(meta)}",
        f"- date: {meta['date']}; commit {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- model: tdn preset {cfg['preset']}; the reference MACE at the same widths: "
        + ", ".join(f"{k}={v}" for k, v in result["model"]["mace"].items()),
        f"- step: every atom displaced by ~{STEP_NOISE} Å, then get_forces(); median of up to {cfg['reps']} "
        f"after {cfg['warmup']} warm-up calls; tdn neighbour-list skin {cfg['skin']} Å"
        + (f"; the calculator hands the model {neighbors:.0f} pairs per atom" if neighbors else "")
        + ("" if gpu else " (on a CPU only those within the cutoff: `TDNCalculator.exact_pairs`; the engine every "
           "candidate within cutoff + skin)"),
    ]
    if any(i.endswith(" engine") for i in impls):
        lines.append(f"- `<backend> engine`: a whole NVE MD step of tdn.dynamics.TorchDynamics (integrator, skin "
                     f"list, energy and forces on the device; 300 K start), timed over {cfg['engine_steps']} steps "
                     "per call")  # fmt: skip
    lines.append("")
    if meta.get("load_average_1min") is not None:
        lines.insert(3, f"- 1-min load average at the start: {meta['load_average_1min']} (compare within one run)")
    header = ["atoms", "dtype"] + [f"{i} ms" for i in impls] + ["best MACE / best tdn"]
    if gpu:
        header += [f"{i} GB" for i in impls]
    body = []
    for natoms in cfg["sizes"]:
        for dtype in cfg["dtypes"]:
            cells = [_cell(table.get((i, natoms, dtype)), "step_ms") for i in impls]
            row = [natoms, dtype, *cells, common.fmt_ratio(speedup(table, impls, natoms, dtype))]
            if gpu:
                row += [_cell(table.get((i, natoms, dtype)), "peak_mem_gb") for i in impls]
            body.append(row)
    lines.append(common.markdown_table(header, body))
    errors = [r for r in rows if r.get("err")]
    notes = list(result.get("notes", []))
    if not gpu:
        notes.append("CPU run: peak GPU memory does not apply; GPU figures are still to be measured.")
    if errors or notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in notes]
        lines += [f"- {r['impl']} {r.get('atoms', '')} {r.get('dtype', '')}: {r['err']}" for r in errors]
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any] | None, key: str) -> str:
    if row is None:
        return "—"
    if row.get("err"):
        return "OOM" if "OOM" in row["err"] or "out of memory" in row["err"] else "err"
    value = row.get(key)
    if value is None:
        return "—"
    return common.fmt_ms(value) if key == "step_ms" else f"{value:.2f}"


def plot(result: dict[str, Any], path: Path) -> Path:
    cfg, rows = result["config"], result["rows"]
    table = _lookup(rows)
    impls = _impls(rows)
    panels = {}
    for dtype in cfg["dtypes"]:
        panels[f"{dtype}: ms per energy+forces call"] = {
            impl: [table.get((impl, n, dtype), {}).get("step_ms") for n in cfg["sizes"]] for impl in impls
        }
    gpu = torch.device(cfg["device"]).type == "cuda"
    if gpu:
        for dtype in cfg["dtypes"]:
            panels[f"{dtype}: peak GPU memory [GB]"] = {
                impl: [table.get((impl, n, dtype), {}).get("peak_mem_gb") for n in cfg["sizes"]] for impl in impls
            }
    title = f"MD step, Cu fcc — {common.machine_line(result['meta'])}, {result['meta']['date']}"
    return common.line_plot(
        path, [str(n) for n in cfg["sizes"]], panels, ylabel="ms (memory panels: GB)" if gpu else "ms", title=title
    )
