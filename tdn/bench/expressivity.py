"""Equivariance / expressivity report of the tensor-product backends, and the rank-vs-error curve of the CP fit.

For every backend (cg, cp, gaunt, grid), path set ("o3", "so3" where supported) and L = lmax_in = lmax_sh = lmax_out:

- **equivariance**: ``max |tp(D x, D y, w) - D tp(x, y, w)| / max |tp(x, y, w)|`` over seeded random rotations
  (:func:`tdn.o3.equivariance_error`), in float32 and float64; for "o3" also under the improper rotation ``-R``
  (natural parity);
- **the map it computes**: the backend's bilinear map with all weights 1 is probed on basis vectors
  (``T [d, d, d]``) and compared with the exact CG path tensor ``M`` (what cg and cp with ``weights="shared"``
  compute) and the Gaunt tensor ``G`` (what gaunt and grid compute): raw relative distance, distance after the best
  global scale (one weight per channel absorbs it), and after the best scale per output degree (what
  ``weights="degree"`` can reach). ``T`` is also projected onto every Wigner-3j block: the paths it holds and the
  part that is no CG coupling at all (the "non-CG residual": zero for exact maps, part of the fit error for cp);
- **weights**: the number of independent weights per channel ``P`` in every weight mode a backend offers, the
  number of paths of the path set, and in words the couplings a backend cannot represent (cg: none; cp: the residual
  of the decomposition; gaunt/grid: the odd ``l1 + l2 + l3`` paths and any path weights other than the Gaunt ones
  within an output degree).

The CP rank-vs-error curve: ALS fits (:func:`tdn.tp.cp_fit.fit_cp`, seeded, float64) at a handful of ranks per L and
path set, warm-started from the shipped factors (``tdn/tp/cp_factors``) truncated or padded to the rank when there are
any, with a sweep budget that shrinks with L. Each fit is cached in a JSON file keyed by its settings, so a rerun only
fits what is new. The errors are upper bounds of the best rank-R error (ALS, one start, limited sweeps). The shipped
factors (the tol-1e-4 rank and the TDN paper's 7 L²) are drawn as their own markers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import o3 as tdn_o3
from .. import tp as tdn_tp
from ..tp import cp as tdn_cp
from ..tp import cp_fit
from . import common
from .accuracy import report_written
from .tp import effective_tensor, path_analysis

BACKENDS = ("cg", "cp", "gaunt", "grid")
PATH_SETS = ("o3", "so3")
FULL_LMAX = (1, 2, 3, 4, 5, 6)
QUICK_LMAX = (1, 2)
# the weight mode each backend uses in the model by default (conf/tp/*.yaml)
MODEL_WEIGHTS = {"cg": "path", "cp": "shared", "gaunt": "degree", "grid": "degree"}
CANNOT = {
    "cg": "none (exact; per-path weights)",
    "cp": "residual of the CP decomposition (see fit error); per-path weights",
    "gaunt": "odd l1+l2+l3 paths; path weights other than the Gaunt ones within an output degree",
    "grid": "odd l1+l2+l3 paths; path weights other than the Gaunt ones within an output degree",
}
# sweep budget of the rank-curve fits, and how many ranks, per L (the cost of a sweep grows ~ d^3 R)
CURVE_SWEEPS = {1: 1500, 2: 1500, 3: 1500, 4: 1000, 5: 600, 6: 400}
CURVE_POINTS = {1: 9, 2: 8, 3: 8, 4: 8, 5: 6, 6: 5}
QUICK_SWEEPS = 150
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------- CP factors


def cp_factor_file(lmax: int, paths: str, tol: float = tdn_cp.DEFAULT_TOL, rank: int | None = None) -> Path | None:
    """The shipped or cached factor file for ``(L, L, L)``, or None (never fits: a fit at L = 6 takes long)."""
    name = tdn_cp.factor_name(lmax, lmax, lmax, paths, tol, rank)
    for directory in (tdn_cp.PACKAGE_DIR, tdn_cp.cache_dir()):
        if (directory / name).is_file():
            return directory / name
    return None


def shipped_square(paths: str) -> dict[int, dict[str, dict[str, Any]]]:
    """``{L: {"tol": row, "paper": row}}`` of the shipped square factors (rank, rel_error, file) for one path set."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for row in tdn_cp.shipped_factors():
        if row["paths"] != paths or not row["lmax_in"] == row["lmax_sh"] == row["lmax_out"]:
            continue
        L = row["lmax_out"]
        key = "tol" if row["tol"] > 0 else ("paper" if row["rank"] == 7 * L * L else f"rank{row['rank']}")
        out.setdefault(L, {})[key] = row
    return out


