"""Report of the expressivity benchmark (:mod:`tdn.bench.expressivity`): the per-backend, "cannot represent", CP
curve and summary tables, the plot, the JSON, markdown and PNG files, and the section of the published accuracy page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import common
from .accuracy_report import pyplot, save_figure
from .expressivity_probe import BACKENDS, CANNOT, PATH_SETS


def _sci(value: Any) -> str:
    return common.fmt_sci(value) if isinstance(value, float) else "—"


def _weights_cell(row: dict[str, Any]) -> str:
    parts = []
    for mode, p in row["weights_per_channel"].items():
        bold = "**" if mode == row["model_weights"] else ""
        parts.append(f"{bold}{mode} {p}{bold}")
    return ", ".join(parts)


def backend_table(rows: list[dict[str, Any]]) -> str:
    """The per-backend, per-L table of the full report."""
    header = ["backend", "paths", "L", "equiv. f32", "equiv. f64", "parity f64", "vs CG M",
              "vs CG M (best scale/degree)", "vs Gaunt G", "paths held (odd) / in set", "non-CG residual",
              "weights/channel (model default bold)", "rank"]
    body = []
    for r in rows:
        if "equiv_f64" not in r:
            extra = ""
            if "odd_fraction" in r:
                extra = (f"unsupported: the odd paths hold {r['odd_fraction']:.0%} of ‖M_so3‖; Gaunt map at best "
                         f"{r['dist_M_degree']:.2f} from M_so3 (per-degree scale)")
            body.append([r["backend"], r["paths"], r["lmax"], extra or r.get("status", "—"), "", "", "", "", "", "", "",
                         _weights_cell(r), ""])
            continue
        rank = r.get("rank", "—")
        if r["backend"] == "cp" and r.get("note"):
            rank = f"{rank} (7L²)"
        body.append([
            r["backend"], r["paths"], r["lmax"], _sci(r["equiv_f32"]), _sci(r["equiv_f64"]), _sci(r.get("parity_f64")),
            _sci(r["dist_M"]), f"{_sci(r['dist_M_scale'])} / {_sci(r['dist_M_degree'])}", _sci(r["dist_G"]),
            f"{r['paths_active']} ({r['paths_active_odd']}) / {r['num_paths']}", _sci(r["non_cg_residual"]),
            _weights_cell(r), rank,
        ])
    return common.markdown_table(header, body)


def cannot_table(rows: list[dict[str, Any]], lmaxes: Sequence[int]) -> str:
    """Per backend: which couplings it cannot represent, with the numbers at each L."""
    body = []
    for kind in BACKENDS:
        cells = []
        for L in lmaxes:
            o3 = next((r for r in rows if r["backend"] == kind and r["lmax"] == L and r["paths"] == "o3"), None)
            so3 = next((r for r in rows if r["backend"] == kind and r["lmax"] == L and r["paths"] == "so3"), None)
            if kind == "cg":
                cells.append("0 / 0")
            elif kind == "cp":
                errors = [r.get("fit_error") if r else None for r in (o3, so3)]
                cells.append(f"{_sci(errors[0])} / {_sci(errors[1])}")
            else:
                deg = o3.get("dist_M_degree") if o3 else None
                odd = so3.get("odd_fraction") if so3 else None
                cells.append(f"{_sci(deg)} / odd {odd:.0%}" if odd is not None else _sci(deg))
        body.append([kind, CANNOT[kind], *cells])
    return common.markdown_table(["backend", "cannot represent", *[f"L={L}" for L in lmaxes]], body)


def curve_table(result: dict[str, Any]) -> str:
    """The CP rank-vs-error fits and the shipped factors per path set and L."""
    rows = result.get("cp_curve", [])
    shipped = result.get("cp_shipped", [])
    body = []
    for paths in PATH_SETS:
        for L in sorted({r["lmax"] for r in rows if r["paths"] == paths}):
            fits = sorted((r for r in rows if r["paths"] == paths and r["lmax"] == L), key=lambda r: r["rank"])
            ship = {s["kind"]: s for s in shipped if s["paths"] == paths and s["lmax"] == L}
            tol = ship.get("tol")
            paper = ship.get("paper")
            body.append([
                paths, L, 7 * L * L,
                f"{paper['rel_error']:.1e}" if paper else "not shipped",
                f"{tol['rank']} ({tol['rel_error']:.1e})" if tol else "not shipped",
                ", ".join(f"{r['rank']}: {r['rel_error']:.1e}" for r in fits),
            ])
    return common.markdown_table(
        ["paths", "L", "7L²", "shipped error at 7L²", "shipped tol-1e-4 rank (error)", "fits here, rank: error"], body)


def write_plot(result: dict[str, Any], path: Path) -> Path:
    """Rank-vs-error of the CP fit (one panel per path set, x = R / L² so that 7L² is x = 7) and the equivariance
    error per backend and L."""
    plt = pyplot()
    curve, shipped, rows = result.get("cp_curve", []), result.get("cp_shipped", []), result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, paths in zip(axes[:2], PATH_SETS):
        for i, L in enumerate(sorted({r["lmax"] for r in curve})):
            color = colors[i % len(colors)]
            fits = sorted((r for r in curve if r["paths"] == paths and r["lmax"] == L), key=lambda r: r["rank"])
            if fits:  # dots: each fit; line: the best error known at rank <= R (a zero term pads a fit)
                ax.plot([r["rank"] / L**2 for r in fits], [max(r["rel_error"], 1e-16) for r in fits], "o",
                        color=color, ms=4)
                envelope = np.minimum.accumulate([max(r["rel_error"], 1e-16) for r in fits])
                ax.plot([r["rank"] / L**2 for r in fits], envelope, "-", color=color, label=f"L={L}")
            for s in shipped:
                if s["paths"] == paths and s["lmax"] == L and s["kind"] in ("tol", "paper"):
                    tol = s["kind"] == "tol"
                    ax.plot(s["rank"] / L**2, max(s["rel_error"], 1e-16), "*" if tol else "s", color=color,
                            ms=11 if tol else 7, mfc=color if tol else "none")
        ax.axvline(7, color="k", ls="--", lw=1, label="7L² (TDN paper)")
        ax.axhline(1e-4, color="gray", ls=":", lw=1, label="tol 1e-4")
        ax.plot([], [], "k*", ms=10, label="shipped tol-1e-4 rank")
        ax.plot([], [], "ks", mfc="none", label="shipped 7L² fit")
        ax.set_yscale("log")
        ax.set_xlabel("rank R / L²")
        ax.set_ylabel("relative error ‖M − M̂‖ / ‖M‖")
        ax.set_title(f"CP fit of the path tensor M, paths={paths!r}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    lmaxes = sorted({r["lmax"] for r in rows})
    for i, (kind, paths) in enumerate([(k, p) for k in BACKENDS for p in PATH_SETS]):
        sel = [next((r for r in rows if r["backend"] == kind and r["paths"] == paths and r["lmax"] == L), None)
               for L in lmaxes]
        if not any(r and "equiv_f64" in r for r in sel):
            continue
        for tag, style in (("f64", "-"), ("f32", ":")):
            ys = [max(r[f"equiv_{tag}"], 1e-17) if r and "equiv_f64" in r else math.nan for r in sel]
            ax.plot(lmaxes, ys, style, marker="o", ms=3, color=colors[i % len(colors)], label=f"{kind} {paths} {tag}")
    ax.set_yscale("log")
    ax.set_xlabel("L")
    ax.set_ylabel("relative equivariance error")
    ax.set_title("equivariance error (max over rotations)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def sweep_budget(sweeps: Any) -> str:
    """The sweep budget of the fits in words."""
    if isinstance(sweeps, dict):
        return ", ".join(f"{v} at L={k}" for k, v in sweeps.items())
    return str(sweeps)


def markdown_report(result: dict[str, Any], name: str) -> str:
    """The full markdown report."""
    meta = result["meta"]
    git = meta["git"]
    lmaxes = sorted({r["lmax"] for r in result["rows"]})
    lines = [
        "# Equivariance and expressivity of the tensor-product backends",
        "",
        f"- machine: {common.machine_line(meta)}",
        f"- date: {meta['date']}; commit {git['commit'][:12]}{' (dirty tree)' if git.get('dirty') else ''}; "
        f"torch {meta['versions']['torch']}, e3nn {meta['versions'].get('e3nn')}",
        f"- command: `python scripts/bench_expressivity.py{' --quick' if result.get('quick') else ''}` "
        f"({result.get('backend_seconds', 0):.0f} s backends, {result.get('curve_seconds', 0):.0f} s CP fits)",
        "",
        "Every backend is probed with `weights=\"shared\"` (one weight per channel, all weights 1): its bilinear",
        "map `T` is compared with the exact CG path tensor `M` of the same path set and with the Gaunt tensor `G`",
        "(relative Frobenius distances). \"best scale/degree\": the distance left after the best global scale (what",
        "one weight per channel absorbs) and after the best scale per output degree (what `weights=\"degree\"`",
        "reaches).",
        "Equivariance: `max|tp(Dx, Dy, w) − D tp(x, y, w)| / max|tp(x, y, w)|`, max over "
        f"{result['config']['rotations']} seeded random rotations; parity: the same with the improper `−R` (o3 only).",
        "\"paths held\": Wigner-3j blocks holding > 1e-3 of ‖T‖; \"non-CG residual\": the part of `T` in no CG block.",
        "",
        "## Per backend and L",
        "",
        backend_table(result["rows"]),
        "",
        "## What each backend cannot represent",
        "",
        "Numbers per L: cg — none; cp — relative error of its factors for o3 / so3 (the shipped tol-1e-4 fit; at L",
        "where that is not shipped, the 7L² fit); gaunt/grid — distance of the Gaunt map from the o3 CG map after the",
        "best per-degree scales (the fixed relative path weights) / the share of ‖M_so3‖ in odd paths, which no Gaunt",
        "product can produce. Per-path weights (MACE's uvu product) exist only for cg.",
        "",
        cannot_table(result["rows"], lmaxes),
        "",
    ]
    if result.get("cp_curve"):
        lines += [
            "## CP rank vs error",
            "",
            f"![rank vs error]({name}.png)",
            "",
            "ALS fits at a handful of ranks per L (seeded; warm-started from the shipped factors truncated or padded",
            f"to the rank; at most {sweep_budget(result['config']['sweeps'])} sweeps",
            "— upper bounds of the best rank-R error). Shipped: the rank found by `scripts/fit_cp.py` for tol 1e-4 and",
            "its 7L² fit (9000 sweeps budget). Fits are cached in `expressivity_cp_fits.json`.",
            "",
            curve_table(result),
            "",
        ]
    return "\n".join(lines)


def _range(values: list[float]) -> str:
    values = [v for v in values if isinstance(v, float)]
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    if hi == lo or (lo > 0 and hi / lo < 1.1):
        return common.fmt_sci(hi)
    return f"{common.fmt_sci(lo)}–{common.fmt_sci(hi)}"


def _paths_cell(rows: list[dict[str, Any]]) -> str:
    text = "/".join(str(r["paths_active"]) for r in rows)
    if any(r["paths_active_odd"] for r in rows):
        text += " (odd " + "/".join(str(r["paths_active_odd"]) for r in rows) + ")"
    return text


def summary_table(rows: list[dict[str, Any]]) -> str:
    """One line per backend and path set, ranges over L: the condensed form for docs/accuracy.md."""
    lmaxes = sorted({r["lmax"] for r in rows})
    body = []
    for kind in BACKENDS:
        for paths in PATH_SETS:
            sel = [r for r in rows if r["backend"] == kind and r["paths"] == paths]
            if not sel:
                continue
            ok = [r for r in sel if "equiv_f64" in r and not r.get("note")]  # fallback factors: listed below
            weights = ", ".join(f"{m} {'L+1' if m == 'degree' else ('#paths' if m == 'path' else p)}"
                                for m, p in sel[0]["weights_per_channel"].items())
            if not ok:
                odd = [r["odd_fraction"] for r in sel if "odd_fraction" in r]
                body.append([kind, paths, "unsupported (ValueError)", "", "", "", "",
                             f"odd paths = {min(odd):.0%}–{max(odd):.0%} of ‖M_so3‖" if odd else "", weights,
                             CANNOT[kind]])
                continue
            body.append([
                kind, paths, _range([r["equiv_f32"] for r in ok]), _range([r["equiv_f64"] for r in ok]),
                _range([r["dist_M"] for r in ok]), _range([r["dist_M_degree"] for r in ok]),
                _range([r["dist_G"] for r in ok]),
                _paths_cell(ok),
                weights + f" (model: {sel[0]['model_weights']})", CANNOT[kind],
            ])
    header = ["backend", "paths", "equiv. f32", "equiv. f64", "vs CG M", "vs M, best per-degree scales", "vs Gaunt G",
              f"paths held, L={lmaxes[0]}..{lmaxes[-1]}", "weights / channel", "cannot represent"]
    return common.markdown_table(header, body)


def doc_block(result: dict[str, Any], name: str) -> str:
    """What the published accuracy page shows: provenance, the summary table, notes and the CP curve."""
    meta = result["meta"]
    notes = [r for r in result["rows"] if r.get("note")]
    lines = [
        f"`python scripts/bench_expressivity.py` — {meta['date']}, commit {meta['git']['commit'][:12]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}, {common.machine_line(meta)}; "
        f"full per-L table: [benchmarks/{name}.md](benchmarks/{name}.md). Ranges are over L = "
        f"{min(r['lmax'] for r in result['rows'])}..{max(r['lmax'] for r in result['rows'])}.",
        "",
        summary_table(result["rows"]),
        "",
    ]
    if notes:
        lines += [f"- not in the ranges above: cp {r['paths']} L={r['lmax']}: {r['note']} (rank {r.get('rank')}, fit "
                  f"error {r.get('fit_error', 0):.1e}, equivariance error {r['equiv_f64']:.1e})" for r in notes]
        lines.append("")
    if result.get("cp_curve"):
        lines += [f"![CP rank vs error](benchmarks/{name}.png)", "", curve_table(result), ""]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    """Write ``name``.json, .png and .md to ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": common.write_json(out_dir / f"{name}.json", result)}
    paths["png"] = write_plot(result, out_dir / f"{name}.png")
    paths["md"] = common.write_text(out_dir / f"{name}.md", markdown_report(result, name))
    return paths

