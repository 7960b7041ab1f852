"""Report of the accuracy benchmark (:mod:`tdn.bench.accuracy`): the results and target tables, the plot, the JSON,
markdown and PNG files of a table, and its section of the published accuracy page. The page-section and figure helpers
serve the expressivity report too.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType
from typing import Any

from . import common
from .accuracy_protocol import MACE_PAPER, TARGET_RATIO, evaluate_targets


def fmt_fixed(value: Any, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals, or "—" when it is missing or not a finite number."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def results_table(result: dict[str, Any]) -> str:
    """One line per run and test set: errors, parameters, epochs and times."""
    header = ["dataset", "test", "backend (weights)", "E MAE meV", "F MAE meV/Å", "E/atom MAE meV", "E RMSE meV",
              "F RMSE meV/Å",
              "MACE paper E / F MAE", "params", "epochs / steps", "fit wall s", "run wall s", "run CPU s"]
    body = []
    for r in result["rows"]:
        if "error" in r:
            body.append([r["dataset"], "—", r["backend"], f"failed: {r['error'][:120]}", *[""] * 10])
            continue
        weights = r.get("tp", {}).get("weights", "")
        rank = r.get("tp", {}).get("cp_ranks")
        label = f"{r['backend']} ({weights}{', R=' + '/'.join(map(str, rank)) if rank else ''})"
        if r.get("seed", 0):
            label += f", seed {r['seed']}"
        for test, t in r["tests"].items():
            ref = MACE_PAPER.get(r["dataset"]) if r["table"] == "rmd17" else None
            body.append([
                r["dataset"], test, label, fmt_fixed(t.get("energy_mae_meV")), fmt_fixed(t.get("forces_mae_meV_A")),
                fmt_fixed(t.get("energy_per_atom_mae_meV"), 2), fmt_fixed(t.get("energy_rmse_meV")),
                fmt_fixed(t.get("forces_rmse_meV_A")),
                f"{ref[0]} / {ref[1]}" if ref else "—", r["params"], f"{r.get('epochs')} / {r.get('steps')}",
                fmt_fixed(r.get("fit_wall_s"), 0), f"{r['train_wall_s']:.0f}", f"{r['train_cpu_s']:.0f}",
            ])
    return common.markdown_table(header, body)


def _spread(values: dict[int, float]) -> str:
    if len(values) < 2:
        return "—"
    return f"{min(values.values()):.1f}–{max(values.values()):.1f} ({len(values)} seeds)"


def targets_section(result: dict[str, Any]) -> list[str]:
    """The target check as markdown lines (none for tables other than rMD17)."""
    targets = result.get("targets") or evaluate_targets(result)
    if not targets:
        return []
    body = [[t["molecule"], fmt_fixed(t["cg"]), fmt_fixed(t["cp"]), f"{t['ratio']:.2f}",
             "PASS" if t["pass"] else "FAIL",
             f"{t['cp_vs_cg_shared']:.2f}" if "cp_vs_cg_shared" in t else "—",
             f"{t['cp_degree_vs_cg']:.2f}" if "cp_degree_vs_cg" in t else "—",
             _spread(t["cg_seeds"]), _spread(t["cp_seeds"]),
             f"{t['ratio_of_means']:.2f}" if "ratio_of_means" in t else "—",
             f"{t['degree_ratio_of_means']:.2f}" if "degree_ratio_of_means" in t else "—"] for t in targets]
    verdict = "met" if all(t["pass"] for t in targets) else "NOT met"
    degree_means = [t["degree_ratio_of_means"] for t in targets if "degree_ratio_of_means" in t]
    degree_line = []
    if degree_means:
        within = sum(r <= TARGET_RATIO for r in degree_means)
        degree_line = [
            f"With one weight per output degree (cp-degree) the ratio of seed means is ≤ {TARGET_RATIO:.2f} on "
            f"{within}/{len(degree_means)} molecules (range {min(degree_means):.2f}–{max(degree_means):.2f}).",
            "",
        ]
    return [
        "## Target: cp force MAE within 10% of cg at equal budget",
        "",
        f"On the molecules run here the target is **{verdict}** at this budget, seed 0 "
        f"({sum(t['pass'] for t in targets)}/{len(targets)} molecules). cp / cg-shared: against the exact map cp "
        "approximates (same path-weight sharing), which separates the CP approximation from the loss of per-path "
        "weights; cp-degree / cg: cp with one weight per output degree. The seed spread (initialisation, data order "
        "and train/val split) says how much of a ratio is noise.",
        "",
        common.markdown_table(["molecule", "cg F MAE", "cp F MAE", "cp / cg", f"≤ {TARGET_RATIO:.2f}",
                               "cp / cg-shared", "cp-degree / cg", "cg over seeds", "cp over seeds",
                               "cp / cg, seed means", "cp-degree / cg, seed means"], body),
        "",
        *degree_line,
    ]


def budget_lines(result: dict[str, Any]) -> list[str]:
    """The budget, the protocol of every dataset and the meaning of the columns, as markdown list items."""
    b = result["budget"]
    lines = [
        f"- budget `{b['name']}`: {b['steps']} optimiser steps of {b['batch_size']} structures, rounded up to "
        "whole epochs, for every backend (epochs per dataset below), `conf/experiment/accuracy_cpu.yaml` (small "
        "MACE-like model: 16 channels, hidden l ≤ 1, spherical harmonics l ≤ 2, correlation 2, 2 layers, radial MLP "
        "32×32, float32, Adam(AMSGrad) lr 0.01, EMA 0.99, loss energy-per-atom 1 + forces 10 (MSE)); "
        f"torch threads {b['threads']}; device CPU",
    ]
    if b.get("overrides"):
        lines.append(f"- extra overrides: `{' '.join(b['overrides'])}`")
    if b.get("max_train"):
        lines.append(f"- at most {b['max_train']} training structures; at most {b.get('test_limit')} test structures")
    for d in result["datasets"]:
        lines.append(f"- {d['name']}: {d['protocol']}; {d['train_frames']} training structures, {d['epochs']} epochs")
    lines.append("- columns: fit wall = `trainer.fit` (training + validation); run wall / CPU = the whole run "
                 "(statistics, fit, test, export) in wall and process-CPU seconds; params = trainable parameters")
    lines.append("- this is **not** the MACE-paper recipe (256 channels, l ≤ 3, correlation 3, ~2000 epochs on a GPU): "
                 "absolute errors are far above the published ones; the table compares backends at one small budget")
    return lines


def markdown_report(result: dict[str, Any], name: str, command: str) -> str:
    """The full markdown report of a table."""
    meta = result["meta"]
    git = meta["git"]
    lines = [
        f"# Accuracy on real DFT data: {result['table']}",
        "",
        f"- machine: {common.machine_line(meta)} (shared with other jobs: wall times are noisy, CPU times less so)",
        f"- date: {meta['date']}; commit {git['commit'][:12]}{' (dirty tree)' if git.get('dirty') else ''}; "
        f"torch {meta['versions']['torch']}, lightning {meta['versions'].get('lightning')}",
        f"- command: `{command}`",
        *budget_lines(result),
        "- one run = `tdn-train "
        + " ".join(_shown(o, result.get("data_root")) for o in result["rows"][0].get("overrides", []))
        + "` (per row: "
        "its dataset and `tp=`); errors on the exported model (EMA weights of the best validation epoch)"
        if result["rows"] and "overrides" in result["rows"][0] else "",
        "",
        f"![accuracy]({name}.png)",
        "",
        results_table(result),
        "",
        *targets_section(result),
    ]
    return "\n".join(lines)


def _shown(override: str, data_root: str | None) -> str:
    """Overrides with the data root shortened to ``<data-root>`` for the report."""
    return override.replace(data_root, "<data-root>") if data_root else override


def write_plot(result: dict[str, Any], path: Path) -> Path:
    """Test errors per dataset and backend (bars: seed 0, dots: other seeds) and the learning curves of seed 0."""
    plt = pyplot()
    rows = [r for r in result["rows"] if "error" not in r]
    groups = []  # (dataset, test)
    for r in rows:
        for test in r["tests"]:
            if (r["dataset"], test) not in groups:
                groups.append((r["dataset"], test))
    variants = [v for v in result["variants"] if any(r["backend"] == v for r in rows)]
    curves = [r for r in rows if r.get("seed", 0) == 0 and len(r.get("val_curve", [])) >= 3]
    panels = 3 if curves else 2
    fig, axes = plt.subplots(1, panels, figsize=(max(8, 2.2 * len(groups) + 4) + 5 * (panels - 2), 5), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, key, unit in ((axes[0][0], "forces_mae_meV_A", "force MAE (meV/Å)"),
                          (axes[0][1], "energy_mae_meV", "energy MAE (meV)")):
        for k, v in enumerate(variants):
            xs = [g + (k - (len(variants) - 1) / 2) * width for g in range(len(groups))]
            ys, others = [], []  # bars: seed 0; dots: other seeds
            for x, (ds, test) in zip(xs, groups):
                sel = [r for r in rows if r["dataset"] == ds and r["backend"] == v]
                first = next((r for r in sel if r.get("seed", 0) == 0), sel[0] if sel else None)
                ys.append(first["tests"].get(test, {}).get(key, math.nan) if first else math.nan)
                others += [(x, r["tests"].get(test, {}).get(key, math.nan)) for r in sel if r is not first]
            ax.bar(xs, ys, width, label=v)
            if others:
                ax.plot(*zip(*others), "k.", ms=5, label="other seeds" if k == 0 else None)
        if result["table"] == "rmd17":
            idx = 1 if key.startswith("forces") else 0
            for g, (ds, _) in enumerate(groups):
                if ds in MACE_PAPER:
                    ax.plot([g - 0.4, g + 0.4], [MACE_PAPER[ds][idx]] * 2, "k--", lw=1,
                            label="MACE paper (GPU recipe)" if g == 0 else None)
        ax.set_xticks(range(len(groups)), [f"{ds}\n{test}" for ds, test in groups], fontsize=8)
        ax.set_ylabel(unit)
        ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    if curves:  # learning curves: validation force MAE per epoch
        ax = axes[0][2]
        for r in curves:
            ax.plot([p["step"] for p in r["val_curve"]], [p["val_forces_mae_meV_A"] for p in r["val_curve"]], "o-",
                    ms=3, label=f"{r['dataset']} {r['backend']}")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("validation force MAE (meV/Å)")
        ax.set_yscale("log")
        ax.set_title("learning curves (seed 0)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    fig.suptitle(f"{result['table']}: test errors at budget '{result['budget']['name']}' "
                 f"({result['budget']['steps']} steps)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_figure(fig, path)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str, command: str | None = None) -> dict[str, Path]:
    """Write ``name``.json, .png (when there are rows) and .md to ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    command = command or result.get("command") or f"python scripts/bench_accuracy.py {result['table']}"
    result["command"] = command
    paths = {"json": common.write_json(out_dir / f"{name}.json", result)}
    if result["rows"]:
        paths["png"] = write_plot(result, out_dir / f"{name}.png")
    paths["md"] = common.write_text(out_dir / f"{name}.md", markdown_report(result, name, command))
    return paths


