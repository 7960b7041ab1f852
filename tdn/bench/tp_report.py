"""Report of the tensor-product microbenchmark (:mod:`tdn.bench.tp`): the markdown tables, the plot, and the JSON,
markdown and PNG files of a result."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import common
from .tp_ops import Cell, cell_of


def ordered_variants(rows: list[dict[str, Any]]) -> list[str]:
    """Variant names in the order of the tables: e3nn, cuEquivariance, then the tdn variants."""
    seen: dict[str, None] = {}
    for row in sorted(rows, key=lambda r: {"e3nn": 0, "cueq": 1}.get(r["source"], 2)):
        seen.setdefault(row["variant"], None)
    return list(seen)


def find_variant(rows: list[dict[str, Any]], name: str, cell: Cell) -> dict[str, Any] | None:
    """The row of variant ``name`` in ``cell``, or None."""
    return next((r for r in rows if r["variant"] == name and cell_of(r) == cell), None)


def cells_of(rows: list[dict[str, Any]]) -> list[Cell]:
    """The distinct cells of ``rows``, in order of appearance."""
    seen: dict[Cell, None] = {}
    for row in rows:
        seen.setdefault(cell_of(row), None)
    return list(seen)


def cell_labels(cells: list[Cell]) -> list[str]:
    """Tick labels naming only what varies between cells."""
    vary_c = len({c.channels for c in cells}) > 1
    vary_e = len({c.edges for c in cells}) > 1
    labels = []
    for c in cells:
        parts = [f"L={c.lmax}"] + ([f"C={c.channels}"] if vary_c else []) + ([f"E={c.edges}"] if vary_e else [])
        labels.append("\n".join(parts))
    return labels


def write_plot(result: dict[str, Any], path: Path) -> Path:
    """Forward and forward+backward time of every variant per cell."""
    rows = result["rows"]
    cells = cells_of(rows)
    panels: dict[str, dict[str, list[float | None]]] = {"forward": {}, "forward + backward": {}}
    for name in ordered_variants(rows):
        for panel, stage in (("forward", "fwd"), ("forward + backward", "fwdbwd")):
            values = []
            for c in cells:
                values.append((find_variant(rows, name, c) or {}).get(f"{stage}_ms"))
            panels[panel][name] = values
    meta = result["meta"]
    fixed = [f"C={cells[0].channels}"] if len({c.channels for c in cells}) == 1 else []
    fixed += [f"E={cells[0].edges}"] if len({c.edges for c in cells}) == 1 else []
    title = (f"tensor products, {meta['config']['dtype']}, {', '.join(fixed)} — {common.machine_line(meta)}\n"
             f"{meta['date']}, commit {meta['git']['commit'][:10]}")
    return common.line_plot(path, cell_labels(cells), panels, ylabel="time (ms)", title=title)


def accuracy_cell(row: dict[str, Any]) -> str:
    """The "rel err vs CG" cell of a row (Gaunt backends: their error against the Gaunt map)."""
    if row.get("target_map") == "gaunt":
        return f"n/a vs CG; {common.fmt_sci(row.get('rel_err_vs_gaunt'))} vs Gaunt"
    if row.get("rel_err_vs_cg") is None:
        return row.get("accuracy_note", "—")
    return common.fmt_sci(row["rel_err_vs_cg"])


def cp_cell(row: dict[str, Any]) -> str:
    """The "rank / width" cell of a row."""
    parts = []
    if "rank" in row:
        parts.append(f"R={row['rank']}")
    elif "inner_width" in row:
        parts.append(f"Q={row['inner_width']}")
    if row.get("fit_error") is not None:
        parts.append(f"fit {row['fit_error']:.1e}")
    return ", ".join(parts) or "—"


DETAIL_HEADER = ["variant", "fwd ms", "x e3nn", "fwd+bwd ms", "x e3nn", "peak mem fwd / fwd+bwd", "rel err vs CG",
                 "equiv err f32 / f64", "paths", "w/ch", "couplings represented", "rank / width",
                 "I/O floor fwd / fwd+bwd ms", "errors"]


def detail_row(row: dict[str, Any]) -> list[str]:
    """One line of a cell's detail table."""
    errors = "; ".join(f"{k}: {v}" for k, v in (row.get("errors") or {}).items())
    return [
        row["variant"], common.fmt_ms(row.get("fwd_ms")), common.fmt_ratio(row.get("speedup_fwd")),
        common.fmt_ms(row.get("fwdbwd_ms")), common.fmt_ratio(row.get("speedup_fwdbwd")),
        f"{common.fmt_bytes(row.get('peak_mem_fwd'))} / {common.fmt_bytes(row.get('peak_mem_fwdbwd'))}",
        accuracy_cell(row),
        f"{common.fmt_sci(row.get('equiv_err_f32'))} / {common.fmt_sci(row.get('equiv_err_f64'))}",
        str(row.get("num_paths", "—")), str(row.get("weights_per_channel", "—")), row.get("couplings", "—"),
        cp_cell(row),
        f"{common.fmt_ms(row.get('floor_fwd_ms'))} / {common.fmt_ms(row.get('floor_fwdbwd_ms'))}",
        errors[:200] or "",
    ]


