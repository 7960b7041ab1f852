"""Tables and plots of the learning curves (:mod:`.curves`): error against compute, one file set per dataset and size.

Per variant: the final test errors (EMA weights of the best validation epoch, mean and range over seeds), the
training compute (:data:`CLOCKS`: process CPU seconds of the training steps on a CPU, their wall seconds on a GPU),
the test force error at equal compute (the smallest compute of any run of the table), and the compute and steps each
needed to reach ``REACH`` times cg's final force error. Both read the curve between snapshots log-log linearly. The
plot draws test force error against that compute and against optimiser steps, the mean over seeds with their range.

A table whose step costs were timed (``step_costs``: one training step of each variant, timed in turn with the code
of that day) gets the same two figures on a second compute axis, steps x step cost: free of the load the runs shared
the machine with, and current when the code gets faster (the curves against steps do not change with it).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, NamedTuple

from . import common
from .accuracy_report import fmt_fixed, pyplot, save_figure

REACH = 1.5  # "time to reach 1.5x cg's final error"
ORDER = ("cg", "cg-shared", "cp", "cp-degree", "cp-inout", "gaunt", "grid", "grid-inout")


class Clock(NamedTuple):
    """Where the compute of a table's runs is read: a curve point's ``key``, its ``unit``, the plot's ``axis`` label
    and what it counts (``what``, for the report)."""

    key: str
    unit: str
    axis: str
    what: str


# A CPU run counts its process CPU seconds (steadier on a shared machine than the wall clock); a GPU run the wall
# seconds of its steps (the GPU's time: the host waits on it, and its CPU seconds would count only the launches).
CLOCKS = {
    "cpu": Clock("train_cpu_s", "CPU s", "training CPU seconds (one thread)",
                 "process CPU seconds of the training steps (forward, backward, optimiser; one thread)"),
    "cuda": Clock("train_wall_s", "GPU s", "training GPU seconds (wall clock)",
                  "wall seconds of the training steps on the GPU (forward, backward, optimiser)"),
}  # fmt: skip


def clock(device: str) -> Clock:
    """The :class:`Clock` of runs on ``device`` (:data:`CLOCKS`)."""
    if device not in CLOCKS:
        raise ValueError(f"no training clock for device {device!r}; choose from {sorted(CLOCKS)}")
    return CLOCKS[device]


def table_clock(table: dict[str, Any]) -> Clock:
    """The clock of a curve table (tables written before devices were recorded ran on the CPU)."""
    return clock(table.get("device", "cpu"))


def runs_by_variant(table: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Finished runs of the table grouped by variant (in :data:`ORDER`), seeds sorted."""
    out: dict[str, list[dict[str, Any]]] = {}
    for record in table.get("runs", {}).values():
        if "error" not in record and record.get("points"):
            out.setdefault(record["variant"], []).append(record)
    rank = {v: i for i, v in enumerate(ORDER)}
    return {v: sorted(out[v], key=lambda r: r["seed"]) for v in sorted(out, key=lambda v: (rank.get(v, 99), v))}