# --------------------------------------------------------------------------------------------- per-backend rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def scaled_distance(T: torch.Tensor, ref: torch.Tensor, lmax: int, per_degree: bool) -> float:
    """``min over scales a ||a T - ref|| / ||ref||``: one global scale, or one per output degree ``l3``."""
    if not per_degree:
        denom = float((T * T).sum())
        a = float((T * ref).sum()) / denom if denom > 0 else 0.0
        return _rel(a * T, ref)
    fitted = torch.zeros_like(T)
    for l3 in range(lmax + 1):
        s = tdn_o3.degree_slice(l3)
        denom = float((T[s] * T[s]).sum())
        fitted[s] = (float((T[s] * ref[s]).sum()) / denom if denom > 0 else 0.0) * T[s]
    return _rel(fitted, ref)


def odd_fraction(lmax: int) -> float:
    """The part of the "so3" path tensor in odd ``l1 + l2 + l3`` paths: ``||M_odd|| / ||M_so3||``."""
    M = tdn_o3.path_tensor(lmax, lmax, lmax, "so3")
    odd = torch.zeros_like(M)
    for (l1, l2, l3), block in tdn_o3.path_blocks(lmax, lmax, lmax, "so3"):
        if (l1 + l2 + l3) % 2:
            odd[tdn_o3.degree_slice(l3), tdn_o3.degree_slice(l1), tdn_o3.degree_slice(l2)] += block
    return float(odd.norm() / M.norm())