def summary_table(rows: list[dict[str, Any]], key: str) -> str:
    """One line per cell, one column per variant, of the field ``key`` (speed-ups or times)."""
    names = ordered_variants(rows)
    body = []
    for c in cells_of(rows):
        line = [c.label]
        for name in names:
            row = find_variant(rows, name, c)
            value = (row or {}).get(key)
            fmt = common.fmt_ratio if key.startswith("speedup") else common.fmt_ms
            line.append(fmt(value) if value is not None or not (row or {}).get("errors") else "error")
        body.append(line)
    return common.markdown_table(["cell"] + names, body)


def cpu_time_section(rows: list[dict[str, Any]]) -> list[str]:
    """CPU runs: speed-ups from process CPU time, which other jobs on a shared machine disturb far less."""
    if not any(r.get("speedup_cpu_fwdbwd") for r in rows):
        return []
    return ["## Speed-up vs e3nn by process CPU time, forward + backward (CPU run; robust to other load)", "",
            summary_table(rows, "speedup_cpu_fwdbwd"), ""]


def targets_section(targets: list[dict[str, Any]]) -> str:
    """The targets as a markdown table."""
    if not targets:
        return "No target applies to the cells of this run (cp/grid rows missing)."
    body = []
    for t in targets:
        met = {True: "met", False: "MISSED", None: "n/a"}[t.get("met")]
        where = f"L={t['lmax']} C={t['channels']} E={t['edges']}" if "lmax" in t else ""
        body.append([t["target"], where, common.fmt_ratio(t.get("value")), met,
                     "; ".join(x for x in (t.get("note"), t.get("context")) if x)])
    return common.markdown_table(["target", "cell", "measured", "status", "note"], body)


def load_line(meta: dict[str, Any]) -> list[str]:
    """The load average at the start of a CPU run, as a markdown list item (none on a GPU)."""
    load = meta["machine"].get("load_average")
    if not load or "gpu" in meta["machine"]:
        return []
    return [f"- load average at start (1/5/15 min): {' / '.join(f'{x:.1f}' for x in load)} "
            f"on {meta['machine']['cpu_count']} logical CPUs (a shared machine: see the CPU-time table)"]


def markdown_report(result: dict[str, Any], notes: Sequence[str] = ()) -> str:
    """The full markdown report of a result."""
    meta, rows = result["meta"], result["rows"]
    cfg = meta["config"]
    git = meta["git"]
    bandwidth = meta["copy_bandwidth"]
    bw_text = (f"{bandwidth['gb_per_s']:.1f} GB/s (clone {bandwidth['clone_gb_per_s']:.1f}, copy_ into a preallocated "
               f"tensor {bandwidth['copy_gb_per_s']:.1f}; the faster sets the floor)" if "gb_per_s" in bandwidth
               else f"error: {bandwidth.get('error')}")
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    memory_method = next((r["memory_method"] for r in rows if r.get("memory_method")), "not measured")
    lines = [
        f"# Tensor-product microbenchmark ({cfg['name']})",
        "",
        f"- machine: {common.machine_line(meta)}",
        f"- device: {meta['device']}, dtype {cfg['dtype']}, tdn path set {cfg['paths']!r}",
        f"- date: {meta['date']}; commit {git['commit']}{' (uncommitted changes)' if git.get('dirty') else ''}",
        f"- versions: {versions}",
        f"- backends registered: {', '.join(meta['backends_registered'])}; cuEquivariance: {meta['cueq_status']}",
        f"- timing: {meta['timing']}; warm-up {cfg['warmup']}, reps {cfg['reps']} (max {cfg['max_seconds']} s)",
        f"- peak memory: {memory_method}",
        *load_line(meta),
        f"- copy bandwidth (clone of {common.fmt_bytes(bandwidth.get('bytes'))}): {bw_text}",
        *[f"- {n}" for n in notes],
        "",
        "## Speed-up vs e3nn, forward + backward",
        "",
        summary_table(rows, "speedup_fwdbwd"),
        "",
        "## Speed-up vs e3nn, forward",
        "",
        summary_table(rows, "speedup_fwd"),
        "",
        *cpu_time_section(rows),
        "## Targets",
        "",
        targets_section(result.get("targets", [])),
        "",
    ]
    for c in cells_of(rows):
        table = common.markdown_table(DETAIL_HEADER, [detail_row(r) for r in rows if cell_of(r) == c])
        lines += [f"## {c.label}", "", table, ""]
    lines += ["## Columns", "", *[f"- {line}" for line in COLUMN_NOTES], ""]
    return "\n".join(lines)


