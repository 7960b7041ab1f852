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
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import o3 as tdn_o3
from ..tp import cp as tdn_cp
from ..tp import cp_fit
from . import common
from .accuracy_report import report_written
from .expressivity_probe import BACKENDS, PATH_SETS, backend_row, shipped_square
from .expressivity_report import doc_block, write_outputs

FULL_LMAX = (1, 2, 3, 4, 5, 6)
QUICK_LMAX = (1, 2)
# sweep budget of the rank-curve fits, and how many ranks, per L (the cost of a sweep grows ~ d^3 R)
CURVE_SWEEPS = {1: 1500, 2: 1500, 3: 1500, 4: 1000, 5: 600, 6: 400}
CURVE_POINTS = {1: 9, 2: 8, 3: 8, 4: 8, 5: 6, 6: 5}
QUICK_SWEEPS = 150
CACHE_VERSION = 1


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
    """The key of one fit in the cache file."""
    return f"v{CACHE_VERSION}/{paths}/L{lmax}/R{rank}/sweeps{sweeps}/seed{seed}"


def load_cache(path: Path | None) -> dict[str, Any]:
    """The cached fits (``{}`` when there is no cache or it cannot be read)."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("fits", {}) if isinstance(data, dict) else {}


def rank_curve(lmaxes: Sequence[int], path_sets: Sequence[str], cfg: dict[str, Any],
               log: Callable[[str], None]) -> list[dict[str, Any]]:
    """CP fits at the curve's ranks for every L and path set; cached fits are reused, new ones cached."""
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


# --------------------------------------------------------------------------------------------- run


def run(lmaxes: Sequence[int] = FULL_LMAX, backends: Sequence[str] = BACKENDS, quick: bool = False,
        seed: int = 0, curve: bool = True, cache: Path | None = None, allow_fit: bool = False,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """The per-backend rows for every L, backend and path set, and (``curve``) the CP rank-vs-error curve."""
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
    """One log line of a backend row."""
    if "equiv_f64" not in row:
        return f"{row['backend']:>5} {row['paths']} L={row['lmax']}: {row.get('status', '')[:90]}"
    return (f"{row['backend']:>5} {row['paths']} L={row['lmax']}: equiv f64 {row['equiv_f64']:.1e} "
            f"f32 {row['equiv_f32']:.1e}  |T-M|/|M| {row['dist_M']:.1e}  |T-G|/|G| {row['dist_G']:.1e}  "
            f"({row['seconds']:.1f} s)")

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``scripts/bench_expressivity.py``."""
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
    parser.add_argument("--doc", type=Path, default=None,
                        help="markdown page whose expressivity section is rewritten (e.g. docs/accuracy.md)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line: run, write the JSON, markdown and PNG, and print what was written."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lmaxes = args.lmax or (QUICK_LMAX if args.quick else FULL_LMAX)
    name = args.name or ("expressivity_quick" if args.quick else "expressivity")
    cache = args.cache if args.cache is not None else (None if args.quick else args.out / "expressivity_cp_fits.json")
    result = run(lmaxes, args.backends, args.quick, args.seed, args.curve, cache, args.fit_missing,
                 log=lambda line: print(line, flush=True))
    written = write_outputs(result, args.out, name)
    report_written(written, args.doc, name, doc_block(result, name))
    return result


if __name__ == "__main__":
    main()