def _rotations(seed: int, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [tdn_o3.random_rotation(generator=gen) for _ in range(count)]


def equivariance(tp64: torch.nn.Module, lmax: int, paths: str, seed: int, rotations: int, edges: int,
                 channels: int) -> dict[str, float]:
    """Max relative equivariance error over ``rotations`` proper rotations, float64 and float32 (+ parity for o3)."""
    out: dict[str, float] = {}
    rots = _rotations(seed, rotations)
    d = tdn_o3.dim(lmax)
    for dtype, tag in ((torch.float64, "f64"), (torch.float32, "f32")):
        tp = copy.deepcopy(tp64).to(dtype=dtype)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(edges, channels, d, dtype=torch.float64, generator=gen).to(dtype)
        y = torch.randn(edges, d, dtype=torch.float64, generator=gen).to(dtype)
        w = torch.randn(edges, channels, tp.num_weights, dtype=torch.float64, generator=gen).to(dtype)
        errs = [tdn_o3.equivariance_error(tp, [x, y, w], [lmax, lmax, None], lmax, rotation=r) for r in rots]
        out[f"equiv_{tag}"] = max(errs)
        if paths == "o3":
            errs = [tdn_o3.equivariance_error(tp, [x, y, w], [lmax, lmax, None], lmax, rotation=-r) for r in rots]
            out[f"parity_{tag}"] = max(errs)
    return out


def build_backend(kind: str, lmax: int, paths: str, channels: int, allow_fit: bool) -> tuple[Any, dict[str, Any]]:
    """The float64 module with ``weights="shared"`` (the bare map), or ``(None, {"status": why})``."""
    options: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if kind == "cp" and not allow_fit:
        if cp_factor_file(lmax, paths) is None:
            paper = cp_factor_file(lmax, paths, rank=7 * lmax * lmax)
            if paper is None:
                return None, {"status": "no shipped tol-1e-4 (or 7L^2) factors; --fit-missing fits them"}
            options["rank"] = 7 * lmax * lmax
            info["note"] = "tol-1e-4 factors not shipped: the TDN paper's rank 7L^2 is used"
    with common.default_dtype(torch.float64):
        try:
            tp = tdn_tp.build(kind, lmax=lmax, channels=channels, paths=paths, weights="shared", **options)
        except ValueError as err:
            return None, {"status": f"unsupported: {err}"}
    if kind == "cp":
        info.update(rank=tp.rank, fit_error=tp.fit_error, factors=Path(tp.factors_file).name,
                    factors_source=tp.factors_source)
    if kind == "grid":
        info["rank"] = tp.num_points  # a factorised product of rank Q (grid points)
    return tp, info


def weight_counts(kind: str, lmax: int, paths: str) -> dict[str, int]:
    """``{mode: P}`` for every weight mode the backend offers (P = weights per channel)."""
    cls = tdn_tp.BACKENDS[kind]
    num_paths = len(tdn_o3.path_list(lmax, lmax, lmax, paths))
    counts = {"shared": 1, "degree": lmax + 1, "path": num_paths}
    return {mode: counts[mode] for mode in cls.supported_weights}


def backend_row(kind: str, lmax: int, paths: str, cfg: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "backend": kind, "lmax": lmax, "paths": paths, "d": tdn_o3.dim(lmax),
        "num_paths": len(tdn_o3.path_list(lmax, lmax, lmax, paths)),
        "num_paths_o3": len(tdn_o3.path_list(lmax, lmax, lmax, "o3")),
        "weights_per_channel": weight_counts(kind, lmax, paths),
        "model_weights": MODEL_WEIGHTS[kind], "cannot_represent": CANNOT[kind],
    }
    start = time.perf_counter()
    tp, info = build_backend(kind, lmax, paths, cfg["channels"], cfg["allow_fit"])
    row.update(info)
    if tp is None:
        if kind in ("gaunt", "grid") and paths == "so3":
            # what the Gaunt map misses of the so3 tensor: the odd paths entirely, the rest up to per-degree scales
            G = tdn_o3.gaunt_tensor(lmax, lmax, lmax)
            M = tdn_o3.path_tensor(lmax, lmax, lmax, "so3")
            row.update(odd_fraction=odd_fraction(lmax), dist_M_degree=scaled_distance(G, M, lmax, True))
        row["seconds"] = time.perf_counter() - start
        return row
    d = tdn_o3.dim(lmax)
    T = effective_tensor(tp, d, d, tp.num_weights)  # [d, d, d] float64, weights 1
    M = tdn_o3.path_tensor(lmax, lmax, lmax, paths)
    G = tdn_o3.gaunt_tensor(lmax, lmax, lmax)
    row.update(
        dist_M=_rel(T, M),
        dist_M_scale=scaled_distance(T, M, lmax, False),
        dist_M_degree=scaled_distance(T, M, lmax, True),
        dist_G=_rel(T, G),
        **path_analysis(T, lmax),
    )
    row["exact_map"] = "G" if row["dist_G"] < row["dist_M"] else "M"
    row.update(equivariance(tp, lmax, paths, cfg["seed"], cfg["rotations"], cfg["edges"], cfg["channels"]))
    row["seconds"] = time.perf_counter() - start
    return row


# --------------------------------------------------------------------------------------------- CP rank curve


def curve_ranks(lmax: int, shipped: dict[str, dict[str, Any]], points: int, tol_ratio: float = 1.0) -> list[int]:
    """``points`` ranks, geometric from ~0.4 * 7L² to ~1.15 * max(7L², the shipped tol rank), distinct integers.

    Where no tol rank is shipped, it is estimated as ``tol_ratio * 7L²`` (the ratio at the largest L shipped).
    """
    paper = 7 * lmax * lmax
    top = max(paper, shipped.get("tol", {}).get("rank", round(tol_ratio * paper)))
    lo, hi = max(1, round(0.4 * paper)), max(2, round(1.15 * top))
    if lmax == 1:
        return list(range(1, min(hi, 9) + 1))[-points:]
    ranks = {round(lo * (hi / lo) ** (k / (points - 1))) for k in range(points)} if points > 1 else {paper}
    return sorted(ranks)


def tol_ratio(shipped: dict[int, dict[str, dict[str, Any]]], lmax: int) -> float:
    """Shipped tol rank / 7L² at the largest L below ``lmax`` that has one (1 if none)."""
    below = [L for L in shipped if L < lmax and "tol" in shipped[L]]
    if not below:
        return 1.0
    L = max(below)
    return shipped[L]["tol"]["rank"] / (7 * L * L)


def _warm_start(M: np.ndarray, rank: int, lmax: int, paths: str, seed: int) -> tuple[cp_fit.Factors | None, str]:
    """Shipped factors of the same tensor truncated (lightest terms dropped) or padded to ``rank``."""
    candidates = []
    for row in tdn_cp.shipped_factors():
        if row["paths"] == paths and row["lmax_in"] == row["lmax_sh"] == row["lmax_out"] == lmax:
            candidates.append(row)
    if not candidates:
        return None, "random"
    above = [r for r in candidates if r["rank"] >= rank]
    chosen = min(above, key=lambda r: r["rank"]) if above else max(candidates, key=lambda r: r["rank"])
    f = tdn_cp.load_factors(tdn_cp.PACKAGE_DIR / chosen["file"])
    factors = (f.A, f.B, f.C)
    if f.rank > rank:
        factors = cp_fit.truncate(factors, rank)
    elif f.rank < rank:
        factors = cp_fit.pad(factors, rank, np.random.default_rng([seed, rank, 7]), 1e-3)
    return factors, f"shipped rank {f.rank}"


def cache_key(lmax: int, paths: str, rank: int, sweeps: int, seed: int) -> str:
    return f"v{CACHE_VERSION}/{paths}/L{lmax}/R{rank}/sweeps{sweeps}/seed{seed}"


def load_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("fits", {}) if isinstance(data, dict) else {}


def rank_curve(lmaxes: Sequence[int], path_sets: Sequence[str], cfg: dict[str, Any],
               log: Callable[[str], None]) -> list[dict[str, Any]]:
    cache_path: Path | None = cfg.get("cache")
    cache = load_cache(cache_path)
    rows: list[dict[str, Any]] = []
    for paths in path_sets:
        shipped = shipped_square(paths)
        for L in lmaxes:
            M = tdn_o3.path_tensor(L, L, L, paths).numpy()
            sweeps = cfg["sweeps"].get(L, QUICK_SWEEPS) if isinstance(cfg["sweeps"], dict) else cfg["sweeps"]
            points = cfg["points"].get(L, 3) if isinstance(cfg["points"], dict) else cfg["points"]
            for rank in curve_ranks(L, shipped.get(L, {}), points, tol_ratio(shipped, L)):
                key = cache_key(L, paths, rank, sweeps, cfg["seed"])
                if key in cache:
                    rows.append({**cache[key], "cached": True})
                    continue
                init, source = _warm_start(M, rank, L, paths, cfg["seed"])
                start = time.perf_counter()
                fit = cp_fit.fit_cp(M, rank, cfg["seed"], max_sweeps=sweeps, init=init)
                row = {"paths": paths, "lmax": L, "rank": rank, "rel_error": fit.rel_error, "sweeps": fit.sweeps,
                       "max_sweeps": sweeps, "init": source, "seconds": time.perf_counter() - start}
                log(f"  cp fit {paths} L={L} R={rank}: error {fit.rel_error:.2e} ({fit.sweeps} sweeps, {source}, "
                    f"{row['seconds']:.0f} s)")
                cache[key] = row
                rows.append({**row, "cached": False})
                if cache_path is not None:  # after every fit: an interrupted run keeps what it did
                    common.write_json(cache_path, {"version": CACHE_VERSION, "fits": cache})
    return rows


def shipped_points(path_sets: Sequence[str], lmaxes: Sequence[int]) -> list[dict[str, Any]]:
    """The shipped square factors (tol-1e-4 rank and 7 L²) with their recorded errors."""
    out = []
    for paths in path_sets:
        for L, rows in sorted(shipped_square(paths).items()):
            if L not in lmaxes:
                continue
            for key, row in rows.items():
                out.append({"paths": paths, "lmax": L, "kind": key, "rank": row["rank"], "rel_error": row["rel_error"],
                            "sweeps": row["sweeps"], "file": row["file"]})
    return out


# --------------------------------------------------------------------------------------------- run + report


def run(lmaxes: Sequence[int] = FULL_LMAX, backends: Sequence[str] = BACKENDS, quick: bool = False,
        seed: int = 0, curve: bool = True, cache: Path | None = None, allow_fit: bool = False,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    cfg = {"seed": seed, "rotations": 2 if quick else 3, "edges": 4 if quick else 8, "channels": 2 if quick else 4,
           "allow_fit": allow_fit, "cache": cache,
           "sweeps": QUICK_SWEEPS if quick else CURVE_SWEEPS, "points": 3 if quick else CURVE_POINTS}
    result: dict[str, Any] = {"meta": common.run_metadata("cpu", packages=("e3nn", "numpy")),
                              "config": {k: v for k, v in cfg.items() if k != "cache"}, "quick": quick}
    rows = []
    start = time.perf_counter()
    for L in lmaxes:
        for kind in backends:
            for paths in PATH_SETS:
                row = backend_row(kind, L, paths, cfg)
                rows.append(row)
                log(progress_line(row))
    result["rows"] = rows
    result["backend_seconds"] = time.perf_counter() - start
    if curve:
        start = time.perf_counter()
        result["cp_curve"] = rank_curve(lmaxes, PATH_SETS, cfg, log)
        result["cp_shipped"] = shipped_points(PATH_SETS, lmaxes)
        result["curve_seconds"] = time.perf_counter() - start
    return result


def progress_line(row: dict[str, Any]) -> str:
    if "equiv_f64" not in row:
        return f"{row['backend']:>5} {row['paths']} L={row['lmax']}: {row.get('status', '')[:90]}"
    return (f"{row['backend']:>5} {row['paths']} L={row['lmax']}: equiv f64 {row['equiv_f64']:.1e} "
            f"f32 {row['equiv_f32']:.1e}  |T-M|/|M| {row['dist_M']:.1e}  |T-G|/|G| {row['dist_G']:.1e}  "
            f"({row['seconds']:.1f} s)")


def _sci(value: Any) -> str:
    return common.fmt_sci(value) if isinstance(value, float) else "—"


def _weights_cell(row: dict[str, Any]) -> str:
    parts = []
    for mode, p in row["weights_per_channel"].items():
        bold = "**" if mode == row["model_weights"] else ""
        parts.append(f"{bold}{mode} {p}{bold}")
    return ", ".join(parts)


def backend_table(rows: list[dict[str, Any]]) -> str:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_budget(sweeps: Any) -> str:
    if isinstance(sweeps, dict):
        return ", ".join(f"{v} at L={k}" for k, v in sweeps.items())
    return str(sweeps)


def markdown_report(result: dict[str, Any], name: str) -> str:
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
    out_dir = Path(out_dir)
    paths = {"json": common.write_json(out_dir / f"{name}.json", result)}
    paths["png"] = write_plot(result, out_dir / f"{name}.png")
    paths["md"] = common.write_text(out_dir / f"{name}.md", markdown_report(result, name))
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="L = 1, 2, few ranks, short fits, no cache (tests)")
    parser.add_argument("--lmax", type=int, nargs="+", default=None, help="degrees L (default 1..6; quick: 1 2)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--name", default=None, help="output name (default expressivity[_quick])")
    parser.add_argument("--cache", type=Path, default=None,
                        help="JSON cache of the CP fits (default OUT/expressivity_cp_fits.json; none with --quick)")
    parser.add_argument("--no-curve", dest="curve", action="store_false", help="skip the CP rank-vs-error fits")
    parser.add_argument("--fit-missing", action="store_true",
                        help="let cp fit factors that are not shipped (tol 1e-4 at L = 6 takes long)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a shared machine)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lmaxes = args.lmax or (QUICK_LMAX if args.quick else FULL_LMAX)
    name = args.name or ("expressivity_quick" if args.quick else "expressivity")
    cache = args.cache if args.cache is not None else (None if args.quick else args.out / "expressivity_cp_fits.json")
    result = run(lmaxes, args.backends, args.quick, args.seed, args.curve, cache, args.fit_missing,
                 log=lambda line: print(line, flush=True))
    written = write_outputs(result, args.out, name)
    report_written(written, args.out, name, doc_block(result, name))
    return result


if __name__ == "__main__":
    main()