def mean_curve(records: list[dict[str, Any]], x: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean ``x`` and mean / min / max test force error over seeds, at the epochs every seed has."""
    epochs = sorted(set.intersection(*({p["epoch"] for p in r["points"]} for r in records)))
    xs, mean, low, high = [], [], [], []
    for epoch in epochs:
        points = [next(p for p in r["points"] if p["epoch"] == epoch) for r in records]
        errors = [p["test_forces_mae_meV_A"] for p in points]
        xs.append(statistics.fmean(p[x] for p in points))
        mean.append(statistics.fmean(errors))
        low.append(min(errors))
        high.append(max(errors))
    return xs, mean, low, high


def final_force(record: dict[str, Any]) -> float:
    """The run's final test force MAE: the exported model's (best validation epoch), else its last snapshot's."""
    return record.get("final", {}).get("forces_mae_meV_A") or record["points"][-1]["test_forces_mae_meV_A"]


def _between(a: float, b: float, t: float) -> float:
    """``t`` of the way from ``a`` to ``b`` on a log scale (linear where a value is not positive)."""
    return math.exp(math.log(a) + t * (math.log(b) - math.log(a))) if min(a, b) > 0 else a + t * (b - a)


def reached(points: list[dict[str, Any]], target: float, key: str) -> dict[str, float] | None:
    """Compute (``key``) and steps at which the test force MAE first reaches ``target``: interpolated log-log between
    the two snapshots around the crossing (the curves are straight-ish there), the first snapshot itself if it is
    already at or below; None if no snapshot is."""
    previous = None
    for point in points:
        error = point["test_forces_mae_meV_A"]
        if error <= target:
            if previous is None:
                return {key: point[key], "step": point["step"]}
            before = previous["test_forces_mae_meV_A"]
            t = math.log(before / target) / math.log(before / error) if before > error else 1.0
            return {k: _between(previous[k], point[k], t) for k in (key, "step")}
        previous = point
    return None


def error_at(points: list[dict[str, Any]], seconds: float, key: str) -> float | None:
    """The test force MAE after ``seconds`` of compute (``key``), interpolated log-log between the snapshots around
    it; None outside the curve."""
    for a, b in zip(points, points[1:]):
        if a[key] <= seconds <= b[key]:
            t = math.log(seconds / a[key]) / math.log(b[key] / a[key]) if b[key] > a[key] > 0 else 1.0
            return _between(a["test_forces_mae_meV_A"], b["test_forces_mae_meV_A"], t)
    last = points[-1] if points else None  # its own end, as computed on another axis (round-off)
    return last["test_forces_mae_meV_A"] if last is not None and math.isclose(last[key], seconds) else None


def summary(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: seeds, final errors, compute, the compute to reach REACH x cg's final force error, and
    the force error at equal compute (the smallest training compute of any run of the table: every curve covers it).
    """
    groups = runs_by_variant(table)
    key = table_clock(table).key
    cg = [final_force(r) for r in groups.get("cg", [])]
    target = REACH * statistics.fmean(cg) if cg else None
    equal = min((r["points"][-1][key] for records in groups.values() for r in records), default=None)
    costs = table.get("step_costs", {}).get("ms", {})  # variant -> ms per step, timed in turn
    timed_equal = min((r["points"][-1]["step"] * costs[v] / 1e3 for v, records in groups.items() if v in costs
                       for r in records), default=None)  # fmt: skip
    rows = []
    for variant, records in groups.items():
        forces = [final_force(r) for r in records]
        energies = [r.get("final", {}).get("energy_mae_meV") for r in records]
        seconds = [r["points"][-1][key] for r in records]
        steps = [r["points"][-1]["step"] for r in records]
        row: dict[str, Any] = {
            "variant": variant, "seeds": [r["seed"] for r in records], "params": records[0].get("params"),
            "forces_mae": statistics.fmean(forces), "forces_range": (min(forces), max(forces)),
            "energy_mae": statistics.fmean(e for e in energies if e is not None) if any(energies) else None,
            "train_s": statistics.fmean(seconds), "ms_per_step": 1e3 * sum(seconds) / sum(steps),
            "vs_cg": statistics.fmean(forces) / statistics.fmean(cg) if cg else None,
            "equal_s": equal,
        }
        at_equal = [error_at(r["points"], equal, key) for r in records]  # None where a curve starts later
        row["forces_at_equal"] = None if None in at_equal else statistics.fmean(at_equal)
        if target is not None:
            hits = [reached(r["points"], target, key) for r in records]
            row["reach_target"] = target
            row["reach_all"] = all(h is not None for h in hits)
            row["reach_s"] = statistics.fmean(h[key] for h in hits) if row["reach_all"] else None
            row["reach_step"] = statistics.fmean(h["step"] for h in hits) if row["reach_all"] else None
        if variant in costs:
            row.update(timed_cost(records, costs[variant], timed_equal, row.get("reach_step")))
        rows.append(row)
    return rows


def timed_cost(records: list[dict[str, Any]], ms: float, equal_s: float, reach_step: float | None) -> dict[str, Any]:
    """The figures of the steps x step cost axis: the step cost ``ms``, the test force error after ``equal_s``
    seconds (``equal_s / ms`` steps, read between snapshots) and the seconds to the target (``reach_step`` steps)."""
    at_equal = [error_at(r["points"], 1e3 * equal_s / ms, "step") for r in records]
    return {"step_ms": ms, "timed_equal_s": equal_s,
            "forces_at_timed_equal": None if None in at_equal else statistics.fmean(at_equal),
            "timed_reach_s": None if reach_step is None else reach_step * ms / 1e3}  # fmt: skip


def results_table(table: dict[str, Any]) -> str:
    rows = summary(table)
    unit = table_clock(table).unit
    target = next((r["reach_target"] for r in rows if r.get("reach_target")), None)
    reach = f"to {REACH:g}x cg final ({fmt_fixed(target)} meV/Å)" if target else f"to {REACH:g}x cg final"
    equal = f"test F MAE at {rows[0]['equal_s']:.0f} {unit} (equal compute)" if rows else "at equal compute"
    header = ["variant", "seeds", "params", "test F MAE meV/Å (range)", "vs cg", "test E MAE meV", f"training {unit}",
              f"{unit.split()[0]} ms / step", equal, f"{unit} {reach}", "steps " + reach.split(" (")[0]]
    timed = next((r for r in rows if "step_ms" in r), None)
    if timed:
        short = reach.split(" (")[0]
        header += [f"timed {unit.split()[0]} ms / step", f"test F MAE at {timed['timed_equal_s']:.0f} {unit} (timed)",
                   f"timed {unit} {short}"]
    lines = []
    for r in rows:
        low, high = r["forces_range"]
        spread = f" ({fmt_fixed(low)}–{fmt_fixed(high)})" if len(r["seeds"]) > 1 else ""
        lines.append([
            r["variant"], ",".join(map(str, r["seeds"])), r["params"], fmt_fixed(r["forces_mae"]) + spread,
            common.fmt_ratio(r["vs_cg"]), fmt_fixed(r["energy_mae"], 2), f"{r['train_s']:.0f}",
            f"{r['ms_per_step']:.1f}", fmt_fixed(r["forces_at_equal"]),
            reach_cell(r, "reach_s"), reach_cell(r, "reach_step"),
        ])
        if timed:
            lines[-1] += ["—"] * 3 if "step_ms" not in r else [
                f"{r['step_ms']:.1f}", fmt_fixed(r["forces_at_timed_equal"]), reach_cell(r, "timed_reach_s")]
    return common.markdown_table(header, lines)


def reach_cell(row: dict[str, Any], key: str) -> str:
    """A summary row's compute or steps to the target: "—" without a target, "not reached" when a seed missed it."""
    if "reach_all" not in row:
        return "—"
    return f"{row[key]:.0f}" if row["reach_all"] else "not reached"


def markdown_report(table: dict[str, Any], name: str) -> str:
    meta = table.get("meta", {})
    machine = common.machine_line(meta) if meta else "unknown machine"
    load = meta.get("machine", {}).get("load_average")
    records = [r for r in table.get("runs", {}).values() if "error" not in r]
    protocol = records[0].get("protocol", "") if records else ""
    failed = [f"- {key}: {r['error']}" for key, r in sorted(table.get("runs", {}).items()) if "error" in r]
    return "\n".join([
        f"# Learning curves: {table.get('dataset')}, {table.get('size')} model, {table.get('steps')} optimiser steps, "
        f"{table.get('schedule', 'plateau')} schedule",
        "",
        f"- command: `{table.get('command', '')}`",
        f"- machine: {machine}; 1-min load average at the last write: "
        f"{', '.join(f'{x:.1f}' for x in load[:1]) if load else '—'} (runs share the machine: two at a time)",
        f"- date of the last write: {meta.get('date')}; commit {meta.get('git', {}).get('commit', '')[:12]}"
        f"{' (dirty)' if meta.get('git', {}).get('dirty') else ''}",
        f"- data: {protocol}",
        f"- compute: {table_clock(table).what}, from the run's training clock; validation, snapshots and evaluation "
        "excluded",
        *([step_costs_line(table)] if table.get("step_costs") else []),
        "- test errors: EMA weights; 'final' is the exported model (best validation epoch), the curve points are "
        "snapshots after geometrically spaced epochs; the error at equal compute and the compute to reach the target "
        "are read between snapshots (log-log linear)",
        "",
        f"![{name}]({name}.png)",
        "",
        results_table(table),
        "",
        *(["Failed runs:", *failed, ""] if failed else []),
    ])


def step_costs_line(table: dict[str, Any]) -> str:
    """The report's account of the timed step costs (the second compute axis)."""
    costs = table["step_costs"]
    meta = costs.get("meta", {})
    git = meta.get("git", {})
    failed = "".join(f"; {v} not timed: {e}" for v, e in costs.get("errors", {}).items())
    return (f"- timed compute: steps x the cost of one training step (energy and forces in the loss, backward, "
            f"Adam) of each variant, timed in turn ({costs.get('reps')} rounds, median) on a batch of the dataset "
            f"({costs.get('structures')} structures, {costs.get('atoms')} atoms, {costs.get('edges')} edges) with the "
            f"code of commit {git.get('commit', '')[:12]}{' (dirty)' if git.get('dirty') else ''}, "
            f"{meta.get('date')}{failed}")


def write_plot(table: dict[str, Any], path: Path) -> Path | None:
    groups = runs_by_variant(table)
    if not groups:
        return None
    key, _, axis, _ = table_clock(table)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for variant, records in groups.items():
        for ax, x in zip(axes, (key, "step")):
            xs, mean, low, high = mean_curve(records, x)
            line, = ax.plot(xs, mean, marker="o", ms=3, label=f"{variant} ({len(records)} seed"
                            f"{'s' if len(records) > 1 else ''})")
            if len(records) > 1:
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
    rows = summary(table)
    target = next((r["reach_target"] for r in rows if r.get("reach_target")), None)
    for ax, label in zip(axes, (axis, "optimiser steps")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if target is not None and math.isfinite(target):
            ax.axhline(target, color="grey", ls="--", lw=1)
    axes[0].set_ylabel("test force MAE (meV/Å)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{table.get('dataset')}, {table.get('size')} model: test force error against compute"
                 + (f" (dashed: {REACH:g}x cg's final)" if target else ""), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def doc_block(table: dict[str, Any], name: str) -> str:
    """What docs/accuracy.md shows of a curve table: provenance, the plot and the summary table."""
    meta = table.get("meta", {})
    git = meta.get("git", {})
    return "\n".join([
        f"`{table.get('command', '')}` — last write {meta.get('date')}, commit {git.get('commit', '')[:12]}"
        f"{' (dirty tree)' if git.get('dirty') else ''}, {common.machine_line(meta) if meta else ''}; "
        f"full report: [benchmarks/{name}.md](benchmarks/{name}.md)",
        "",
        f"![{name}](benchmarks/{name}.png)",
        "",
        results_table(table),
    ])


def write_outputs(table: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    """``name``.json, .md and .png in ``out_dir``."""
    table["summary"] = summary(table)
    paths = {"json": common.write_json(Path(out_dir) / f"{name}.json", table)}
    png = write_plot(table, Path(out_dir) / f"{name}.png")
    if png is not None:
        paths["png"] = png
    paths["md"] = common.write_text(Path(out_dir) / f"{name}.md", markdown_report(table, name))
    return paths