COLUMN_NOTES = (
    "e3nn uvu / cuEq uvu: the reference as MACE builds its convolution — every path with l_out <= L of either "
    "parity (odd-parity outputs included, which MACE's next linear layer drops), one output irrep per path. "
    "tdn rows use the path set above (\"o3\": only even l1+l2+l3), so e3nn computes more paths than they do.",
    "x e3nn: e3nn time / row time in the same cell and run. Forward runs with inputs that require grad (the graph is "
    "recorded); fwd+bwd adds autograd.grad of all three inputs for a random output gradient.",
    "rel err vs CG: |out - exact| / |exact| in float64 against the exact CG map with the SAME weight mode "
    "(e3nn: its per-path outputs, summed per l_out with tdn's normalisation, vs the exact so3 per-path map; "
    "cp: its CP fit error). Gaunt backends compute a different bilinear map (Gaunt path weights): "
    "\"n/a vs CG; x vs Gaunt\" gives their error against the exact Gaunt tensor.",
    "equiv err: max |f(Dx, Dy, w) - D f(x, y, w)| / max |f| for a seeded rotation R (and -R where parity is a "
    "symmetry), in float32 and float64, at the accuracy size (E and C below).",
    "paths / w/ch: paths of the row's path set and free weights per channel (P). couplings represented: paths found "
    "by projecting the row's effective coupling tensor (all weights 1) onto the Wigner-3j blocks; shared-weight rows "
    "fix the ratios between paths (CG or Gaunt), and any part outside every 3j block is the non-CG residual.",
    "rank / width: cp's CP rank R and fit error of M; Q: the grid's number of quadrature points (its inner width).",
    "I/O floor: bytes an ideal fused kernel must move (inputs, output, and tables/factors; for fwd+bwd also the "
    "output gradient, the inputs again and one gradient per input) / the measured copy bandwidth. A DRAM floor: "
    "where the operands fit in the CPU's last-level cache (small E) a time can beat it.",
    "peak mem: extra memory at the peak of one call (method above). Errors (OOM, failures) are recorded per cell.",
)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str, notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``name``.json, .md and (unless plotting fails) .png to ``out_dir``; returns their paths."""
    cfg = result["meta"]["config"]
    notes = list(notes) + [f"accuracy size: E={cfg['accuracy_edges']}, C={cfg['accuracy_channels']} "
                           "(the maps are channel-wise, so errors do not depend on C)"]
    if torch.device(cfg["device"]).type != "cuda":
        why = "" if torch.cuda.is_available() else " (no GPU was available to this run)"
        notes.append("CPU run: GPU figures (E = 100,000, the (L, C) pairs of ../shared/BENCHMARKS.md) are still to be "
                     f"measured with `--device cuda`{why}; the targets below are GPU targets.")
    paths = {"json": common.write_json(out_dir / f"{name}.json", result),
             "md": common.write_text(out_dir / f"{name}.md", markdown_report(result, notes))}
    plot, err = common.attempt(lambda: write_plot(result, out_dir / f"{name}.png"), "cpu")
    if plot is not None:
        paths["png"] = plot
    else:
        print(f"plot failed: {err}", file=sys.stderr)
    return paths