def update_doc_section(doc: Path | None, name: str, text: str) -> bool:
    """Replace the block between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` of ``doc`` (docs/accuracy.md)
    with ``text``; nothing happens when the file or the markers are absent. Returns whether it was replaced."""
    if doc is None or not Path(doc).is_file():
        return False
    content = Path(doc).read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    Path(doc).write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True


def report_written(written: dict[str, Path], doc: Path | None, name: str, block: str) -> None:
    """Print the files written, and put ``block`` in the ``name`` section of ``doc`` (the published accuracy page,
    given with ``--doc``)."""
    print("wrote " + ", ".join(str(p) for p in written.values()), flush=True)
    if update_doc_section(doc, name, block):
        print(f"updated the {name} section of {doc}", flush=True)


def doc_block(result: dict[str, Any], name: str) -> str:
    """What docs/accuracy.md shows of a table: provenance, the results and the target check."""
    meta = result["meta"]
    return "\n".join([
        f"`{result['command']}` — {meta['date']}, commit {meta['git']['commit'][:12]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}, {common.machine_line(meta)}; "
        f"full report: [benchmarks/{name}.md](benchmarks/{name}.md)",
        "",
        f"![{name}](benchmarks/{name}.png)",
        "",
        results_table(result),
        "",
        *targets_section(result),
    ])

